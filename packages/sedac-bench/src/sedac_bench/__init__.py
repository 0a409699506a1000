"""sedac_bench: Benchmarks, baselines, plots and reports for SEDAC on a bundled real model.

So far: ``sedac-bench assets`` (see :mod:`sedac_bench.assets`), the real model
and text every package's integration tests use. Benchmarks and reports arrive
with their own issue (see the repository README).
"""

from importlib import metadata as _metadata

__version__ = _metadata.version("sedac-bench")

__all__ = ["__version__"]
