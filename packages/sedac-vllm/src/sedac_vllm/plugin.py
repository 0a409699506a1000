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


def register() -> None:
    global _registered
    cfg = SedacConfig.from_env()  # raises ConfigError on any bad value, enabled or not
    if not cfg.enabled:
        return
    check_vllm()  # raises (stopping start-up) for a missing or untested vLLM
    if not os.environ.get("SEDAC_METRICS_FILE"):
        # set before vLLM spawns the engine, so every process agrees on the file
        os.environ["SEDAC_METRICS_FILE"] = os.path.join(tempfile.gettempdir(), f"sedac-metrics-{os.getpid()}.json")
    if _registered:
        return
    from vllm import ModelRegistry

    from . import ops  # noqa: F401 - registers sedac::skip_mlp and sedac::finish

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    from .metrics import install_collector

    install_collector(os.environ["SEDAC_METRICS_FILE"])
    _registered = True
    logger.info("SEDAC enabled: %s (%s)", cfg.describe(), ", ".join(ARCHITECTURES))
