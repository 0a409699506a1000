"""V6.0 / V6.1 cascade decisions in torch, one checkpoint at a time.

The torch twin of ``sedac_core.CascadeController.evaluate``: the same float32
operations in the same order, so exits and accumulated confidence are
identical to sedac_core's on the same risk matrix (tested); soft ratios may
differ by one ulp (``exp``). Used inside model forwards by the HF runtime
(sedac-bench) and by sedac-vllm.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

RULES = ("threshold", "confidence")


class TorchCascade:
    """Decision parameters as tensors: ``thresholds`` can be updated in place
    (adaptive mode) without re-creating the object."""

    def __init__(self, thresholds: Sequence[float], rule: str = "threshold",
                 exit_rates: Optional[Sequence[float]] = None, weights: Optional[Sequence[float]] = None,
                 decay: float = 0.9, soft_exit: bool = False, device: Optional[torch.device] = None) -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        c = len(thresholds)
        if c == 0:
            raise ValueError("thresholds must have at least one value")
        if any(not (t > 0) for t in thresholds):
            raise ValueError(f"thresholds must be > 0, got {list(thresholds)}")
        if rule == "confidence" and exit_rates is None:
            raise ValueError("exit_rates are required with rule='confidence'")
        self.rule = rule
        self.thresholds = torch.tensor(list(thresholds), dtype=torch.float32, device=device)
        self.targets = torch.tensor(list(exit_rates) if exit_rates is not None else [0.0] * c,
                                    dtype=torch.float32, device=device)
        self.weights = torch.tensor(list(weights) if weights is not None else [1.0] * c,
                                    dtype=torch.float32, device=device)
        if self.targets.numel() != c or self.weights.numel() != c:
            raise ValueError(f"{c} thresholds but {self.targets.numel()} exit rates and "
                             f"{self.weights.numel()} weights")
        self.decay = torch.tensor(decay, dtype=torch.float32, device=device)
        self.soft_exit = bool(soft_exit)

    @property
    def checkpoints(self) -> int:
        return int(self.thresholds.numel())

    def to(self, device: torch.device) -> "TorchCascade":
        for name in ("thresholds", "targets", "weights", "decay"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def step(self, i: int, risk: torch.Tensor, acc: torch.Tensor):
        """Checkpoint ``i``: returns (exit_here bool[rows], new accumulated
        confidence float32[rows], soft ratio float32[rows])."""
        risk = risk.float()
        thr = self.thresholds[i]
        local = (thr - risk) / thr
        acc = acc * self.decay + local * self.weights[i]
        if self.rule == "threshold":
            hit = risk < thr
        else:
            hit = acc >= self.targets[i]
        if self.soft_exit:
            ratio = 1.0 / (1.0 + torch.exp(2.0 - 4.0 * acc))
            soft = torch.where(acc > 0, ratio, torch.zeros_like(ratio))
        else:
            soft = torch.zeros_like(acc)
        return hit, acc, soft

    def evaluate(self, risk: torch.Tensor):
        """Whole-matrix form (``[tokens, checkpoints]``), as sedac_core's
        ``evaluate``: (exit_checkpoint int32, confidence, soft_ratio)."""
        n, c = risk.shape
        acc = torch.zeros(n, dtype=torch.float32, device=risk.device)
        exit_cp = torch.full((n,), -1, dtype=torch.int32, device=risk.device)
        confs: List[torch.Tensor] = []
        softs: List[torch.Tensor] = []
        for i in range(c):
            hit, acc, soft = self.step(i, risk[:, i], acc)
            exit_cp = torch.where((exit_cp < 0) & hit, torch.full_like(exit_cp, i), exit_cp)
            confs.append(acc)
            softs.append(soft)
        return exit_cp, torch.stack(confs, 1), torch.stack(softs, 1)


class ProbeDecider:
    """V6 decider for :class:`sedac_monitor.engine.SkipRuntime`: at checkpoint
    layers, applies the probe to the residual stream and advances the cascade.

    An exited token skips the MLPs of every later layer below
    ``num_layers - protect_last``. With soft exit, a token that has not exited
    computes only a fraction ``1 - soft_ratio`` of the MLP channels of the
    layers after a checkpoint. ``last_risk`` keeps the risks of the last
    forward (``[rows, checkpoints]``, NaN where not reached) for adaptive
    threshold updates.
    """

    def __init__(self, bank, cascade: TorchCascade, num_layers: int, protect_last: int = 0) -> None:
        if len(bank.layers) != cascade.checkpoints:
            raise ValueError(f"{len(bank.layers)} probes but {cascade.checkpoints} thresholds")
        if bank.layers[-1] >= num_layers:
            raise ValueError(f"probe layer {bank.layers[-1]} is outside a model of {num_layers} layers")
        self.bank = bank
        self.cascade = cascade
        self.num_layers = int(num_layers)
        self.protect_last = int(protect_last)
        self._index = {layer: i for i, layer in enumerate(bank.layers)}
        self._end = self.num_layers - self.protect_last
        self.last_risk: Optional[torch.Tensor] = None

    def begin(self, stream: torch.Tensor) -> None:
        rows = stream.shape[0]
        dev = stream.device
        self.acc = torch.zeros(rows, dtype=torch.float32, device=dev)
        self.exit_layer = torch.full((rows,), -1, dtype=torch.int32, device=dev)
        self.soft = torch.zeros(rows, dtype=torch.float32, device=dev)
        self.risk = torch.full((rows, self.cascade.checkpoints), float("nan"), dtype=torch.float32, device=dev)
        self._seen = -1

    def after_layer(self, layer: int, stream: torch.Tensor) -> None:
        i = self._index.get(layer)
        if i is None:
            return
        risk = self.bank.risk_at(i, stream)
        self.risk[:, i] = risk
        hit, self.acc, soft = self.cascade.step(i, risk, self.acc)
        self.exit_layer = torch.where((self.exit_layer < 0) & hit, torch.full_like(self.exit_layer, layer),
                                      self.exit_layer)
        self.soft = soft
        self._seen = layer
        if i == self.cascade.checkpoints - 1:
            self.last_risk = self.risk

    def plan(self, layer: int):
        if self._seen < 0 or layer >= self._end:
            return None, None
        skip = (self.exit_layer >= 0) & (self.exit_layer < layer)
        keep = 1.0 - self.soft if self.cascade.soft_exit else None
        return skip, keep
