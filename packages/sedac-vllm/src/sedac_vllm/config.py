"""SEDAC's vLLM configuration: environment variables, validated at start-up.

Every variable is parsed here and nowhere else; a bad value raises
:class:`ConfigError` naming the variable, the value and the accepted form, so
vLLM stops before loading the model. Values from a ``sedac_config.json``
(``SEDAC_CONFIG``, monitor mode) or a probe directory (``SEDAC_PROBE_DIR``)
are defaults that explicit variables override.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

logger = logging.getLogger("sedac_vllm")


class ConfigError(ValueError):
    """A SEDAC environment variable or file is invalid; the message names it."""


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")

# name -> (accepted form, default shown in docs)
VARIABLES: Dict[str, str] = {
    "SEDAC_ENABLED": "0 or 1 (default 0: vLLM untouched)",
    "SEDAC_MODE": "'monitor' (V7) or 'probe' (V6); default: probe if SEDAC_PROBE_DIR is set, else monitor",
    "SEDAC_CONFIG": "path to a sedac_config.json from `sedac-monitor calibrate` (monitor mode)",
    "SEDAC_TAU": "similarity threshold, a number (default 0.98; > 1 disables exits)",
    "SEDAC_CONSECUTIVE_K": "integer >= 1 (default 2)",
    "SEDAC_MIN_LAYER": "integer >= 0: no V7 run counts before this layer (default 0)",
    "SEDAC_SCOPE": "'cascade' (an exited token skips every later MLP) or 'per_layer' (default cascade)",
    "SEDAC_PROTECT_LAST": "integer >= 0: the last N layers always run their MLP (default 0)",
    "SEDAC_PROTECT_FIRST": "integer >= 0: tokens at positions < N never exit (default 1: the attention sink)",
    "SEDAC_PROBE_DIR": "directory written by `sedac-probes train` (probe mode)",
    "SEDAC_PROBE_LAYERS": "comma-separated layers, e.g. 7,14,21; must equal the probe file's (default: the file's)",
    "SEDAC_PROBE_RANK": "integer; must equal the probe file's rank (default: the file's)",
    "SEDAC_THRESHOLDS": "comma-separated numbers > 0, one per probe layer (default: the file's calibrated ones)",
    "SEDAC_EXIT_RATES": "comma-separated numbers in [0, 1], one per probe layer "
                        "(default: the file's, else 0.2,0.6,0.9)",
    "SEDAC_RULE": "'threshold' (V6.0) or 'confidence' (V6.1) (default threshold)",
    "SEDAC_ADAPTIVE": "0 or 1 (default: 0 if the probe file is calibrated, else 1)",
    "SEDAC_CALIBRATION_STEPS": "integer >= 0 (default 50)",
    "SEDAC_CONFIDENCE_DECAY": "number in [0, 1] (default 0.9)",
    "SEDAC_SOFT_EXIT": "0 or 1 (default 0)",
    "SEDAC_SOFT_K": "soft-exit steepness k of 1 / (1 + exp(-k (C - 0.5))), number > 0 (default 4: the original "
                    "tanh form)",
    "SEDAC_ADAPTIVE_DECAY": "0 or 1: per-token adaptive confidence decay, V6.1 (default 0)",
    "SEDAC_DECAY_BONUS": "adaptive decay's bonus for a history of exits, number in [0, 1] (default 0)",
    "SEDAC_LAYER_WEIGHTS": "comma-separated numbers >= 0, one per probe layer (default 0.3,0.4,0.3 for three)",
    "SEDAC_ALPHA": "adaptive EMA step, number in (0, 1] (default 0.1)",
    "SEDAC_HOST_SYNC": "'layer', 'forward' or 'none': how often a plan may be read on the host "
                       "(default: layer on CPU, forward on GPU)",
    "SEDAC_GATHER": "'auto', 'always' or 'never': when a layer where some rows skip runs the MLP on the active rows "
                    "only (gather) instead of on every row with the skipped rows zeroed (masked) (default auto: "
                    "where the MLP time measured at start-up says gathering pays)",
    "SEDAC_DECISION_LOG": "path: append a sampled per-token decision log as JSON lines (default: off)",
    "SEDAC_DECISION_LOG_RATE": "fraction of tokens logged, number in (0, 1] (default 0.01)",
    "SEDAC_DECISION_LOG_MAX_MB": "size bound of the decision log in MB, number > 0 (default 64)",
    "SEDAC_ONLINE": "0 or 1: online calibration with drift detection, monitor mode (default 0)",
    "SEDAC_SHADOW_RATE": "fraction of rows shadow-checked, number in (0, 1] (default 0.05)",
    "SEDAC_RISK_TOLERANCE": "top-1 risk to hold, number in (0, 1) (default: the config's max_risk, else 0.05)",
    "SEDAC_DRIFT_THRESHOLD": "KL divergence that counts as drift, number > 0 (default 0.1)",
    "SEDAC_ONLINE_WINDOW": "checked rows the running estimate spans, integer >= 1 (default 2000)",
    "SEDAC_ONLINE_MARGIN": "how far below the calibrated tau online calibration may loosen, number >= 0 "
                           "(default 0: it only tightens; above 0 is a throughput option, not a safety one)",
    "SEDAC_LOG_EVERY": "integer >= 0: log exit statistics every N forward steps, 0 = never (default 50)",
    "SEDAC_METRICS_FILE": "path the engine writes its statistics to, read by /metrics (default: a temp file)",
    "SEDAC_TRACE": "path: append per-token decisions of every forward as JSON lines (debugging, tests)",
}


def _bad(name: str, value: str) -> ConfigError:
    return ConfigError(f"{name}={value!r} is not valid: expected {VARIABLES[name]}")


def _get(env: Mapping[str, str], name: str) -> Optional[str]:
    value = env.get(name)
    return None if value is None or value.strip() == "" else value.strip()


def parse_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = _get(env, name)
    if value is None:
        return default
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise _bad(name, value)


def parse_number(env: Mapping[str, str], name: str, default: Optional[float], lo: float = -math.inf,
                 hi: float = math.inf, lo_open: bool = False) -> Optional[float]:
    value = _get(env, name)
    if value is None:
        return default
    try:
        v = float(value)
    except ValueError:
        raise _bad(name, value) from None
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise _bad(name, value)
    return v


def parse_int(env: Mapping[str, str], name: str, default: Optional[int], lo: int = 0) -> Optional[int]:
    value = _get(env, name)
    if value is None:
        return default
    try:
        v = int(value)
    except ValueError:
        raise _bad(name, value) from None
    if v < lo:
        raise _bad(name, value)
    return v


def parse_list(env: Mapping[str, str], name: str, kind=float, lo: float = -math.inf, hi: float = math.inf,
               lo_open: bool = False) -> Optional[List[Any]]:
    value = _get(env, name)
    if value is None:
        return None
    try:
        items = [kind(x) for x in value.split(",")]
    except ValueError:
        raise _bad(name, value) from None
    for v in items:
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            raise _bad(name, value)
    return items


def parse_choice(env: Mapping[str, str], name: str, choices, default: Optional[str]) -> Optional[str]:
    value = _get(env, name)
    if value is None:
        return default
    if value not in choices:
        raise _bad(name, value)
    return value


class _Draft:
    """A mutable copy of a dataclass's defaults, filled in by :meth:`SedacConfig.from_env`, then frozen."""

    def __init__(self, cls: type, **values: Any) -> None:
        for f in fields(cls):
            self.__dict__[f.name] = f.default_factory() if f.default_factory is not MISSING else f.default
        self.__dict__.update(values)
        self.__dict__["_cls"] = cls

    def freeze(self) -> Any:
        return self._cls(**{k: v for k, v in self.__dict__.items() if k != "_cls"})


@dataclass(frozen=True)
class SedacConfig:
    """Everything the vLLM plugin needs, parsed and range-checked (model-independent checks only;
    the model-dependent ones run when the model is built, see :meth:`check_model`). Frozen: parsed once
    per process (:func:`sedac_vllm.plugin.active_config`), then handed to the model as it is."""

    enabled: bool = False
    mode: str = "monitor"
    # monitor (V7)
    tau: float = 0.98
    consecutive_k: int = 2
    min_layer: int = 0
    scope: str = "cascade"
    config_file: Optional[str] = None
    # shared
    protect_last: int = 0
    protect_first: int = 1
    # probe (V6)
    probe_dir: Optional[str] = None
    probe_layers: Optional[List[int]] = None
    probe_rank: Optional[int] = None
    thresholds: Optional[List[float]] = None
    exit_rates: Optional[List[float]] = None
    rule: str = "threshold"
    adaptive: Optional[bool] = None
    calibration_steps: int = 50
    confidence_decay: float = 0.9
    soft_exit: bool = False
    soft_k: float = 4.0
    adaptive_decay: bool = False
    decay_bonus: float = 0.0
    layer_weights: Optional[List[float]] = None
    alpha: float = 0.1
    host_sync: Optional[str] = None
    gather: str = "auto"
    # watching while serving
    decision_log: Optional[str] = None
    decision_log_rate: float = 0.01
    decision_log_max_bytes: int = 64 * 2 ** 20
    online: bool = False
    shadow_rate: float = 0.05
    risk_tolerance: Optional[float] = None
    drift_threshold: float = 0.1
    online_window: int = 2000
    online_margin: float = 0.0  # online calibration only tightens unless a user asks otherwise
    # reporting
    log_every: int = 50
    metrics_file: Optional[str] = None
    trace: Optional[str] = None
    sources: Dict[str, str] = field(default_factory=dict)
    config_json: Dict[str, Any] = field(default_factory=dict)  # the SEDAC_CONFIG file as read (empty: none)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "SedacConfig":
        env = os.environ if env is None else env
        unknown = sorted(k for k in env if k.startswith("SEDAC_") and k not in VARIABLES
                         and k not in ("SEDAC_CORE_BACKEND", "SEDAC_ASSETS", "SEDAC_PROGRESS", "SEDAC_TORCH",
                                       "SEDAC_HYPOTHESIS_PROFILE", "SEDAC_CARGO_SOURCE",
                                       "SEDAC_INVOKED_AS", "SEDAC_VLLM", "SEDAC_VLLM_CUDA"))
        if unknown and parse_bool(env, "SEDAC_ENABLED", False):
            raise ConfigError(f"unknown SEDAC variable(s): {', '.join(unknown)} (known: {', '.join(VARIABLES)})")
        cfg: Any = _Draft(cls, enabled=parse_bool(env, "SEDAC_ENABLED", False))
        if not cfg.enabled:
            return cfg.freeze()
        cfg.probe_dir = _get(env, "SEDAC_PROBE_DIR")
        cfg.config_file = _get(env, "SEDAC_CONFIG")
        cfg.mode = parse_choice(env, "SEDAC_MODE", ("monitor", "probe"), "probe" if cfg.probe_dir else "monitor")
        if cfg.mode == "monitor" and cfg.config_file:
            _monitor_file(cfg, cfg.config_file)
        cfg.tau = parse_number(env, "SEDAC_TAU", cfg.tau)
        cfg.consecutive_k = parse_int(env, "SEDAC_CONSECUTIVE_K", cfg.consecutive_k, 1)
        cfg.min_layer = parse_int(env, "SEDAC_MIN_LAYER", cfg.min_layer)
        cfg.scope = parse_choice(env, "SEDAC_SCOPE", ("cascade", "per_layer"), cfg.scope)
        cfg.protect_last = parse_int(env, "SEDAC_PROTECT_LAST", cfg.protect_last)
        cfg.protect_first = parse_int(env, "SEDAC_PROTECT_FIRST", cfg.protect_first)
        cfg.probe_layers = parse_list(env, "SEDAC_PROBE_LAYERS", int, 0)
        if cfg.probe_layers is not None and any(b <= a for a, b in zip(cfg.probe_layers, cfg.probe_layers[1:])):
            raise _bad("SEDAC_PROBE_LAYERS", env["SEDAC_PROBE_LAYERS"])
        cfg.probe_rank = parse_int(env, "SEDAC_PROBE_RANK", None, 1)
        cfg.thresholds = parse_list(env, "SEDAC_THRESHOLDS", float, 0.0, lo_open=True)
        cfg.exit_rates = parse_list(env, "SEDAC_EXIT_RATES", float, 0.0, 1.0)
        cfg.rule = parse_choice(env, "SEDAC_RULE", ("threshold", "confidence"), cfg.rule)
        adaptive = _get(env, "SEDAC_ADAPTIVE")
        cfg.adaptive = None if adaptive is None else parse_bool(env, "SEDAC_ADAPTIVE", False)
        cfg.calibration_steps = parse_int(env, "SEDAC_CALIBRATION_STEPS", cfg.calibration_steps)
        cfg.confidence_decay = parse_number(env, "SEDAC_CONFIDENCE_DECAY", cfg.confidence_decay, 0.0, 1.0)
        cfg.soft_exit = parse_bool(env, "SEDAC_SOFT_EXIT", cfg.soft_exit)
        cfg.soft_k = parse_number(env, "SEDAC_SOFT_K", cfg.soft_k, 0.0, 1e6, lo_open=True)
        cfg.adaptive_decay = parse_bool(env, "SEDAC_ADAPTIVE_DECAY", cfg.adaptive_decay)
        cfg.decay_bonus = parse_number(env, "SEDAC_DECAY_BONUS", cfg.decay_bonus, 0.0, 1.0)
        cfg.layer_weights = parse_list(env, "SEDAC_LAYER_WEIGHTS", float, 0.0)
        cfg.alpha = parse_number(env, "SEDAC_ALPHA", cfg.alpha, 0.0, 1.0, lo_open=True)
        cfg.host_sync = parse_choice(env, "SEDAC_HOST_SYNC", ("layer", "forward", "none"), None)
        cfg.gather = parse_choice(env, "SEDAC_GATHER", ("auto", "always", "never"), cfg.gather)
        cfg.decision_log = _get(env, "SEDAC_DECISION_LOG")
        cfg.decision_log_rate = parse_number(env, "SEDAC_DECISION_LOG_RATE", cfg.decision_log_rate, 0.0, 1.0,
                                             lo_open=True)
        mb = parse_number(env, "SEDAC_DECISION_LOG_MAX_MB", None, 0.0, lo_open=True)
        if mb is not None:
            cfg.decision_log_max_bytes = int(mb * 2 ** 20)
        cfg.online = parse_bool(env, "SEDAC_ONLINE", cfg.online)
        cfg.shadow_rate = parse_number(env, "SEDAC_SHADOW_RATE", cfg.shadow_rate, 0.0, 1.0, lo_open=True)
        cfg.risk_tolerance = parse_number(env, "SEDAC_RISK_TOLERANCE", cfg.risk_tolerance, 0.0, 1.0, lo_open=True)
        cfg.drift_threshold = parse_number(env, "SEDAC_DRIFT_THRESHOLD", cfg.drift_threshold, 0.0, lo_open=True)
        cfg.online_window = parse_int(env, "SEDAC_ONLINE_WINDOW", cfg.online_window, 1)
        cfg.online_margin = parse_number(env, "SEDAC_ONLINE_MARGIN", cfg.online_margin, 0.0)
        cfg.log_every = parse_int(env, "SEDAC_LOG_EVERY", cfg.log_every)
        cfg.metrics_file = _get(env, "SEDAC_METRICS_FILE")
        cfg.trace = _get(env, "SEDAC_TRACE")
        if cfg.online and cfg.mode != "monitor":
            raise ConfigError("SEDAC_ONLINE=1 works with the V7 monitor (SEDAC_MODE=monitor) only")
        if cfg.mode == "probe":
            if not cfg.probe_dir:
                raise ConfigError("SEDAC_MODE=probe needs SEDAC_PROBE_DIR: the directory written by "
                                  "`sedac-probes train`")
            if not Path(cfg.probe_dir).is_dir():
                raise ConfigError(f"SEDAC_PROBE_DIR={cfg.probe_dir!r} is not a directory")
            _check_probe_file(cfg)
        return cfg.freeze()

    def check_model(self, num_layers: int) -> None:
        """Model-dependent checks (run when the model is built)."""
        if self.protect_last >= num_layers:
            raise ConfigError(f"SEDAC_PROTECT_LAST={self.protect_last} leaves no layer for a {num_layers}-layer model")
        if self.mode == "monitor":
            made_for = self.config_json.get("model", {}).get("num_layers")
            if made_for is not None and made_for != num_layers:
                raise ConfigError(f"SEDAC_CONFIG={self.config_file!r} was calibrated for a {made_for}-layer model, "
                                  f"this model has {num_layers} layers")
            if self.min_layer >= num_layers:
                raise ConfigError(f"SEDAC_MIN_LAYER={self.min_layer} is outside a {num_layers}-layer model "
                                  f"(accepted: 0..{num_layers - 1})")
            if self.consecutive_k > num_layers:
                raise ConfigError(f"SEDAC_CONSECUTIVE_K={self.consecutive_k} exceeds the model's {num_layers} layers")

    def describe(self) -> str:
        if not self.enabled:
            return "SEDAC disabled"
        if self.mode == "monitor":
            return (f"SEDAC monitor: tau={self.tau} K={self.consecutive_k} min_layer={self.min_layer} "
                    f"scope={self.scope} protect_last={self.protect_last} protect_first={self.protect_first}")
        return (f"SEDAC probe: {self.probe_dir} rule={self.rule} soft_exit={self.soft_exit} soft_k={self.soft_k} "
                f"adaptive={self.adaptive} adaptive_decay={self.adaptive_decay} protect_last={self.protect_last} "
                f"protect_first={self.protect_first}")


def _check_probe_file(self: Any) -> None:  # on the draft, in from_env
    """What can be checked without the model: the probe file reads, and the variables that
    describe it agree with it (hidden size, depth and identity are checked when the model is built)."""
    from sedac_probes.io import ProbeFileError, load

    try:
        probes = load(self.probe_dir)
    except ProbeFileError as exc:
        raise ConfigError(f"SEDAC_PROBE_DIR: {exc}") from exc
    if self.probe_layers is not None and self.probe_layers != probes.layers:
        raise ConfigError(f"SEDAC_PROBE_LAYERS={','.join(map(str, self.probe_layers))} does not match the "
                          f"probe file's layers {','.join(map(str, probes.layers))} ({self.probe_dir})")
    if self.probe_rank is not None and self.probe_rank != probes.bank.rank:
        raise ConfigError(f"SEDAC_PROBE_RANK={self.probe_rank} does not match the probe file's rank "
                          f"{probes.bank.rank} ({self.probe_dir})")
    n = len(probes.layers)
    for name, values in (("SEDAC_THRESHOLDS", self.thresholds), ("SEDAC_EXIT_RATES", self.exit_rates),
                         ("SEDAC_LAYER_WEIGHTS", self.layer_weights)):
        if values is not None and len(values) != n:
            raise ConfigError(f"{name} has {len(values)} values but the probes in {self.probe_dir} have "
                              f"{n} layers ({','.join(map(str, probes.layers))})")


def _monitor_file(self: Any, path: str) -> None:  # on the draft, in from_env
    from sedac_monitor.runtime import InputError, load_config

    try:
        data = load_config(path)
    except InputError as exc:
        raise ConfigError(f"SEDAC_CONFIG={path!r}: {exc}") from None
    self.tau, self.consecutive_k, self.min_layer = data["tau"], data["consecutive_k"], data["min_layer"]
    self.protect_last, self.scope = data["protect_last"], data["scope"]
    self.protect_first = data.get("protect_first", self.protect_first)
    self.sources["monitor"] = str(path)
    self.config_json = data
