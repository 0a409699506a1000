"""sedac_monitor: V7 zero-shot exits for Hugging Face decoder models.

``create_universal_accelerator(model, ...)`` skips MLP work per token inside a
``with`` block; ``sedac-monitor calibrate`` finds the setting with the most
skipped work within a risk budget and writes ``sedac_config.json``. The
MLP-skipping runtime (:mod:`sedac_monitor.engine`), the torch V7 rule
(:mod:`sedac_monitor.decide`) and the HF layer layouts
(:mod:`sedac_monitor.layouts`) are shared with sedac-probes and sedac-vllm.
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
