"""V6.0 / V6.1 probe decisions in torch, one checkpoint at a time.

The torch twin of ``sedac_core.ProbeController.evaluate``: the same float32
operations in the same order, so exits and accumulated confidence are
identical to sedac_core's on the same risk matrix (tested); soft ratios may
differ by one ulp (``exp``). Used inside model forwards by the HF runtime
(sedac-bench) and by sedac-vllm.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, List, Optional, Sequence

import torch

RULES = ("threshold", "confidence")


def _clamp01(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1], keeping NaN (as sedac_core does)."""
    return torch.where(x < 0, torch.zeros_like(x), torch.where(x > 1, torch.ones_like(x), x))


class TorchProbeRule:
    """Decision parameters as tensors: ``thresholds`` can be updated in place
    (adaptive thresholds) without re-creating the object."""

    def __init__(self, thresholds: Sequence[float], rule: str = "threshold",
                 exit_rates: Optional[Sequence[float]] = None, weights: Optional[Sequence[float]] = None,
                 decay: float = 0.9, soft_exit: bool = False, device: Optional[torch.device] = None,
                 adaptive_decay: bool = False, decay_bonus: float = 0.0, soft_k: float = 4.0) -> None:
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
        # the V6.1 roadmap's options (see sedac_core.ProbeController): off / the original tanh by default
        if not (0.0 <= decay_bonus <= 1.0):
            raise ValueError(f"decay_bonus must be in [0, 1], got {decay_bonus}")
        if not (soft_k > 0):
            raise ValueError(f"soft_k must be > 0, got {soft_k}")
        self.adaptive_decay = bool(adaptive_decay)
        self.bonus = torch.tensor(decay_bonus, dtype=torch.float32, device=device)
        self.history = torch.zeros((), dtype=torch.float32, device=device)  # updated in place by the caller
        self.soft_k = torch.tensor(soft_k, dtype=torch.float32, device=device)
        # the sedac_core.ProbeController that owns the thresholds (adaptive; see `following`), or None
        self.controller: Any = None

    @classmethod
    def following(cls, controller: Any, device: Optional[torch.device] = None) -> "TorchProbeRule":
        """The decision parameters of an adaptive ``sedac_core.ProbeController``, which owns the
        thresholds: :meth:`observe` feeds it the observed risks and copies its thresholds (and the adaptive
        decay's exit history) into these tensors only when they moved."""
        st = controller.state_dict()
        layers = st["layers"]
        self = cls(st["thresholds"], st["rule"], [lay["target_exit_rate"] for lay in layers],
                   [lay["confidence_weight"] for lay in layers], st["confidence_decay"], st["soft_exit"], device,
                   adaptive_decay=bool(st.get("adaptive_decay", False)), decay_bonus=float(st.get("decay_bonus", 0.0)),
                   soft_k=float(st.get("soft_k", 4.0)))
        self.controller = controller
        self.history.fill_(float(st.get("history", 0.0)))
        return self

    def observe(self, risk: Any) -> bool:
        """Adaptive thresholds: hand a forward's risks (``[rows, checkpoints]``, NaN where not reached) to
        the controller and mirror what moved. Returns whether the thresholds moved."""
        if self.controller is None:
            raise RuntimeError("TorchProbeRule.observe: these thresholds are fixed (no controller follows them)")
        moved = self.controller.observe(risk)
        if moved:
            self.thresholds.copy_(torch.as_tensor(self.controller.thresholds))
        if self.adaptive_decay:
            self.history.fill_(self.controller.history)
        return bool(moved)

    @property
    def checkpoints(self) -> int:
        return int(self.thresholds.numel())

    def to(self, device: torch.device) -> "TorchProbeRule":
        for name in ("thresholds", "targets", "weights", "decay", "bonus", "history", "soft_k"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def step(self, i: int, risk: torch.Tensor, acc: torch.Tensor):
        """Checkpoint ``i``: returns (exit_here bool[rows], new accumulated
        confidence float32[rows], soft ratio float32[rows])."""
        risk = risk.float()
        thr = self.thresholds[i]
        local = (thr - risk) / thr
        if self.adaptive_decay:
            u = _clamp01(risk / thr * 0.5)
            gamma = _clamp01(self.decay * (1.0 - u) * (1.0 + self.bonus * self.history))
        else:
            gamma = self.decay
        acc = acc * gamma + local * self.weights[i]
        if self.rule == "threshold":
            hit = risk < thr
        else:
            hit = acc >= self.targets[i]
        if self.soft_exit:
            ratio = 1.0 / (1.0 + torch.exp(0.5 * self.soft_k - self.soft_k * acc))
            soft = torch.where(acc > 0, ratio, torch.zeros_like(ratio))
        else:
            soft = torch.zeros_like(acc)
        return hit, acc, soft

    def evaluate(self, risk: torch.Tensor):
        """Whole-matrix form (``[tokens, checkpoints]``), as sedac_core's
        ``evaluate``: (exit_checkpoint int32, confidence, skip_fraction)."""
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
    """V6 decider for :class:`sedac_monitor.api.SkipRuntime`: at checkpoint
    layers, applies the probe to the residual stream and advances the probe rule.

    An exited token skips the MLPs of every later layer below
    ``num_layers - protect_last``. With soft exit, a token that has not exited
    computes only a fraction ``1 - skip_fraction`` of the MLP channels of the
    layers after a checkpoint. ``last_risk`` keeps the risks of the last
    forward (``[rows, checkpoints]``, NaN where not reached) for adaptive
    threshold updates.

    A :class:`sedac_monitor.api.Decider` (``start`` / ``step`` / ``plan``,
    pure torch, compiled into vLLM's graph and driven by the HF hooks alike).
    An exited token skips every later MLP (the cascade scope), so ``monotone`` is True. It steps at its checkpoint
    layers only (``step_layers``); :meth:`risk_matrix` reads a forward's risks
    from its state.

    With a ``"fusion"`` bank the decider also follows the V7 similarity of
    consecutive residual streams at every layer (``step_layers`` None) and the
    tokens' positions (``start(stream, positions)``), which the gate reads.
    """

    monotone = True

    def __init__(self, bank, probe_rule: TorchProbeRule, num_layers: int, protect_last: int = 0,
                 exits: bool = True) -> None:
        if len(bank.layers) != probe_rule.checkpoints:
            raise ValueError(f"{len(bank.layers)} probes but {probe_rule.checkpoints} thresholds")
        if bank.layers[-1] >= num_layers:
            raise ValueError(f"probe layer {bank.layers[-1]} is outside a model of {num_layers} layers")
        self.bank = bank
        self.probe_rule = probe_rule
        self.num_layers = int(num_layers)
        self.protect_last = int(protect_last)
        self._index = {layer: i for i, layer in enumerate(bank.layers)}
        self._end = self.num_layers - self.protect_last
        self.exits = bool(exits)  # False: never exits, probes not even run (a calibration that failed its budget)
        self.fused = getattr(bank, "target", None) == "fusion"
        self.wants_positions = self.fused
        # a fused gate follows the similarity of every layer; a plain probe reads its checkpoints only
        self.step_layers: Optional[FrozenSet[int]] = (
            None if self.fused and self.exits else frozenset(bank.layers) if self.exits else frozenset())

    def start(self, stream: torch.Tensor, positions: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        rows = stream.shape[0]
        dev = stream.device
        state = {"acc": torch.zeros(rows, dtype=torch.float32, device=dev),
                 "exit_layer": torch.full((rows,), -1, dtype=torch.int32, device=dev),
                 "soft": torch.zeros(rows, dtype=torch.float32, device=dev),
                 "risks": (), "confs": ()}
        if self.fused:
            from sedac_monitor.api import similarity  # noqa: F401 - fails early if missing

            a = stream.float()
            if positions is None:
                raise ValueError("a fused gate needs the tokens' positions")
            state.update(prev=a, prev_norm2=torch.linalg.vecdot(a, a), s=torch.zeros(rows, device=dev),
                         positions=positions.reshape(-1))
        return state

    def step(self, layer: int, stream: torch.Tensor, state: Dict[str, Any]) -> Dict[str, Any]:
        i = self._index.get(layer)
        if not self.exits:
            return state
        if self.fused:
            from sedac_monitor.api import similarity

            a = stream.float()
            norm2 = torch.linalg.vecdot(a, a)
            s = similarity(a, state["prev"], state["prev_norm2"], norm2)
            s_prev = state["s"] if layer > 0 else s
            state = {**state, "prev": a, "prev_norm2": norm2, "s": s}
            if i is None:
                return state
            risk = self.bank.fused_risk_at(i, stream, s, s_prev, state["positions"])
        elif i is None:
            return state
        else:
            risk = self.bank.risk_at(i, stream)
        hit, acc, soft = self.probe_rule.step(i, risk, state["acc"])
        exit_layer = state["exit_layer"]
        exit_layer = torch.where((exit_layer < 0) & hit, torch.full_like(exit_layer, layer), exit_layer)
        return {**state, "acc": acc, "exit_layer": exit_layer, "soft": soft, "risks": state["risks"] + (risk,),
                "confs": state["confs"] + (acc,)}

    def risk_matrix(self, state: Dict[str, Any]) -> torch.Tensor:
        """``[rows, checkpoints]`` float32 risks of this forward, NaN for checkpoints not reached."""
        risks = list(state["risks"])
        rows = state["acc"].shape[0]
        while len(risks) < self.probe_rule.checkpoints:
            risks.append(torch.full((rows,), float("nan"), dtype=torch.float32, device=state["acc"].device))
        return torch.stack(risks, 1)

    def plan(self, layer: int, state: Dict[str, Any]):
        if not self.exits or layer <= self.bank.layers[0] or layer >= self._end:
            return None, None  # before the first checkpoint or in the protected tail: nobody skips
        exit_layer = state["exit_layer"]
        skip = (exit_layer >= 0) & (exit_layer < layer)
        keep = 1.0 - state["soft"] if self.probe_rule.soft_exit else None
        return skip, keep
