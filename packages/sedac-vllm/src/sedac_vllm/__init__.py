"""sedac_vllm: vLLM plugin: per-token MLP skipping inside vLLM's batched forward.

This package is a placeholder that installs and versions correctly; its
features arrive with its own issue (see the repository README).
"""

from importlib import metadata as _metadata

__version__ = _metadata.version("sedac-vllm")

__all__ = ["__version__"]
