"""sedac_monitor: V7: zero-shot cosine-similarity exit monitor for Hugging Face decoder models.

This package is a placeholder that installs and versions correctly; its
features arrive with its own issue (see the repository README).
"""

from importlib import metadata as _metadata

__version__ = _metadata.version("sedac-monitor")

__all__ = ["__version__"]
