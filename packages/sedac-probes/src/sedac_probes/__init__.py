"""sedac_probes: V6: LREProbes trained on a model's hidden states, calibrated thresholds, safetensors probe files.

This package is a placeholder that installs and versions correctly; its
features arrive with its own issue (see the repository README).
"""

from importlib import metadata as _metadata

__version__ = _metadata.version("sedac-probes")

__all__ = ["__version__"]
