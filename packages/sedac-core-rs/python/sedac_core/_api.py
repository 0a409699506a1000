"""The public API. All argument checking lives here, shared by both backends,
so a bad input gets the same exception type and message whichever backend runs.

Conventions
-----------
* Arrays are converted to C-contiguous float32 (float64 inputs are rounded to
  float32, non-contiguous inputs are copied); non-numeric dtypes are rejected.
* A *checkpoint* or *exit layer* ``l`` means the residual stream after decoder
  layer ``l`` (0-based). Exiting there skips the MLP of layers
  ``l+1 .. num_layers-protect_last-1``.
* NaN risk never exits. Under the V6.1 confidence rule a NaN makes the
  accumulated confidence NaN, so the token cannot exit at that checkpoint or
  any later one; under the V6.0 threshold rule only that checkpoint is lost.
  ``+inf`` risk never exits; ``-inf`` risk exits (infinite confidence).
* NaN similarity breaks a V7 run. Non-finite risks are ignored by calibration
  and by adaptive threshold updates.
"""

from __future__ import annotations

import math
import numbers
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union, cast

import numpy as np

from . import _backend

MIN_THRESHOLD = 1e-6
"""Thresholds never go below this (a zero threshold would divide by zero)."""

RULES = {"threshold": 0, "confidence": 1}
SCOPES = ("cascade", "per_layer")
"""What a run of K high similarities does: ``cascade`` exits the token (every later MLP skipped),
``per_layer`` skips each layer's MLP while the run lasts."""
_STATE_FORMAT = "sedac_core.ProbeController"
_STATE_VERSION = 1

# ---------------------------------------------------------------------------
# argument checks


def _real(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf,
          lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{name} must be finite, got {v!r}")
    with np.errstate(over="ignore"):
        f32 = float(np.float32(v))  # what the kernels will see
    if math.isinf(f32) or (v != 0 and f32 == 0 and lo_open):
        raise ValueError(f"{name} must be representable as float32, got {v!r}")
    below = v <= lo if lo_open else v < lo
    above = v >= hi if hi_open else v > hi
    if below or above:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{lo:g}, {hi:g}{right}, got {v!r}")
    return v


def _int(name: str, value: Any, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = cast(int, value)  # any Integral (numpy's too); typeshed's numbers.Integral does not compare with int
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if value >= 2**62:
        raise ValueError(f"{name} must be < 2**62, got {value}")
    return int(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return bool(value)


def _choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _matrix(name: str, value: Any, shape_doc: str, columns: Optional[int] = None,
            column_doc: str = "columns") -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real-valued array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array {shape_doc}, got shape {arr.shape}")
    if columns is not None and arr.shape[1] != columns:
        raise ValueError(f"{name} has {arr.shape[1]} columns but {columns} {column_doc} are configured")
    with np.errstate(over="ignore"):
        return np.require(arr, dtype=np.float32, requirements=("C", "A"))


def _vector(name: str, values: Any, length: int, lo: float = -math.inf, hi: float = math.inf,
            lo_open: bool = False) -> Tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    out = tuple(_real(f"{name}[{i}]", v, lo, hi, lo_open) for i, v in enumerate(values))
    if len(out) != length:
        raise ValueError(f"{name} has {len(out)} values but {length} are needed")
    return out


def _labels(name: str, value: Any, shape: Tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biu":
        raise TypeError(f"{name} must be a boolean or 0/1 integer array, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape} but the signal has shape {shape}")
    if arr.dtype.kind != "b" and arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0 and 1")
    return np.require(arr, dtype=np.uint8, requirements=("C", "A"))


# ---------------------------------------------------------------------------
# V6 probe rule


@dataclass(frozen=True)
class LayerConfig:
    """One probe checkpoint of a V6 probe rule.

    ``target_exit_rate`` is both the share of tokens the adaptive threshold aims
    to let exit here (V6.0) and the accumulated confidence needed to exit (V6.1),
    as in the seed design.
    """

    layer_idx: int
    target_exit_rate: float
    initial_threshold: float = 1.0
    confidence_weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_idx", _int("layer_idx", self.layer_idx))
        object.__setattr__(self, "target_exit_rate", _real("target_exit_rate", self.target_exit_rate, 0, 1))
        object.__setattr__(self, "initial_threshold",
                           _real("initial_threshold", self.initial_threshold, 0, lo_open=True))
        object.__setattr__(self, "confidence_weight", _real("confidence_weight", self.confidence_weight, 0))


@dataclass(frozen=True)
class ExitDecisions:
    """Per-token decisions of :meth:`ProbeController.evaluate`.

    ``exit_checkpoint[t]`` is the index of the first checkpoint where token ``t``
    exits, -1 for none. ``confidence[t, i]`` is the accumulated confidence C_i
    and ``skip_fraction[t, i]`` the fraction of MLP channels to skip after
    checkpoint ``i`` for a token that has not fully exited (0 with soft exit off
    or C_i <= 0); both are given for every checkpoint.
    """

    exit_checkpoint: np.ndarray
    confidence: np.ndarray
    skip_fraction: np.ndarray
    layers: Tuple[int, ...]

    @property
    def exit_layer(self) -> np.ndarray:
        """Decoder layer index of each token's exit checkpoint, -1 for none."""
        layers = np.asarray(self.layers, dtype=np.int32)
        return np.where(self.exit_checkpoint >= 0, layers[np.maximum(self.exit_checkpoint, 0)], -1).astype(np.int32)


class ProbeController:
    """V6.0 / V6.1 probe decisions with adaptive thresholds.

    Parameters
    ----------
    layers: the checkpoints, in increasing ``layer_idx``.
    alpha: EMA rate of adaptive threshold updates, in (0, 1].
    confidence_decay: gamma in C_i = C_{i-1} * gamma + conf_i * w_i, in [0, 1].
    soft_exit: report soft-exit ratios (otherwise they are zero).
    adaptive: let :meth:`observe` move thresholds.
    warmup_observations: observations counted before thresholds start to move.
    rule: ``"confidence"`` (V6.1: exit when C_i >= target_exit_rate_i) or
        ``"threshold"`` (V6.0: exit when risk_i < threshold_i).
    adaptive_decay: replace gamma by a per-token, per-checkpoint decay (the V6.1 roadmap's
        adaptive decay): gamma_i = clamp01(confidence_decay * (1 - u_i) * (1 + decay_bonus * history)),
        u_i = clamp01(risk_i / threshold_i / 2) — uncertain tokens forget their accumulated confidence —
        and ``history`` an EMA (step ``alpha``) of the exit rate :meth:`observe` sees: a run of exits
        lets confidence last longer. Off by default.
    decay_bonus: the bonus factor, in [0, 1].
    soft_k: steepness of the soft-exit ratio 1 / (1 + exp(-k (C - 0.5))); the default 4 is exactly
        the original tanh(2C - 1) * 0.5 + 0.5.

    ``evaluate`` and ``observe`` may be called from several threads at once.
    The controller uses the backend that was active when it was created.
    """

    def __init__(self, layers: Sequence[LayerConfig], *, alpha: float = 0.1, confidence_decay: float = 0.9,
                 soft_exit: bool = True, adaptive: bool = True, warmup_observations: int = 50,
                 rule: str = "confidence", adaptive_decay: bool = False, decay_bonus: float = 0.0,
                 soft_k: float = 4.0) -> None:
        if isinstance(layers, LayerConfig) or not isinstance(layers, Iterable):
            raise TypeError("layers must be a sequence of LayerConfig")
        layers = tuple(layers)
        if not layers:
            raise ValueError("layers must contain at least one LayerConfig")
        for i, layer in enumerate(layers):
            if not isinstance(layer, LayerConfig):
                raise TypeError(f"layers[{i}] must be a LayerConfig, got {type(layer).__name__}")
        idx = [layer.layer_idx for layer in layers]
        if any(b <= a for a, b in zip(idx, idx[1:])):
            raise ValueError(f"layer_idx values must be strictly increasing, got {idx}")
        self._layers = layers
        self._alpha = _real("alpha", alpha, 0, 1, lo_open=True)
        self._decay = _real("confidence_decay", confidence_decay, 0, 1)
        self._soft = _bool("soft_exit", soft_exit)
        self._adaptive = _bool("adaptive", adaptive)
        self._warmup_observations = _int("warmup_observations", warmup_observations)
        self._rule = _choice("rule", rule, RULES)
        self._adaptive_decay = _bool("adaptive_decay", adaptive_decay)
        self._decay_bonus = _real("decay_bonus", decay_bonus, 0, 1)
        self._soft_k = _real("soft_k", soft_k, 0, 1e6, lo_open=True)
        self._history = 0.0
        self._history_lock = threading.Lock()
        self._targets = np.array([layer.target_exit_rate for layer in layers], dtype=np.float32)
        self._weights = np.array([layer.confidence_weight for layer in layers], dtype=np.float32)
        self._kernel = _backend.kernel()
        self._state = self._kernel.ThresholdState(
            [layer.initial_threshold for layer in layers], self._targets.tolist(),
            float(np.float32(self._alpha)), self._warmup_observations, self._adaptive)

    # -- properties
    @property
    def layers(self) -> Tuple[LayerConfig, ...]:
        return self._layers

    @property
    def layer_indices(self) -> Tuple[int, ...]:
        return tuple(layer.layer_idx for layer in self._layers)

    @property
    def thresholds(self) -> np.ndarray:
        """Current thresholds (float32 copy)."""
        return np.array(self._state.thresholds(), dtype=np.float32)

    @property
    def observations(self) -> int:
        """Non-empty observations seen so far."""
        return int(self._state.observations)

    @property
    def rule(self) -> str:
        return self._rule

    def _risk(self, risk: Any) -> np.ndarray:
        return _matrix("risk", risk, "[tokens, checkpoints]", len(self._layers), "checkpoints")

    def evaluate(self, risk: Any) -> ExitDecisions:
        """Decide every token of ``risk`` (float32 ``[tokens, checkpoints]``)."""
        risk = self._risk(risk)
        n, c = risk.shape
        exit_cp = np.empty(n, dtype=np.int32)
        conf = np.empty((n, c), dtype=np.float32)
        soft = np.empty((n, c), dtype=np.float32)
        thresholds = np.array(self._state.thresholds(), dtype=np.float32)
        self._kernel.evaluate(risk, thresholds, self._targets, self._weights, float(np.float32(self._decay)),
                              RULES[self._rule], self._soft, float(np.float32(self._soft_k)), self._adaptive_decay,
                              float(np.float32(self._decay_bonus)), float(np.float32(self._history)),
                              exit_cp, conf, soft)
        return ExitDecisions(exit_cp, conf, soft, self.layer_indices)

    @property
    def history(self) -> float:
        """EMA of the exit rate :meth:`observe` has seen (the adaptive decay's bonus scales with it)."""
        return self._history

    def observe(self, risk: Any) -> bool:
        """Feed observed risk; after the warm-up, move each threshold towards the
        quantile of the finite risks that gives its target exit rate:
        thr <- max((1 - alpha) * thr + alpha * q, MIN_THRESHOLD).

        An empty batch is not counted. Returns whether any threshold moved.
        """
        risk = self._risk(risk)
        if self._adaptive_decay and risk.shape[0]:
            rate = float(np.mean(self.evaluate(risk).exit_checkpoint >= 0))
            with self._history_lock:
                self._history = float(np.float32((1 - self._alpha) * self._history + self._alpha * rate))
        return bool(self._state.observe(risk))

    # -- persistence
    def state_dict(self) -> Dict[str, Any]:
        """Plain JSON types: configuration, current thresholds and step count."""
        return {
            "format": _STATE_FORMAT,
            "format_version": _STATE_VERSION,
            "layers": [
                {"layer_idx": l.layer_idx, "target_exit_rate": l.target_exit_rate,
                 "initial_threshold": l.initial_threshold, "confidence_weight": l.confidence_weight}
                for l in self._layers
            ],
            "alpha": self._alpha,
            "confidence_decay": self._decay,
            "soft_exit": self._soft,
            "adaptive": self._adaptive,
            "warmup_observations": self._warmup_observations,
            "rule": self._rule,
            "adaptive_decay": self._adaptive_decay,
            "decay_bonus": self._decay_bonus,
            "soft_k": self._soft_k,
            "history": self._history,
            "thresholds": [float(t) for t in self._state.thresholds()],
            "observations": self.observations,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "ProbeController":
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        keys = ("format", "format_version", "layers", "alpha", "confidence_decay", "soft_exit", "adaptive",
                "warmup_observations", "rule", "thresholds", "observations")
        for key in keys:
            if key not in state:
                raise ValueError(f"state_dict is missing {key!r}")
        if state["format"] != _STATE_FORMAT or state["format_version"] != _STATE_VERSION:
            raise ValueError(
                f"state_dict has format {state['format']!r} version {state['format_version']!r}; "
                f"expected {_STATE_FORMAT!r} version {_STATE_VERSION}")
        if not isinstance(state["layers"], Sequence):
            raise TypeError("state_dict 'layers' must be a list")
        layers = []
        for i, layer in enumerate(state["layers"]):
            if not isinstance(layer, Mapping):
                raise TypeError(f"state_dict 'layers'[{i}] must be a mapping")
            layers.append(LayerConfig(**layer))
        ctrl = cls(layers, alpha=state["alpha"], confidence_decay=state["confidence_decay"],
                   soft_exit=state["soft_exit"], adaptive=state["adaptive"],
                   warmup_observations=state["warmup_observations"], rule=state["rule"],
                   # keys added later: optional, so older states still load
                   adaptive_decay=state.get("adaptive_decay", False), decay_bonus=state.get("decay_bonus", 0.0),
                   soft_k=state.get("soft_k", 4.0))
        ctrl._history = _real("state_dict 'history'", state.get("history", 0.0), 0, 1)
        thresholds = _vector("state_dict 'thresholds'", state["thresholds"], len(layers), 0, lo_open=True)
        ctrl._state.set_thresholds(list(thresholds))
        ctrl._state.set_observations(_int("state_dict 'observations'", state["observations"]))
        return ctrl

    def __repr__(self) -> str:
        return (f"ProbeController(layers={self.layer_indices}, rule={self._rule!r}, "
                f"thresholds={[round(t, 4) for t in self._state.thresholds()]}, observations={self.observations})")


# ---------------------------------------------------------------------------
# V7 and calibration


def consecutive_exit(similarity: Any, tau: float, k: int, min_layer: int = 0) -> np.ndarray:
    """V7 rule: per token, the layer at which the first run of ``k`` consecutive
    similarities >= ``tau`` ends, counting only layers >= ``min_layer``; -1 if
    none. ``similarity`` is ``[tokens, layers]``; tau is rounded to float32.
    Returns int32 ``[tokens]``."""
    sim = _matrix("similarity", similarity, "[tokens, layers]")
    tau = _real("tau", tau)
    k = _int("k", k, 1)
    min_layer = _int("min_layer", min_layer)
    out = np.empty(sim.shape[0], dtype=np.int32)
    _backend.kernel().consecutive_exit(sim, float(np.float32(tau)), k, min_layer, out)
    return out


def calibrate_thresholds(risk: Any, target_rates: Sequence[float]) -> np.ndarray:
    """Thresholds that let ``target_rates[i]`` of the tokens exit at checkpoint
    ``i`` under the V6.0 rule: the linear-interpolation quantile of the finite
    risks of each column, floored at ``MIN_THRESHOLD``. Returns float32."""
    risk = _matrix("risk", risk, "[tokens, checkpoints]")
    rates = np.array(_vector("target_rates", target_rates, risk.shape[1], 0, 1), dtype=np.float32)
    out = np.empty(risk.shape[1], dtype=np.float32)
    _backend.kernel().quantiles(risk, rates, out)
    empty = np.flatnonzero(np.isnan(out))
    if empty.size:
        raise ValueError(f"checkpoint {int(empty[0])} has no finite risk values to calibrate from")
    return np.maximum(out, np.float32(MIN_THRESHOLD))


# ---------------------------------------------------------------------------
# replay


@dataclass(frozen=True)
class MonitorRule:
    """A V7 configuration to replay: exit after ``k`` consecutive layers with
    similarity >= ``tau`` (only layers >= ``min_layer`` count); the last
    ``protect_last`` layers always run their MLP. ``scope="per_layer"`` skips a
    layer's MLP only while the run ending at the previous layer is >= k long."""

    tau: float
    k: int = 2
    min_layer: int = 0
    protect_last: int = 0
    scope: str = "cascade"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", _real("tau", self.tau))
        object.__setattr__(self, "k", _int("k", self.k, 1))
        object.__setattr__(self, "min_layer", _int("min_layer", self.min_layer))
        object.__setattr__(self, "protect_last", _int("protect_last", self.protect_last))
        _choice("scope", self.scope, SCOPES)


@dataclass(frozen=True)
class ProbeRule:
    """A V6 configuration to replay (hard exits): per-checkpoint thresholds,
    ``rule`` as in :class:`ProbeController`; the confidence rule needs
    ``exit_rates`` (weights default to 1)."""

    thresholds: Tuple[float, ...]
    rule: str = "threshold"
    exit_rates: Optional[Tuple[float, ...]] = None
    weights: Optional[Tuple[float, ...]] = None
    decay: float = 0.9
    protect_last: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.thresholds, (str, bytes)) or not isinstance(self.thresholds, Iterable):
            raise TypeError("thresholds must be a sequence of numbers")
        thr = tuple(self.thresholds)
        c = len(thr)
        if c == 0:
            raise ValueError("thresholds must have at least one value")
        object.__setattr__(self, "thresholds", _vector("thresholds", thr, c, 0, lo_open=True))
        _choice("rule", self.rule, RULES)
        if self.exit_rates is None:
            if self.rule == "confidence":
                raise ValueError("exit_rates are required with rule='confidence'")
            rates: Tuple[float, ...] = (0.0,) * c
        else:
            rates = _vector("exit_rates", self.exit_rates, c, 0, 1)
        object.__setattr__(self, "exit_rates", rates)
        weights = (1.0,) * c if self.weights is None else _vector("weights", self.weights, c, 0)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "decay", _real("decay", self.decay, 0, 1))
        object.__setattr__(self, "protect_last", _int("protect_last", self.protect_last))


class Trace:
    """Recorded per-token signals for :func:`replay`.

    Build with :meth:`Trace.similarity` (V7: one column per decoder layer) or
    :meth:`Trace.risk` (V6: one column per checkpoint). ``safe[t, p] = 1`` means
    that cascading from position ``p`` (skipping every later unprotected MLP)
    keeps the full model's top-1 for token ``t``; ``protect_last`` is the value
    under which those labels were recorded.
    """

    def __init__(self, signal: np.ndarray, kind: str, layers: Tuple[int, ...], num_layers: int,
                 safe: Optional[np.ndarray], protect_last: int) -> None:
        self.signal = signal
        self.kind = kind
        self.layers = layers
        self.num_layers = num_layers
        self.safe = safe
        self.protect_last = protect_last

    @property
    def tokens(self) -> int:
        return int(self.signal.shape[0])

    @classmethod
    def similarity(cls, similarity: Any, safe: Any = None, protect_last: int = 0) -> "Trace":
        sim = _matrix("similarity", similarity, "[tokens, layers]")
        if sim.shape[1] == 0:
            raise ValueError("similarity must have at least one layer column")
        labels = None if safe is None else _labels("safe", safe, sim.shape)
        return cls(sim, "similarity", tuple(range(sim.shape[1])), sim.shape[1], labels,
                   _int("protect_last", protect_last))

    @classmethod
    def risk(cls, risk: Any, layers: Sequence[int], num_layers: int, safe: Any = None,
             protect_last: int = 0) -> "Trace":
        num_layers = _int("num_layers", num_layers, 1)
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise TypeError("layers must be a sequence of layer indices")
        layers = tuple(_int(f"layers[{i}]", l) for i, l in enumerate(layers))
        if not layers:
            raise ValueError("layers must name at least one checkpoint layer")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"layers must be strictly increasing, got {list(layers)}")
        if layers[-1] >= num_layers:
            raise ValueError(f"checkpoint layer {layers[-1]} is outside a model of {num_layers} layers")
        arr = _matrix("risk", risk, "[tokens, checkpoints]", len(layers), "checkpoint layers")
        labels = None if safe is None else _labels("safe", safe, arr.shape)
        return cls(arr, "risk", layers, num_layers, labels, _int("protect_last", protect_last))


ReplayTable = Dict[str, np.ndarray]


def replay(trace: Trace, configs: Sequence[Union[MonitorRule, ProbeRule]]) -> ReplayTable:
    """Evaluate many configurations over one trace at once.

    Returns a table (dict of equal-length numpy columns, one row per config):
    ``exits`` (tokens that skipped at least one MLP), ``skipped_layers`` (MLP
    blocks skipped in total), ``unsafe_exits`` (exits at a position labelled
    unsafe), and the rates ``exit_rate`` = exits / tokens, ``skipped_mlp`` =
    skipped_layers / (tokens * num_layers) and ``disagreement`` =
    unsafe_exits / tokens. ``disagreement`` is NaN where the labels say nothing:
    no labels, or ``scope="per_layer"`` (not a cascade). Rates are NaN for an
    empty trace.

    Replay assumes the recorded signals of the unmodified model: for a cascade
    they are exact up to the exit; what the model does after skips is measured
    by running it (sedac-monitor / sedac-bench), not here.
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a Trace, got {type(trace).__name__}")
    if isinstance(configs, (MonitorRule, ProbeRule)) or not isinstance(configs, Iterable):
        raise TypeError("configs must be a sequence of MonitorRule or ProbeRule")
    if trace.kind == "similarity":
        trace = Trace.similarity(trace.signal, trace.safe, trace.protect_last)
    elif trace.kind == "risk":
        trace = Trace.risk(trace.signal, trace.layers, trace.num_layers, trace.safe, trace.protect_last)
    else:
        raise ValueError(f"trace.kind must be 'similarity' or 'risk', got {trace.kind!r}")
    configs = list(configs)
    wanted = MonitorRule if trace.kind == "similarity" else ProbeRule
    for i, cfg in enumerate(configs):
        if not isinstance(cfg, wanted):
            raise TypeError(f"configs[{i}] is a {type(cfg).__name__} but a {trace.kind} trace needs {wanted.__name__}")
        labelled = trace.safe is not None and not (isinstance(cfg, MonitorRule) and cfg.scope == "per_layer")
        if labelled and cfg.protect_last != trace.protect_last:
            raise ValueError(f"configs[{i}].protect_last={cfg.protect_last} but the trace's safe labels were "
                             f"recorded with protect_last={trace.protect_last}")
        if isinstance(cfg, ProbeRule) and len(cfg.thresholds) != len(trace.layers):
            raise ValueError(f"configs[{i}] has {len(cfg.thresholds)} thresholds but the trace has "
                             f"{len(trace.layers)} checkpoints")
    m = len(configs)
    exits = np.zeros(m, dtype=np.int64)
    skipped = np.zeros(m, dtype=np.int64)
    unsafe = np.zeros(m, dtype=np.int64)
    protect = np.array([cfg.protect_last for cfg in configs], dtype=np.int64)
    kernel = _backend.kernel()
    if trace.kind == "similarity":
        monitor_rules = cast(List[MonitorRule], configs)  # all checked above
        kernel.replay_monitor(
            trace.signal, trace.safe,
            np.array([cfg.tau for cfg in monitor_rules], dtype=np.float32),
            np.array([cfg.k for cfg in monitor_rules], dtype=np.int64),
            np.array([cfg.min_layer for cfg in monitor_rules], dtype=np.int64),
            protect,
            np.array([cfg.scope == "per_layer" for cfg in monitor_rules], dtype=np.uint8),
            exits, skipped, unsafe)
        measurable = np.array([trace.safe is not None and cfg.scope == "cascade" for cfg in monitor_rules], dtype=bool)
    else:
        probe_rules = cast(List[ProbeRule], configs)  # all checked above
        c = len(trace.layers)

        def stack(attr: str) -> np.ndarray:
            return np.array([getattr(cfg, attr) for cfg in configs], dtype=np.float32).reshape(m, c)

        kernel.replay_probe(
            trace.signal, trace.safe, np.array(trace.layers, dtype=np.int64), trace.num_layers,
            stack("thresholds"), stack("exit_rates"), stack("weights"),
            np.array([cfg.decay for cfg in probe_rules], dtype=np.float32),
            np.array([RULES[cfg.rule] for cfg in probe_rules], dtype=np.uint8),
            protect, exits, skipped, unsafe)
        measurable = np.full(m, trace.safe is not None, dtype=bool)
    n = trace.tokens
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = np.float64(n) if n else np.nan
        return {
            "exits": exits,
            "skipped_layers": skipped,
            "unsafe_exits": unsafe,
            "exit_rate": exits / denom,
            "skipped_mlp": skipped / (denom * trace.num_layers),
            "disagreement": np.where(measurable, unsafe / denom, np.nan),
        }


# ---------------------------------------------------------------------------
# channel soft exit's MLP


class GatedMlp(NamedTuple):
    """What :func:`gated_mlp` returns: the output, and how many channels some row kept (so how many rows of
    each weight matrix were read)."""

    out: np.ndarray
    kept_input: int
    kept_inner: int


def channel_major(gate_up_weight: Any, down_weight: Any) -> Tuple[np.ndarray, np.ndarray]:
    """A gated MLP's weights in the layout :func:`gated_mlp` reads, from torch's ``[out, in]`` layout:
    ``gate_up_weight`` ``[2 * inter, hidden]`` (gate rows first, as vLLM's merged ``gate_up_proj``) and
    ``down_weight`` ``[hidden, inter]`` become ``[hidden, 2 * inter]`` and ``[inter, hidden]``, float32,
    C-contiguous (copies: keep them, this is not for every call)."""
    gu = _matrix("gate_up_weight", gate_up_weight, "[2 * inter, hidden]")
    dn = _matrix("down_weight", down_weight, "[hidden, inter]")
    if gu.shape[0] % 2 or gu.shape != (2 * dn.shape[1], dn.shape[0]):
        raise ValueError(f"gate_up_weight must be [2 * inter, hidden] and down_weight [hidden, inter]; got "
                         f"{list(gu.shape)} and {list(dn.shape)}")
    return np.ascontiguousarray(gu.T), np.ascontiguousarray(dn.T)


def _weights(name: str, arr: Any, shape: Tuple[int, int], doc: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.ndim != 2 or not arr.flags.c_contiguous:
        what = f"{type(arr).__name__}" if not isinstance(arr, np.ndarray) else (
            f"a {arr.ndim}-D {arr.dtype} array{'' if arr.flags.c_contiguous else ', not C-contiguous'}")
        raise TypeError(f"{name} must be a C-contiguous 2-D float32 array {doc} (channel_major() makes one; "
                        f"weights are never copied per call), got {what}")
    if arr.shape != shape:
        raise ValueError(f"{name} must be {doc} = {list(shape)}, got {list(arr.shape)}")
    return arr


def gated_mlp(x: Any, gate_up: np.ndarray, down: np.ndarray, t_in: float = 0.0, t_mid: float = 0.0, *,
              out: Optional[np.ndarray] = None) -> GatedMlp:
    """A gated MLP (``down(silu(gate) * up)``, SiLU as torch computes it) with channel soft exit's masks: each
    row's entries of ``x`` below ``t_in`` in magnitude, and of the down projection's input below ``t_mid``,
    count as zero (NaN entries are kept; a threshold of 0 keeps every entry).

    The Rust backend reads only the weights of channels some row keeps (``gate_up`` and ``down`` channel-major,
    see :func:`channel_major`), so its time falls with the work where the weights' reads bound it (one or two
    rows); the numpy backend runs the masked dense MLP. Both give the same values up to float rounding.
    ``x`` is ``[rows, hidden]``; ``out`` (optional, float32 ``[rows, hidden]``) is written and returned."""
    xs = _matrix("x", x, "[rows, hidden]")
    rows, hidden = xs.shape
    if not isinstance(down, np.ndarray) or down.ndim != 2:
        _weights("down", down, (0, hidden), "[inter, hidden]")
    inter = down.shape[0]
    gu = _weights("gate_up", gate_up, (hidden, 2 * inter), "[hidden, 2 * inter]")
    dn = _weights("down", down, (inter, hidden), "[inter, hidden]")
    lo = _real("t_in", t_in, 0.0)
    mid = _real("t_mid", t_mid, 0.0)
    if out is None:
        out = np.empty((rows, hidden), dtype=np.float32)
    elif not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (rows, hidden) \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writable C-contiguous float32 array of shape {[rows, hidden]}")
    kept = _backend.kernel().gated_mlp(xs, gu, dn, float(np.float32(lo)), float(np.float32(mid)), out)
    return GatedMlp(out, int(kept[0]), int(kept[1]))


def set_parallel_for(address: Optional[int]) -> None:
    """Where :func:`gated_mlp`'s parallel tasks run: on rayon's thread pool (``None``, the default), or through
    the C function at ``address``, which must have the signature and contract of torch's
    ``torch_parallel_for`` (exported by ``libtorch_cpu`` since torch 2.10: ``int32 f(int64 begin, int64 end,
    int64 grain_size, void (*body)(int64, int64, void *), void *ctx)``, 0 on success) and stay loaded while
    the process runs. Inside a serving engine that puts the tasks on the engine's own intra-op threads, with
    the thread count and CPU binding the engine chose, rather than on a second pool competing with the first
    for the same cores. Process-wide. The numpy backend has no tasks (numpy's matmul computes it) and keeps
    nothing. The results are the same either way: the tasks are fixed by the kept channels, not the threads."""
    if address is not None and (isinstance(address, bool) or not isinstance(address, int) or address <= 0):
        raise ValueError(f"address must be None or a function's address (an int > 0), got {address!r}")
    _backend.kernel().set_parallel_for(address or 0)


def parallel_for() -> str:
    """Where :func:`gated_mlp`'s tasks run now: ``"rayon"``, ``"external"`` (see :func:`set_parallel_for`) or,
    on the numpy backend, ``"numpy"``."""
    return str(_backend.kernel().parallel_for())


class ChannelMlp:
    """One gated MLP prepared for :func:`gated_mlp`'s kernel: its weights copied once into the channel-major
    layout (see :func:`channel_major`) and its two thresholds, checked once, so a call checks nothing in
    Python (a serving engine calls it once per layer per forward; :func:`gated_mlp` spends about 10 µs a
    call on its checks). The backend is the one active when it was made."""

    def __init__(self, gate_up_weight: Any, down_weight: Any, t_in: float = 0.0, t_mid: float = 0.0) -> None:
        self.gate_up, self.down = channel_major(gate_up_weight, down_weight)
        self.t_in = float(np.float32(_real("t_in", t_in, 0.0)))
        self.t_mid = float(np.float32(_real("t_mid", t_mid, 0.0)))
        self._kernel = _backend.kernel()

    def with_thresholds(self, t_in: float, t_mid: float) -> "ChannelMlp":
        """The same weights (shared, not copied) with other thresholds."""
        other = object.__new__(ChannelMlp)
        other.gate_up, other.down, other._kernel = self.gate_up, self.down, self._kernel
        other.t_in = float(np.float32(_real("t_in", t_in, 0.0)))
        other.t_mid = float(np.float32(_real("t_mid", t_mid, 0.0)))
        return other

    @property
    def hidden(self) -> int:
        return int(self.down.shape[1])

    @property
    def inter(self) -> int:
        return int(self.down.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the channel-major weights (a copy beside the caller's own)."""
        return int(self.gate_up.nbytes + self.down.nbytes)

    def __call__(self, x: np.ndarray, out: np.ndarray) -> Tuple[int, int]:
        """Write the MLP of ``x`` into ``out`` (both C-contiguous float32 ``[rows, hidden]``: the kernel
        rejects anything else with a TypeError or ValueError, it converts nothing); return the channels some
        row kept, of the input and of the down projection's input."""
        return self._kernel.gated_mlp(x, self.gate_up, self.down, self.t_in, self.t_mid, out)

    def __repr__(self) -> str:
        return (f"ChannelMlp(hidden={self.hidden}, inter={self.inter}, t_in={self.t_in:g}, "
                f"t_mid={self.t_mid:g})")
