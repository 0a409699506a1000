"""sedac_bench: benchmarks, baselines, plots and reports for SEDAC on a bundled real model.

``sedac-bench assets`` builds the real model and text every package's
integration tests use; ``sedac-bench run`` measures quality, compute and
wall-clock of SEDAC against baselines and writes ``bench-results/report.md``;
``sedac-bench suite`` runs the original SEDAC documents' test suite; ``sedac-bench readme``
regenerates the README's results table from the report.
"""

from importlib import metadata as _metadata

__version__ = _metadata.version("sedac-bench")

__all__ = ["__version__"]
