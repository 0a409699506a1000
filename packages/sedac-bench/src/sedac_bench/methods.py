"""The methods the bench compares, each as a decider for sedac-monitor's SkipRuntime.

SEDAC methods use the packages' own decision code (``MonitorDecider``,
``ProbeDecider``); the baselines are defined here:

* **static layer dropping** (ShortGPT-style): the MLPs of the layers whose
  input and output residual streams are most similar (mean cosine over a
  calibration text) are dropped for every token;
* **random per-token skipping at the same rate**: each token skips each
  layer's MLP at random with the probability the SEDAC method skipped that
  layer (same expected work per layer, random tokens);
* **oracle**: per token, the earliest cascade exit whose forced-exit label says
  the full model's top-1 survives (tokens judged independently) — the ceiling
  any cascade signal could approach.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, List, Optional, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


class StaticDropDecider:
    """Every row skips the MLP of the layers in ``drop``."""

    monotone = False
    wants_positions = False
    step_layers: FrozenSet[int] = frozenset()  # decides from the layer index alone

    def __init__(self, drop: Sequence[int]) -> None:
        self.drop = set(int(x) for x in drop)

    def start(self, stream: torch.Tensor) -> torch.Tensor:
        return torch.ones(stream.shape[0], dtype=torch.bool, device=stream.device)

    def plan(self, layer: int, state: torch.Tensor):
        return (state, None) if layer in self.drop else (None, None)

    def step(self, layer: int, stream: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return state


class PlannedExitDecider:
    """Per-token cascade exits given in advance: row ``i`` of the ``k``-th forward skips the MLPs of layers
    ``> exit_layers[offset + i]`` (and ``< num_layers - protect_last``); -1 = no exit. Forwards must come in
    the order the plan was made for (each :meth:`start` takes the next rows of the plan)."""

    monotone = False  # a cascade, but declared False: the runtime then never reuses a compaction
    wants_positions = False
    step_layers: FrozenSet[int] = frozenset()

    def __init__(self, exit_layers: ArrayLike, num_layers: int, protect_last: int = 0) -> None:
        self.exit_layers = torch.as_tensor(np.asarray(exit_layers), dtype=torch.int64)
        self.end = num_layers - protect_last
        self.offset = 0

    def start(self, stream: torch.Tensor) -> torch.Tensor:
        n = stream.shape[0]
        exits = self.exit_layers[self.offset:self.offset + n].to(stream.device)
        if exits.numel() != n:
            raise RuntimeError(f"the exit plan has {self.exit_layers.numel()} rows; forward asked for row "
                               f"{self.offset + n}")
        self.offset += n
        return exits

    def plan(self, layer: int, state: torch.Tensor):
        if layer >= self.end:
            return None, None
        return (state >= 0) & (state < layer), None

    def step(self, layer: int, stream: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return state


class RandomSkipDecider:
    """Row r skips layer l's MLP with probability ``rates[l]``, independently (seeded: the generator
    advances with every plan, so a run is reproducible, not each forward on its own)."""

    monotone = False
    wants_positions = False
    step_layers: FrozenSet[int] = frozenset()

    def __init__(self, rates: Sequence[float], seed: int = 0) -> None:
        self.rates = [float(r) for r in rates]
        self.gen = torch.Generator().manual_seed(seed)

    def start(self, stream: torch.Tensor) -> torch.Tensor:
        return torch.empty(stream.shape[0], 0, device=stream.device)  # the rows and their device

    def plan(self, layer: int, state: torch.Tensor):
        rate = self.rates[layer]
        if rate <= 0:
            return None, None
        return (torch.rand(state.shape[0], generator=self.gen) < rate).to(state.device), None

    def step(self, layer: int, stream: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return state


def shortgpt_order(layer_similarity: ArrayLike) -> List[int]:
    """Layers from most to least redundant (highest mean input/output cosine first)."""
    return [int(i) for i in np.argsort(-np.asarray(layer_similarity, dtype=np.float64), kind="stable")]


def layers_for_fraction(order: Sequence[int], fraction: float, num_layers: int) -> List[int]:
    """The first ``n`` layers of ``order`` with ``n/num_layers`` closest to ``fraction`` (at least one if > 0)."""
    n = int(round(fraction * num_layers))
    if fraction > 0:
        n = max(n, 1)
    return sorted(order[:n])


def oracle_exits(safe: np.ndarray, num_layers: int, protect_last: int, protected: np.ndarray) -> np.ndarray:
    """Earliest position whose label is safe and whose exit skips something; -1 where none."""
    last = num_layers - protect_last - 1  # exiting at `last` or later skips nothing
    usable = safe[:, :max(last, 0)].astype(bool)
    first = np.where(usable.any(1), usable.argmax(1), -1)
    first[protected] = -1
    return first


def shuffled_exits(exit_layers: np.ndarray, eligible: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same exit layers assigned to random eligible tokens (same histogram)."""
    out = np.full_like(exit_layers, -1)
    idx = np.flatnonzero(eligible)
    rng = np.random.default_rng(seed)
    out[idx] = exit_layers[idx][rng.permutation(idx.size)]
    return out


@dataclass
class Method:
    """A named way to skip work: ``make()`` returns a fresh decider."""

    name: str
    family: str  # "V7", "V6.0", "V6.1", "baseline", "preset"
    make: Callable[[], Any]
    settings: Dict[str, Any] = field(default_factory=dict)
    protect_first: int = 1
    soft_exit: bool = False
    note: str = ""
    soft_orders: Optional[List[Any]] = None  # per-layer channel order for soft exit (default: data-free)


def monitor_method(name: str, family: str, num_layers: int, tau: float, k: int, min_layer: int = 0,
                   protect_last: int = 0, scope: str = "cascade", protect_first: int = 1, note: str = "") -> Method:
    from sedac_monitor.api import MonitorDecider, monitor_rule

    rule = monitor_rule(num_layers, tau, k, min_layer, protect_last, scope)
    return Method(name, family, lambda: MonitorDecider(rule, num_layers),
                  {"tau": tau, "consecutive_k": k, "min_layer": min_layer, "protect_last": protect_last,
                   "scope": scope}, protect_first, note=note)


def probe_method(name: str, family: str, probes: Any, num_layers: int, thresholds: Optional[Sequence[float]],
                 rule: str = "threshold", exit_rates: Optional[Sequence[float]] = None,
                 weights: Optional[Sequence[float]] = None, decay: float = 0.9, soft_exit: bool = False,
                 protect_last: int = 0, note: str = "", adaptive_decay: bool = False, soft_k: float = 4.0,
                 soft_orders: Optional[List[Any]] = None) -> Method:
    from sedac_probes.decide import ProbeDecider, TorchProbeRule

    assert thresholds is not None, f"{name}: the probes are not calibrated"  # ProbeSet.thresholds is None then
    thresholds = [float(t) for t in thresholds]

    def make():
        probe_rule = TorchProbeRule(thresholds, rule, exit_rates, weights, decay, soft_exit,
                               adaptive_decay=adaptive_decay, soft_k=soft_k)
        return ProbeDecider(probes.bank, probe_rule, num_layers, protect_last)

    return Method(name, family, make, {"target": probes.target, "thresholds": [round(t, 5) for t in thresholds],
                                       "rule": rule, "soft_exit": soft_exit, "layers": probes.layers,
                                       "exit_rates": None if exit_rates is None else list(exit_rates),
                                       "adaptive_decay": adaptive_decay, "soft_k": soft_k,
                                       "channel_order": "activation" if soft_orders is not None else "weight"},
                  soft_exit=soft_exit, note=note, soft_orders=soft_orders)
