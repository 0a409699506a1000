"""sedac_core: SEDAC's exit decisions, adaptive thresholds, calibration and trace replay.

The same API runs on a Rust extension (``sedac_core._native``, pyo3 + rayon) or
on numpy; ``backend()`` says which, ``SEDAC_CORE_BACKEND=auto|rust|python``
chooses. Both give identical decisions on identical inputs.
"""

from ._api import (
    MIN_THRESHOLD,
    SCOPES,
    ExitDecisions,
    LayerConfig,
    MonitorRule,
    ProbeController,
    ProbeRule,
    Trace,
    calibrate_thresholds,
    consecutive_exit,
    replay,
)
from ._backend import ENV, __version__, backend, set_backend

ENVIRONMENT = (ENV,)
"""The environment variables sedac_core reads."""

set_backend()

__all__ = [
    "MIN_THRESHOLD",
    "SCOPES",
    "ProbeController",
    "ENVIRONMENT",
    "ExitDecisions",
    "LayerConfig",
    "MonitorRule",
    "ProbeRule",
    "Trace",
    "__version__",
    "backend",
    "calibrate_thresholds",
    "consecutive_exit",
    "replay",
    "set_backend",
]
