"""``create_universal_accelerator``: V7 exits for a Hugging Face causal LM, as a context manager."""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any, Dict, Optional, Union, cast

import sedac_core

from .attach import HFAttachment
from .decide import MonitorDecider
from .engine import SkipRuntime
from .layouts import find_layout
from .loading import InputError
from .sparsity import ChannelSparsity, attach_channels
from .stats import ExitStats

SCOPES = sedac_core.SCOPES


def _int_arg(name: str, value: Any, lo: int, hi: Optional[int] = None, hi_doc: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = cast(int, value)  # any Integral (numpy's too); typeshed's numbers.Integral does not compare with int
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]{hi_doc}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def monitor_rule(num_layers: int, tau: Any, consecutive_k: Any, min_layer: Any, protect_last: Any,
                 scope: Any) -> sedac_core.MonitorRule:
    """Validate the V7 arguments against a model of ``num_layers`` layers; errors name the argument."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or tau != tau or abs(float(tau)) == float("inf"):
        raise ValueError("tau must be a finite number (similarity threshold in [0, 1]; > 1 disables exits), "
                         f"got {tau!r}")
    k = _int_arg("consecutive_k", consecutive_k, 1, num_layers, f" (the model has {num_layers} layers)")
    lo = _int_arg("min_layer", min_layer, 0, num_layers - 1, f" (the model has {num_layers} layers)")
    pl = _int_arg("protect_last", protect_last, 0, num_layers, f" (the model has {num_layers} layers)")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {scope!r}")
    return sedac_core.MonitorRule(float(tau), k, lo, pl, scope)


class UniversalAccelerator:
    """Skips MLP work per token in an HF causal LM while the context is active.

    Inside ``with accelerator:`` every forward (batched, padded, ``generate()``
    with a KV cache) computes each layer's MLP only for the tokens that have
    not exited; attention always runs. Leaving the context removes every hook
    and class swap, so the model is exactly as before. ``stats`` accumulates
    over all forwards since creation (or :meth:`reset_stats`).
    """

    def __init__(self, model: Any, rule: sedac_core.MonitorRule, protect_first: int = 1,
                 channels: Optional[ChannelSparsity] = None) -> None:
        self.layout = find_layout(model)
        self.rule = rule
        self.channels = channels
        self.runtime = SkipRuntime(MonitorDecider(rule, self.layout.num_layers), self.layout.num_layers,
                                   protect_first)
        self._attachment: Optional[HFAttachment] = None
        # channel soft exit's hooks, entered with the accelerator; its counts accumulate like ``stats``
        self._channels = attach_channels(self.layout, channels) if channels is not None else None

    def __enter__(self) -> "UniversalAccelerator":
        if self._attachment is not None:
            raise RuntimeError("this accelerator is already active")
        if self._channels is not None:
            self._channels.__enter__()
        self._attachment = HFAttachment(self.layout, self.runtime)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._attachment is not None:
            self._attachment.detach()
            self._attachment = None
        if self._channels is not None:
            self._channels.__exit__()

    @property
    def channel_stats(self) -> Optional[Dict[str, Any]]:
        """With channel soft exit (a config's ``channels``): per layer, the fraction of the MLP input's and of
        the down projection input's entries zeroed while active, and the MLP work that saves; else None."""
        if self._channels is None:
            return None
        s_in, s_mid = self._channels.counts.sparsity()
        return {"input_sparsity": s_in, "inner_sparsity": s_mid,
                "mlp_work_saved": self._channels.counts.mlp_work_saved()}

    @property
    def active(self) -> bool:
        return self._attachment is not None

    @property
    def stats(self) -> Dict[str, Any]:
        """tokens seen (padding excluded), skipped-MLP fraction, per-layer skip
        rates and the exit-layer histogram."""
        if self.runtime.stats is None:
            return ExitStats.empty(self.layout.num_layers)
        return self.runtime.stats.as_dict()

    def reset_stats(self) -> None:
        self.runtime.reset_stats()
        if self._channels is not None:
            self._channels.reset_counts()

    def __repr__(self) -> str:
        r = self.rule
        return (f"UniversalAccelerator(tau={r.tau}, consecutive_k={r.k}, min_layer={r.min_layer}, "
                f"protect_last={r.protect_last}, scope={r.scope!r}, active={self.active})")


def create_universal_accelerator(model: Any, tau: float = 0.98, consecutive_k: int = 2, min_layer: int = 0,
                                 protect_last: int = 0, scope: str = "cascade", protect_first: int = 1,
                                 config: Union[None, str, Path, Dict[str, Any]] = None) -> UniversalAccelerator:
    """A V7 accelerator for ``model`` (Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3 layouts).

    The defaults are the original SEDAC documents' (tau 0.98, K 2, cascade from
    layer 0); on a small model they skip most MLP work and change most
    predictions — use ``sedac-monitor calibrate`` and pass its
    ``sedac_config.json`` as ``config`` (its values replace the keyword
    arguments). ``scope``: ``cascade`` (an exited token skips every later MLP)
    or ``per_layer``. ``protect_first``: the first tokens of every sequence
    never exit (the attention sink). A config with ``channels`` (from ``sedac-monitor calibrate
    --channels``) also applies channel soft exit: per token, the MLP's small input entries are zeroed
    (see :mod:`sedac_monitor.sparsity`).
    """
    layout = find_layout(model)
    channels = None
    if config is not None:
        cfg = load_config(config, layout.num_layers)
        if "channels" in cfg:
            channels = ChannelSparsity.from_json(cfg["channels"], layout.num_layers)
        tau, consecutive_k, min_layer = cfg["tau"], cfg["consecutive_k"], cfg["min_layer"]
        protect_last, scope = cfg["protect_last"], cfg["scope"]
        protect_first = cfg.get("protect_first", 1)
    rule = monitor_rule(layout.num_layers, tau, consecutive_k, min_layer, protect_last, scope)
    if isinstance(protect_first, bool) or not isinstance(protect_first, int) or protect_first < 0:
        raise ValueError(f"protect_first must be an integer >= 0, got {protect_first!r}")
    return UniversalAccelerator(model, rule, protect_first, channels)


CONFIG_KEYS = ("tau", "consecutive_k", "min_layer", "protect_last", "scope")


def load_config(config: Union[str, Path, Dict[str, Any]], num_layers: Optional[int] = None) -> Dict[str, Any]:
    """Read and check a ``sedac_config.json`` (path or dict); the one loader of this format (sedac-vllm
    uses it too). Errors are :class:`~sedac_monitor.api.InputError` naming the file and field."""
    source = "config"
    if isinstance(config, (str, Path)):
        path = Path(config)
        source = str(path)
        if not path.is_file():
            raise InputError(f"SEDAC monitor config not found: {path} (expected a sedac_config.json written by "
                             "`sedac-monitor calibrate`)")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InputError(f"{source} must hold a JSON object")
    if "scope" not in config and "mode" in config:
        raise InputError(f"{source} names the exit scope 'mode'; the key is 'scope' (cascade or per_layer): "
                         "rename it, or rewrite the file with `sedac-monitor calibrate`")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise InputError(f"{source} is missing {', '.join(missing)} (expected a sedac_config.json "
                         "written by `sedac-monitor calibrate`)")
    if config.get("format", "sedac_config") != "sedac_config":
        raise InputError(f"{source} is not a sedac_config.json (format {config.get('format')!r})")
    made_for = config.get("model", {}).get("num_layers") if isinstance(config.get("model"), dict) else None
    if num_layers is not None and made_for is not None and made_for != num_layers:
        raise InputError(f"{source} was calibrated for a model with {made_for} layers, "
                         f"but this model has {num_layers}")
    # without the model, the values' types and lower bounds are checked now (the upper ones when it is built)
    layers = num_layers if num_layers is not None else made_for if isinstance(made_for, int) and made_for > 0 \
        else 1 << 20
    try:
        monitor_rule(layers, *(config[k] for k in CONFIG_KEYS))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{source}: {exc}") from exc
    if "channels" in config:
        try:
            ChannelSparsity.from_json(config["channels"], num_layers)
        except InputError as exc:
            raise InputError(f"{source}: {exc}") from None
    return config
