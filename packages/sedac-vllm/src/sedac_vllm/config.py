"""SEDAC's vLLM configuration: a few environment variables and one file, validated at start-up.

The variables (:data:`VARIABLES`) are what a deployment sets; the settings it rarely changes
(:data:`SETTINGS`) are the ``serving`` object of the ``SEDAC_CONFIG`` file, which may also hold a V7
calibration from ``sedac-monitor calibrate``. Both are parsed here and nowhere else, once per process; a bad
value raises :class:`ConfigError` naming the variable or key, the value and the accepted form, so vLLM stops
before loading the model. A calibration (or a probe directory's calibration) gives defaults that explicit
variables override.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

logger = logging.getLogger("sedac_vllm")


class ConfigError(ValueError):
    """A SEDAC environment variable or file is invalid; the message names it."""


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")

# The environment variables sedac-vllm reads (name -> accepted form, default), the complete list: what a user
# sets per deployment. Everything else is a key of the "serving" object in the SEDAC_CONFIG file (SETTINGS).
VARIABLES: Dict[str, str] = {
    "SEDAC_ENABLED": "0 or 1 (default 0: vLLM untouched)",
    "SEDAC_MODE": "'monitor' (V7) or 'probe' (V6); default: probe if SEDAC_PROBE_DIR is set, else monitor",
    "SEDAC_CONFIG": "path to a sedac_config.json: a V7 calibration from `sedac-monitor calibrate` (monitor mode) "
                    "and/or a \"serving\" object of settings (either mode)",
    "SEDAC_PROBE_DIR": "directory written by `sedac-probes train` (probe mode)",
    "SEDAC_TAU": "similarity threshold, a number (default 0.98; > 1 disables exits)",
    "SEDAC_CONSECUTIVE_K": "integer >= 1 (default 2)",
    "SEDAC_MIN_LAYER": "integer >= 0: no V7 run counts before this layer (default 0)",
    "SEDAC_SCOPE": "'cascade' (an exited token skips every later MLP) or 'per_layer' (default cascade)",
    "SEDAC_PROTECT_LAST": "integer >= 0: the last N layers always run their MLP (default 0)",
    "SEDAC_PROTECT_FIRST": "integer >= 0: tokens at positions < N never exit (default 1: the attention sink)",
    "SEDAC_RULE": "'threshold' (V6.0) or 'confidence' (V6.1) (default threshold)",
    "SEDAC_SOFT_EXIT": "0 or 1 (default 0)",
    "SEDAC_HOST_SYNC": "'layer', 'forward' or 'none': how often a plan may be read on the host "
                       "(default: layer on CPU, forward on GPU)",
    "SEDAC_GATHER": "'auto', 'always' or 'never': when a layer where some rows skip runs the MLP on the active rows "
                    "only (gather) instead of on every row with the skipped rows zeroed (masked) (default auto: "
                    "where the MLP time measured at start-up says gathering pays)",
    "SEDAC_ONLINE": "0 or 1: online calibration with drift detection, monitor mode (default 0)",
    "SEDAC_RISK_TOLERANCE": "top-1 risk to hold, number in (0, 1) (default: the config's max_risk, else 0.05)",
    "SEDAC_DECISION_LOG": "path: append a sampled per-token decision log as JSON lines (default: off)",
    "SEDAC_LOG_EVERY": "integer >= 0: log exit statistics every N forwards, 0 = never (default 50)",
    "SEDAC_METRICS_FILE": "path the engine writes its statistics to, read by /metrics (default: a temp file)",
    "SEDAC_TRACE": "path: append per-token decisions of every forward as JSON lines (debugging, tests)",
}

# The keys of the "serving" object in the SEDAC_CONFIG file (key -> accepted form, default): settings a
# deployment rarely changes. Each was an environment variable before 0.1.0 was released.
SETTINGS: Dict[str, str] = {
    "thresholds": "list of numbers > 0, one per probe layer (default: the probe file's calibrated ones)",
    "exit_rates": "list of numbers in [0, 1], one per probe layer (default: the file's, else [0.2, 0.6, 0.9])",
    "adaptive": "true or false: thresholds learned from traffic (default: false if the probe file is calibrated, "
                "else true)",
    "warmup_observations": "integer >= 0: forwards without exits while adaptive thresholds warm up (default 50)",
    "alpha": "adaptive EMA rate, number in (0, 1] (default 0.1)",
    "confidence_decay": "number in [0, 1] (default 0.9)",
    "layer_weights": "list of numbers >= 0, one per probe layer (default [0.3, 0.4, 0.3] for three)",
    "soft_k": "soft-exit steepness k of 1 / (1 + exp(-k (C - 0.5))), number > 0 (default 4: the original tanh "
              "form)",
    "adaptive_decay": "true or false: per-token adaptive confidence decay, V6.1 (default false)",
    "decay_bonus": "adaptive decay's bonus for a history of exits, number in [0, 1] (default 0)",
    "decision_log_rate": "fraction of tokens the decision log keeps, number in (0, 1] (default 0.01)",
    "decision_log_max_mb": "size bound of the decision log in MB, number > 0 (default 64)",
    "shadow_rate": "fraction of rows shadow-checked by online calibration, number in (0, 1] (default 0.05)",
    "drift_threshold": "KL divergence that counts as drift, number > 0 (default 0.1)",
    "online_window": "rows (and shadow-checked rows) the running risk estimate spans, integer >= 1 (default 2000)",
    "channel_kernel": "'auto', 'always' or 'never': with channel soft exit, whether a layer's MLP runs through the "
                      "kernel that reads only the kept channels' weights (CPU, float32; a channel-major copy of the "
                      "MLP weights): at the batch sizes where it measured faster than the dense MLP at start-up "
                      "(default auto), at every batch size, or never (masked on the dense matrices)",
    "online_margin": "how far below the calibrated tau online calibration may loosen, number >= 0 (default 0: it "
                     "only tightens; above 0 is a throughput option, not a safety one)",
}
MOVED = {"SEDAC_" + k.upper(): k for k in SETTINGS if k != "channel_kernel"}
"""Former variables -> their key in the file's "serving" object (named in the error a stale variable gets)."""
REMOVED = {"SEDAC_PROBE_LAYERS": "the probe file's layers are used", "SEDAC_PROBE_RANK": "the probe file's rank is "
           "used", "SEDAC_MONITOR_MODE": "the exit scope is SEDAC_SCOPE (cascade or per_layer)"}


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

    _cls: type  # set through __dict__ in __init__

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
    thresholds: Optional[List[float]] = None
    exit_rates: Optional[List[float]] = None
    rule: str = "threshold"
    adaptive: Optional[bool] = None
    warmup_observations: int = 50
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
    config_json: Dict[str, Any] = field(default_factory=dict)  # the file's V7 calibration as read (empty: none)
    # channel soft exit from the file's "channels": per layer, the MLP input's and the down projection input's
    # magnitude thresholds (None: every channel computed)
    channels: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None
    # and the sparsities they gave on the calibration text (what the channel kernel is timed at on start-up)
    channel_sparsity: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None
    channel_kernel: str = "auto"

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "SedacConfig":
        env = os.environ if env is None else env
        cfg: Any = _Draft(cls, enabled=parse_bool(env, "SEDAC_ENABLED", False))
        if not cfg.enabled:
            return cfg.freeze()
        _check_names(env)
        cfg.probe_dir = _get(env, "SEDAC_PROBE_DIR")
        cfg.config_file = _get(env, "SEDAC_CONFIG")
        cfg.mode = parse_choice(env, "SEDAC_MODE", ("monitor", "probe"), "probe" if cfg.probe_dir else "monitor")
        serving: Dict[str, Any] = _read_file(cfg, cfg.config_file) if cfg.config_file else {}
        cfg.tau = parse_number(env, "SEDAC_TAU", cfg.tau)
        cfg.consecutive_k = parse_int(env, "SEDAC_CONSECUTIVE_K", cfg.consecutive_k, 1)
        cfg.min_layer = parse_int(env, "SEDAC_MIN_LAYER", cfg.min_layer)
        cfg.scope = parse_choice(env, "SEDAC_SCOPE", ("cascade", "per_layer"), cfg.scope)
        cfg.protect_last = parse_int(env, "SEDAC_PROTECT_LAST", cfg.protect_last)
        cfg.protect_first = parse_int(env, "SEDAC_PROTECT_FIRST", cfg.protect_first)
        cfg.rule = parse_choice(env, "SEDAC_RULE", ("threshold", "confidence"), cfg.rule)
        cfg.soft_exit = parse_bool(env, "SEDAC_SOFT_EXIT", cfg.soft_exit)
        cfg.host_sync = parse_choice(env, "SEDAC_HOST_SYNC", ("layer", "forward", "none"), None)
        cfg.gather = parse_choice(env, "SEDAC_GATHER", ("auto", "always", "never"), cfg.gather)
        cfg.decision_log = _get(env, "SEDAC_DECISION_LOG")
        cfg.online = parse_bool(env, "SEDAC_ONLINE", cfg.online)
        cfg.risk_tolerance = parse_number(env, "SEDAC_RISK_TOLERANCE", cfg.risk_tolerance, 0.0, 1.0, lo_open=True)
        s = _Settings(serving, cfg.config_file)
        cfg.thresholds = s.numbers("thresholds", 0.0, lo_open=True)
        cfg.exit_rates = s.numbers("exit_rates", 0.0, 1.0)
        cfg.adaptive = s.flag("adaptive", None)
        cfg.warmup_observations = s.integer("warmup_observations", cfg.warmup_observations, 0)
        cfg.alpha = s.number("alpha", cfg.alpha, 0.0, 1.0, lo_open=True)
        cfg.confidence_decay = s.number("confidence_decay", cfg.confidence_decay, 0.0, 1.0)
        cfg.layer_weights = s.numbers("layer_weights", 0.0)
        cfg.soft_k = s.number("soft_k", cfg.soft_k, 0.0, 1e6, lo_open=True)
        cfg.adaptive_decay = s.flag("adaptive_decay", cfg.adaptive_decay)
        cfg.decay_bonus = s.number("decay_bonus", cfg.decay_bonus, 0.0, 1.0)
        cfg.decision_log_rate = s.number("decision_log_rate", cfg.decision_log_rate, 0.0, 1.0, lo_open=True)
        mb = s.number("decision_log_max_mb", None, 0.0, lo_open=True)
        if mb is not None:
            cfg.decision_log_max_bytes = int(mb * 2 ** 20)
        cfg.shadow_rate = s.number("shadow_rate", cfg.shadow_rate, 0.0, 1.0, lo_open=True)
        cfg.drift_threshold = s.number("drift_threshold", cfg.drift_threshold, 0.0, lo_open=True)
        cfg.online_window = s.integer("online_window", cfg.online_window, 1)
        cfg.online_margin = s.number("online_margin", cfg.online_margin, 0.0)
        cfg.channel_kernel = s.choice("channel_kernel", cfg.channel_kernel, ("auto", "always", "never"))
        cfg.log_every = parse_int(env, "SEDAC_LOG_EVERY", cfg.log_every)
        cfg.metrics_file = _get(env, "SEDAC_METRICS_FILE")
        cfg.trace = _get(env, "SEDAC_TRACE")
        if cfg.online and cfg.mode != "monitor":
            raise ConfigError("SEDAC_ONLINE=1 works with the V7 monitor (SEDAC_MODE=monitor) only")
        if cfg.channels is not None and cfg.soft_exit:
            raise ConfigError(f"SEDAC_SOFT_EXIT=1 and the channel soft exit of SEDAC_CONFIG={cfg.config_file!r} "
                              "both choose which MLP channels to compute: use one")
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
            if self.channels is not None and len(self.channels[0]) != num_layers:
                raise ConfigError(f"SEDAC_CONFIG={self.config_file!r} has channel thresholds for "
                                  f"{len(self.channels[0])} layers, this model has {num_layers}")

    def describe(self) -> str:
        if not self.enabled:
            return "SEDAC disabled"
        if self.mode == "monitor":
            channels = ""
            if self.channels is not None:  # the thresholds are baked into the graph: their digest joins the key
                digest = hashlib.sha256(repr(self.channels).encode()).hexdigest()[:12]
                channels = f" channels={digest}"
            return (f"SEDAC monitor: tau={self.tau} K={self.consecutive_k} min_layer={self.min_layer} "
                    f"scope={self.scope} protect_last={self.protect_last} protect_first={self.protect_first}"
                    + channels)
        return (f"SEDAC probe: {self.probe_dir} rule={self.rule} soft_exit={self.soft_exit} soft_k={self.soft_k} "
                f"adaptive={self.adaptive} adaptive_decay={self.adaptive_decay} protect_last={self.protect_last} "
                f"protect_first={self.protect_first}")


def _check_probe_file(self: Any) -> None:  # on the draft, in from_env
    """What can be checked without the model: the probe file reads, and the settings given one value per
    probe layer have as many (hidden size, depth and identity are checked when the model is built)."""
    from sedac_probes.io import ProbeFileError, load

    try:
        probes = load(self.probe_dir)
    except ProbeFileError as exc:
        raise ConfigError(f"SEDAC_PROBE_DIR: {exc}") from exc
    n = len(probes.layers)
    for name, values in (("thresholds", self.thresholds), ("exit_rates", self.exit_rates),
                         ("layer_weights", self.layer_weights)):
        if values is not None and len(values) != n:
            raise ConfigError(f"SEDAC_CONFIG={self.config_file!r}: serving.{name} has {len(values)} values but the "
                              f"probes in {self.probe_dir} have {n} layers ({','.join(map(str, probes.layers))})")


def _check_names(env: Mapping[str, str]) -> None:
    """Every SEDAC_* variable set is read by sedac-vllm or by a package it runs on; a variable that moved into
    the config file, was removed, or is one edit away from a known name is an error naming the fix; any other
    (read by SEDAC's offline tools, not while serving) is logged, never silently dropped."""
    import difflib

    import sedac_core
    from sedac_monitor.api import ENVIRONMENT as MONITOR_ENVIRONMENT

    known = set(VARIABLES) | set(sedac_core.ENVIRONMENT) | set(MONITOR_ENVIRONMENT)
    for name in sorted(k for k in env if k.startswith("SEDAC_") and k not in known):
        if name in MOVED:
            raise ConfigError(f"{name} is not an environment variable: set \"{MOVED[name]}\" in the \"serving\" "
                              f"object of the SEDAC_CONFIG file instead (accepted: {SETTINGS[MOVED[name]]})")
        if name in REMOVED:
            raise ConfigError(f"{name} is not a SEDAC variable: {REMOVED[name]}; unset it")
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        if close:
            raise ConfigError(f"unknown SEDAC variable {name} (did you mean {close[0]}?); the variables sedac-vllm "
                              f"reads: {', '.join(VARIABLES)}")
        logger.warning("SEDAC: %s is not read while serving (sedac-vllm reads %s); left alone", name,
                       ", ".join(VARIABLES))


class _Settings:
    """The ``serving`` object of a SEDAC_CONFIG file, read key by key with its type and range checked."""

    def __init__(self, serving: Dict[str, Any], path: Optional[str]) -> None:
        self.serving, self.path = serving, path

    def _bad(self, key: str) -> ConfigError:
        return ConfigError(f"SEDAC_CONFIG={self.path!r}: serving.{key}={self.serving[key]!r} is not valid: "
                           f"expected {SETTINGS[key]}")

    def _in_range(self, key: str, v: Any, lo: float, hi: float, lo_open: bool) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or v > hi \
                or (lo_open and v == lo):
            raise self._bad(key)
        return v

    def number(self, key: str, default: Optional[float], lo: float = -math.inf, hi: float = math.inf,
               lo_open: bool = False) -> Optional[float]:
        if key not in self.serving:
            return default
        return float(self._in_range(key, self.serving[key], lo, hi, lo_open))

    def integer(self, key: str, default: int, lo: int) -> int:
        if key not in self.serving:
            return default
        v = self.serving[key]
        if not isinstance(v, int):
            raise self._bad(key)
        return int(self._in_range(key, v, lo, math.inf, False))

    def flag(self, key: str, default: Optional[bool]) -> Optional[bool]:
        if key not in self.serving:
            return default
        if not isinstance(self.serving[key], bool):
            raise self._bad(key)
        return self.serving[key]

    def choice(self, key: str, default: str, choices: Tuple[str, ...]) -> str:
        if key not in self.serving:
            return default
        if self.serving[key] not in choices:
            raise self._bad(key)
        return str(self.serving[key])

    def numbers(self, key: str, lo: float = -math.inf, hi: float = math.inf,
                lo_open: bool = False) -> Optional[List[float]]:
        if key not in self.serving:
            return None
        v = self.serving[key]
        if not isinstance(v, list) or not v:
            raise self._bad(key)
        return [float(self._in_range(key, x, lo, hi, lo_open)) for x in v]


def _read_file(self: Any, path: str) -> Dict[str, Any]:  # on the draft, in from_env
    """The SEDAC_CONFIG file: its V7 calibration (if any) becomes the monitor's defaults; returns its
    ``serving`` object (settings, checked by :class:`_Settings`)."""
    import json

    if not Path(path).is_file():
        raise ConfigError(f"SEDAC_CONFIG={path!r}: no such file (expected a sedac_config.json: a V7 calibration "
                          "from `sedac-monitor calibrate` and/or a \"serving\" object of settings)")
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"SEDAC_CONFIG={path!r} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"SEDAC_CONFIG={path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"SEDAC_CONFIG={path!r} must hold a JSON object")
    serving = data.get("serving", {})
    if not isinstance(serving, dict):
        raise ConfigError(f"SEDAC_CONFIG={path!r}: \"serving\" must be a JSON object of settings "
                          f"({', '.join(SETTINGS)})")
    unknown = sorted(set(serving) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"SEDAC_CONFIG={path!r}: unknown serving setting(s) {', '.join(unknown)} (known: "
                          f"{', '.join(SETTINGS)})")
    calibration = set(data) - {"serving"}
    if calibration:  # a V7 calibration, alone or with settings
        if self.mode != "monitor":
            raise ConfigError(f"SEDAC_CONFIG={path!r} holds a V7 calibration ({', '.join(sorted(calibration))}), "
                              "which probe mode cannot use: keep only the \"serving\" object in a probe "
                              "deployment's file, or serve the monitor (SEDAC_MODE=monitor)")
        _monitor_file(self, path)
    if serving:
        self.sources["settings"] = str(path)
    return serving


def _monitor_file(self: Any, path: str) -> None:  # on the draft, in from_env
    from sedac_monitor.api import InputError, load_config

    try:
        data = load_config(path)
    except InputError as exc:
        raise ConfigError(f"SEDAC_CONFIG={path!r}: {exc}") from None
    if "channels" in data:
        from sedac_monitor.sparsity import ChannelSparsity

        channels = ChannelSparsity.from_json(data["channels"])  # load_config checked it
        if channels.signal_weight:
            raise ConfigError(f"SEDAC_CONFIG={path!r}: channels.signal_weight {channels.signal_weight} is not "
                              "served by sedac-vllm (thresholds scaled per token by the stream's movement run in "
                              "the Hugging Face accelerator only); recalibrate with --signal-weight 0")
        self.channels = (channels.input_thresholds, channels.inner_thresholds)
        self.channel_sparsity = (channels.input_sparsity, channels.inner_sparsity)
    self.tau, self.consecutive_k, self.min_layer = data["tau"], data["consecutive_k"], data["min_layer"]
    self.protect_last, self.scope = data["protect_last"], data["scope"]
    self.protect_first = data.get("protect_first", self.protect_first)
    self.sources["monitor"] = str(path)
    self.config_json = data
