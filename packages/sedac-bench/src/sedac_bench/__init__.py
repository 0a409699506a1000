"""sedac_bench: Benchmarks, baselines, plots and reports for SEDAC on a bundled real model.

This package is a placeholder that installs and versions correctly; its
features arrive with its own issue (see the repository README).
"""

from importlib import metadata as _metadata

__version__ = _metadata.version("sedac-bench")

__all__ = ["__version__"]
