"""LREProbe and the bank that applies a model's checkpoint probes inside a forward."""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("entropy", "safety", "fusion")
FUSION_FEATURES = ("probe_logit", "similarity", "trend", "log_position")
"""What a fused gate reads per token at a checkpoint layer l: the safety probe's logit, the V7 signal
S_l, its trend S_l - S_{l-1} and log(1 + position)."""
GATE_TENSORS = ("weight", "bias", "mean", "std")


def fusion_features(z: torch.Tensor, s: torch.Tensor, s_prev: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[rows, len(FUSION_FEATURES)]`` float32 features of a fused gate."""
    return torch.stack([z.float(), s.float(), (s - s_prev).float(), torch.log1p(positions.float())], 1)


class LREProbe(nn.Module):
    """Low-rank probe: Linear(d -> rank) -> LayerNorm -> Linear(rank -> 1) -> head.

    ``target="entropy"``: the head is Softplus and the output predicts the
    token's logit-lens entropy (nats) at the probe's layer; that prediction is
    the risk. ``target="safety"``: the module returns the logit of
    p(safe to exit here); :meth:`risk` gives 1 - p(safe).
    """

    def __init__(self, hidden_size: int, rank: int = 64, target: str = "entropy") -> None:
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if hidden_size < 1 or rank < 1:
            raise ValueError(f"hidden_size and rank must be >= 1, got {hidden_size}, {rank}")
        self.target = target
        self.down = nn.Linear(hidden_size, rank)
        self.norm = nn.LayerNorm(rank)
        self.head = nn.Linear(rank, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.head(self.norm(self.down(h))).squeeze(-1)
        return F.softplus(z) if self.target == "entropy" else z

    def risk(self, h: torch.Tensor) -> torch.Tensor:
        out = self(h)
        return out if self.target == "entropy" else torch.sigmoid(-out)


class ProbeBank(nn.Module):
    """All checkpoint probes of one model, stacked.

    ``bank(h)`` applies every probe to the same ``[tokens, hidden]`` tensor in
    one matmul and returns ``[tokens, checkpoints]`` risks;
    ``bank.risk_at(i, h)`` applies checkpoint ``i``'s probe only (what a model
    forward does at layer ``layers[i]``). Both compute in the input's dtype
    and return float32.

    A ``"fusion"`` bank also holds a logistic gate per checkpoint over
    :data:`FUSION_FEATURES` (standardised with the training mean and std);
    its risk is :meth:`fused_risk_at`, 1 - p(safe).
    """

    def __init__(self, layers: Sequence[int], hidden_size: int, rank: int, target: str) -> None:
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.layers = tuple(int(layer) for layer in layers)
        self.hidden_size, self.rank, self.target = int(hidden_size), int(rank), target
        c = len(self.layers)
        self.down_weight = nn.Parameter(torch.zeros(c * rank, hidden_size), requires_grad=False)
        self.down_bias = nn.Parameter(torch.zeros(c * rank), requires_grad=False)
        self.norm_weight = nn.Parameter(torch.ones(c, rank), requires_grad=False)
        self.norm_bias = nn.Parameter(torch.zeros(c, rank), requires_grad=False)
        self.head_weight = nn.Parameter(torch.zeros(c, rank), requires_grad=False)
        self.head_bias = nn.Parameter(torch.zeros(c), requires_grad=False)
        self.eps = 1e-5
        if target == "fusion":
            f = len(FUSION_FEATURES)
            self.gate_weight = nn.Parameter(torch.zeros(c, f), requires_grad=False)
            self.gate_bias = nn.Parameter(torch.zeros(c), requires_grad=False)
            self.gate_mean = nn.Parameter(torch.zeros(c, f), requires_grad=False)
            self.gate_std = nn.Parameter(torch.ones(c, f), requires_grad=False)

    @classmethod
    def from_probes(cls, probes: Dict[int, LREProbe]) -> "ProbeBank":
        layers = sorted(probes)
        first = probes[layers[0]]
        bank = cls(layers, first.down.in_features, first.down.out_features, first.target)
        with torch.no_grad():
            for i, layer in enumerate(layers):
                p = probes[layer]
                r = bank.rank
                bank.down_weight[i * r:(i + 1) * r] = p.down.weight
                bank.down_bias[i * r:(i + 1) * r] = p.down.bias
                bank.norm_weight[i] = p.norm.weight
                bank.norm_bias[i] = p.norm.bias
                bank.head_weight[i] = p.head.weight[0]
                bank.head_bias[i] = p.head.bias[0]
                bank.eps = p.norm.eps
        return bank

    def probe(self, i: int) -> LREProbe:
        """Checkpoint ``i``'s probe as a standalone :class:`LREProbe` (a copy)."""
        r = self.rank
        p = LREProbe(self.hidden_size, r, self.target)
        with torch.no_grad():
            p.down.weight.copy_(self.down_weight[i * r:(i + 1) * r])
            p.down.bias.copy_(self.down_bias[i * r:(i + 1) * r])
            p.norm.weight.copy_(self.norm_weight[i])
            p.norm.bias.copy_(self.norm_bias[i])
            p.head.weight.copy_(self.head_weight[i][None])
            p.head.bias.copy_(self.head_bias[i][None])
        return p

    def _finish(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        return F.softplus(z) if self.target == "entropy" else torch.sigmoid(-z)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        c, r = len(self.layers), self.rank
        x = F.linear(h, self.down_weight.to(h.dtype), self.down_bias.to(h.dtype)).view(-1, c, r)
        x = F.layer_norm(x, (r,), eps=self.eps) * self.norm_weight.to(h.dtype) + self.norm_bias.to(h.dtype)
        return self._finish((x * self.head_weight.to(h.dtype)).sum(-1) + self.head_bias.to(h.dtype))

    def logit_at(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Checkpoint ``i``'s probe output before its head's nonlinearity (float32)."""
        r = self.rank
        x = F.linear(h, self.down_weight[i * r:(i + 1) * r].to(h.dtype), self.down_bias[i * r:(i + 1) * r].to(h.dtype))
        x = F.layer_norm(x, (r,), self.norm_weight[i].to(h.dtype), self.norm_bias[i].to(h.dtype), self.eps)
        return F.linear(x, self.head_weight[i:i + 1].to(h.dtype),
                        self.head_bias[i:i + 1].to(h.dtype)).squeeze(-1).float()

    def fused_risk_at(self, i: int, h: torch.Tensor, s: torch.Tensor, s_prev: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        """A fusion bank's risk at checkpoint ``i``: 1 - sigmoid(gate(features))."""
        return self.gate_risk(i, fusion_features(self.logit_at(i, h), s, s_prev, positions))

    def gate_risk(self, i: int, feats: torch.Tensor) -> torch.Tensor:
        """The fused gate at checkpoint ``i`` on its ``[rows, features]`` inputs: 1 - p(safe)."""
        z = ((feats - self.gate_mean[i]) / self.gate_std[i]) @ self.gate_weight[i] + self.gate_bias[i]
        return torch.sigmoid(-z)

    def risk_at(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.target == "fusion":
            raise RuntimeError("a fusion bank's risk needs its features: use fused_risk_at")
        r = self.rank
        x = F.linear(h, self.down_weight[i * r:(i + 1) * r].to(h.dtype), self.down_bias[i * r:(i + 1) * r].to(h.dtype))
        x = F.layer_norm(x, (r,), self.norm_weight[i].to(h.dtype), self.norm_bias[i].to(h.dtype), self.eps)
        return self._finish(F.linear(x, self.head_weight[i:i + 1].to(h.dtype), self.head_bias[i:i + 1].to(h.dtype))
                            .squeeze(-1))

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The probe file's tensors, named per checkpoint layer."""
        out: Dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            p = self.probe(i)
            for name, t in p.state_dict().items():
                out[f"layer{layer}.{name}"] = t.detach().to(torch.float32).contiguous()
            if self.target == "fusion":
                for name in GATE_TENSORS:
                    out[f"layer{layer}.gate.{name}"] = getattr(self, f"gate_{name}")[i].detach().float().contiguous()
        return out
