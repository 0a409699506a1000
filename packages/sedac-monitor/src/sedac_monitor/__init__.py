"""sedac_monitor: V7 zero-shot exits for Hugging Face decoder models.

``create_universal_accelerator(model, ...)`` skips MLP work per token inside a
``with`` block; ``sedac-monitor calibrate`` finds the setting with the most
skipped work within a risk budget and writes ``sedac_config.json``.

One job per module, shared with sedac-probes and sedac-vllm through :mod:`sedac_monitor.api`:
``decide`` (the decider protocol, the V7 rule in torch, the recording and forced-exit deciders), ``engine``
(:class:`~sedac_monitor.engine.SkipRuntime`: a decider's plans applied to MLP calls, host-sync policy),
``stats`` (exit statistics), ``channels`` (soft exit's channel order, truncation and masks), ``patching``
(the MLP class swap), ``attach`` (hooks on a Hugging Face model), ``teacher`` (teacher-forced passes and
cascade labels), ``loading`` (models, text, token windows, progress), ``layouts`` (decoder layouts),
``cost`` (MLP timing and expected speed-ups), ``bound`` (statistical bounds), ``calibrate`` and ``cli``.
"""

from importlib import metadata as _metadata

from .accelerator import UniversalAccelerator, create_universal_accelerator, load_config
from .bound import clopper_pearson_upper
from .decide import MonitorDecider
from .layouts import UnsupportedModelError, find_layout

__version__ = _metadata.version("sedac-monitor")

__all__ = [
    "MonitorDecider",
    "UniversalAccelerator",
    "UnsupportedModelError",
    "__version__",
    "clopper_pearson_upper",
    "create_universal_accelerator",
    "find_layout",
    "load_config",
]
