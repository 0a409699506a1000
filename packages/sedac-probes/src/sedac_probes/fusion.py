"""Signal fusion: a small learned gate over cheap per-token signals (the V6.1 roadmap's
EnhancedConfidenceAccumulator), trained on the label that decides quality.

At each checkpoint layer l the gate reads (:data:`~sedac_probes.probe.FUSION_FEATURES`):

* the safety probe's logit (trained on "top-1 survives a cascade exit here");
* the V7 similarity S_l = (cos(h_l, h_{l-1}) + 1) / 2 and its trend S_l - S_{l-1};
* log(1 + position).

and predicts p(safe) with a logistic regression on standardised features; risk = 1 - p(safe). It runs in
the same places a probe does (the HF runtime, vLLM's compiled forward); its extra work over the probe is
the similarity of consecutive residual streams, which the V7 monitor computes anyway.

Two signals the roadmap lists are measured here but not fed to the gate, for their cost: the logit-lens
consistency (does the top-1 of the LM head applied at l equal the one at the previous checkpoint?) needs
the LM head per checkpoint — for a small model that is several decoder layers' worth of work
(:func:`lens_cost_vs_layer`) — and attention entropy is not exposed by fused attention kernels.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from sedac_monitor.api import InputError

from .collect import load_data, load_probes_for
from .io import save
from .metrics import auroc, split_window_ids, window_rows
from .probe import FUSION_FEATURES, ProbeBank, fusion_features

Log = Callable[[str], None]


def checkpoint_features(bank: ProbeBank, data: Dict[str, Any], i: int, layer: int, rows: torch.Tensor) -> torch.Tensor:
    """The gate's features at checkpoint ``i`` (layer ``layer``) for collected ``rows``."""
    sim = data.get("similarity")
    if sim is None:
        raise InputError(f"{data['path']} has no similarity signal: it was collected by an older sedac-probes; "
                         "rerun `sedac-probes collect` (with --overwrite) for fused gates")
    h = data["hidden"][layer][rows]
    with torch.no_grad():
        z = torch.cat([bank.logit_at(i, h[j:j + 8192].float()) for j in range(0, h.shape[0], 8192)])
    s = sim[rows, layer].float()
    s_prev = sim[rows, layer - 1].float() if layer > 0 else s
    return fusion_features(z, s, s_prev, data["position"][rows])


def fit_gate(x: torch.Tensor, safe: torch.Tensor, l2: float = 1e-3, iterations: int = 200) -> Dict[str, torch.Tensor]:
    """Logistic regression of ``safe`` on standardised ``x``: {weight [F], bias [], mean [F], std [F]}."""
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    xs = ((x - mean) / std).double()
    y = safe.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    prior = float(y.mean().clamp(1e-4, 1 - 1e-4))
    with torch.no_grad():
        b.fill_(np.log(prior / (1 - prior)))
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"weight": w.detach().float(), "bias": b.detach().float(), "mean": mean.float(), "std": std.float()}


def gate_risk(gate: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(-(((x - gate["mean"]) / gate["std"]) @ gate["weight"] + gate["bias"]))


def signal_aurocs(data: Dict[str, Any], rows: torch.Tensor, layer: int, feats: torch.Tensor,
                  fused: Optional[torch.Tensor], previous_layer: Optional[int],
                  extra: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, float]:
    """AUROC of each signal alone, and of the fused risk, for "exiting here changes the top-1" at
    ``layer``. Each single signal is oriented the way it separates best on these rows (a generous
    baseline for the gate)."""
    unsafe = data["cascade_safe"][layer][rows].numpy() == 0
    out: Dict[str, float] = {}

    def oriented(score):
        a = auroc(score, unsafe)
        return max(a, 1 - a) if a == a else a

    names = {"probe_logit": "safety probe", "similarity": "similarity S_l", "trend": "trend S_l - S_(l-1)",
             "log_position": "position"}
    for j, name in enumerate(FUSION_FEATURES):
        out[names[name]] = oriented(feats[:, j].numpy())
    lens = data.get("lens_top1")
    if lens is not None and previous_layer is not None:
        agree = (lens[layer][rows] == lens[previous_layer][rows]).numpy().astype(np.float64)
        out["logit-lens top-1 = previous checkpoint's"] = oriented(agree)
    for name, score in (extra or {}).items():
        out[name] = oriented(score)
    if fused is not None:
        out["fused gate"] = auroc(fused.numpy(), unsafe)
    out["tokens"] = int(rows.numel())
    out["safe_fraction"] = float((~unsafe).mean())
    return out


def train_fusion(data_dir: Any, probe_dir: Any, out_dir: Any, seed: int = 0, val_fraction: float = 0.2,
                 log: Log = print) -> Dict[str, Any]:
    """Fit one gate per checkpoint of the safety probes in ``probe_dir`` on ``data_dir`` (held-out split by
    window, as probe training); write a ``"fusion"`` probe directory to ``out_dir``."""
    t0 = time.perf_counter()
    data = load_data(data_dir)
    meta = data["meta"]
    probes = load_probes_for(probe_dir, data)
    if probes.target != "safety":
        raise InputError(f"a fused gate builds on safety probes (--target safety); {probe_dir} holds "
                         f"{probes.target} probes")
    per_window = meta["max_length"] - 1
    keep = data["position"] >= meta.get("protect_first", 0)
    train_w, val_w = split_window_ids(meta["windows"], val_fraction, seed)
    train_rows, val_rows = window_rows(train_w, per_window, keep), window_rows(val_w, per_window, keep)
    bank = ProbeBank(probes.layers, probes.bank.hidden_size, probes.bank.rank, "fusion")
    bank.load_state_dict({k: v for k, v in probes.bank.state_dict().items()}, strict=False)
    bank.eps = probes.bank.eps
    per_layer: Dict[str, Any] = {}
    previous = None
    for i, layer in enumerate(probes.layers):
        x_train = checkpoint_features(probes.bank, data, i, layer, train_rows)
        x_val = checkpoint_features(probes.bank, data, i, layer, val_rows)
        gate = fit_gate(x_train, data["cascade_safe"][layer][train_rows].float())
        with torch.no_grad():
            for name, t in gate.items():
                getattr(bank, f"gate_{name}")[i] = t
        metrics = signal_aurocs(data, val_rows, layer, x_val, gate_risk(gate, x_val), previous)
        per_layer[str(layer)] = {"weights": dict(zip(FUSION_FEATURES, gate["weight"].tolist())),
                                 "heldout_auroc": metrics}
        log(f"  layer {layer:3d}: held-out AUROC fused {metrics['fused gate']:.3f} vs safety probe "
            f"{metrics['safety probe']:.3f}, similarity {metrics['similarity S_l']:.3f}")
        previous = layer
    out_meta = {**{k: v for k, v in probes.meta.items() if k not in ("calibration", "thresholds", "exit_rates",
                                                                         "status", "exits_disabled")},
                "calibration": None, "thresholds": None, "exit_rates": None,
                "fusion": {"features": list(FUSION_FEATURES), "probes": str(probe_dir), "data": str(data["path"]),
                           "seed": seed, "val_fraction": val_fraction, "per_layer": per_layer,
                           "seconds": round(time.perf_counter() - t0, 1)}}
    save(out_dir, bank, out_meta)
    log(f"wrote a fused gate over {', '.join(FUSION_FEATURES)} for layers {probes.layers} to {out_dir}")
    return out_meta


def evaluate_fusion(fusion_dir: Any, data_dir: Any, entropy_dir: Any = None, log: Log = print) -> Dict[str, Any]:
    """Per-checkpoint AUROC of the fused gate against every single signal on collected (held-out) data;
    with ``entropy_dir``, the entropy probe's risk is one of the single signals."""
    data = load_data(data_dir)
    meta = data["meta"]
    fusion = load_probes_for(fusion_dir, data)
    if fusion.target != "fusion":
        raise InputError(f"{fusion_dir} holds {fusion.target} probes, not a fused gate")
    entropy = load_probes_for(entropy_dir, data) if entropy_dir is not None else None
    rows = torch.nonzero(data["position"] >= meta.get("protect_first", 0)).squeeze(1)
    out: Dict[str, Any] = {}
    previous = None
    for i, layer in enumerate(fusion.layers):
        feats = checkpoint_features(fusion.bank, data, i, layer, rows)
        with torch.no_grad():
            fused = fusion.bank.gate_risk(i, feats)
        extra = {}
        if entropy is not None and layer in entropy.layers:
            j = entropy.layers.index(layer)
            h = data["hidden"][layer][rows]
            with torch.no_grad():
                extra["entropy probe"] = torch.cat([entropy.bank.risk_at(j, h[k:k + 8192].float())
                                                    for k in range(0, h.shape[0], 8192)]).numpy()
        out[str(layer)] = signal_aurocs(data, rows, layer, feats, fused, previous, extra)
        log(f"  layer {layer:3d} on {meta['text']}: " + ", ".join(f"{k} {v:.3f}" for k, v in out[str(layer)].items()
                                                                 if isinstance(v, float) and k != "safe_fraction"))
        previous = layer
    return out


def lens_cost_vs_layer(hidden_size: int, intermediate_size: int, vocab_size: int, heads: int, kv_heads: int,
                       head_dim: int, context: float) -> float:
    """MACs of one logit-lens top-1 (final norm + LM head) per token, relative to one decoder layer."""
    layer = hidden_size * (2 * heads * head_dim + 2 * kv_heads * head_dim) + 2 * context * heads * head_dim \
        + 3 * hidden_size * intermediate_size
    return hidden_size * vocab_size / layer


def gate_cost(bank: ProbeBank, tokens: int = 2048, repeats: int = 5) -> Dict[str, float]:
    """Wall-clock per call of the fused gate's extra work over the probe (similarity, trend, gate), in ms."""
    h = torch.randn(tokens, bank.hidden_size)
    prev = torch.randn(tokens, bank.hidden_size)
    pos = torch.arange(tokens)
    from sedac_monitor.api import similarity

    def extra():
        s = similarity(h, prev)
        return fusion_features(torch.zeros(tokens), s, s, pos) @ torch.ones(len(FUSION_FEATURES))

    def probe():
        return bank.logit_at(0, h)

    out: Dict[str, float] = {}
    for name, fn in (("gate_extra_ms", extra), ("probe_ms", probe)):
        fn()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[name] = best * 1e3
    return out


__all__: List[str] = ["checkpoint_features", "evaluate_fusion", "fit_gate", "gate_cost", "gate_risk",
                      "lens_cost_vs_layer", "signal_aurocs", "train_fusion"]
