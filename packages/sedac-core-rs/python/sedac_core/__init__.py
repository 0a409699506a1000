"""sedac_core: SEDAC's exit decisions, adaptive thresholds, calibration, trace replay, and channel soft
exit's MLP kernel.

The same API runs on a Rust extension (``sedac_core._native``, pyo3 + rayon) or
on numpy; ``backend()`` says which, ``SEDAC_CORE_BACKEND=auto|rust|python``
chooses. Both give identical decisions on identical inputs.
"""

from ._api import (
    MIN_THRESHOLD,
    SCOPES,
    ChannelMlp,
    ExitDecisions,
    GatedMlp,
    LayerConfig,
    MonitorRule,
    ProbeController,
    ProbeRule,
    Trace,
    calibrate_thresholds,
    channel_major,
    consecutive_exit,
    gated_mlp,
    parallel_for,
    replay,
    set_parallel_for,
)
from ._backend import ENV, __version__, backend, set_backend

ENVIRONMENT = (ENV,)
"""The environment variables sedac_core reads."""

set_backend()

__all__ = [
    "MIN_THRESHOLD",
    "SCOPES",
    "ChannelMlp",
    "ProbeController",
    "ENVIRONMENT",
    "ExitDecisions",
    "GatedMlp",
    "LayerConfig",
    "MonitorRule",
    "ProbeRule",
    "Trace",
    "__version__",
    "backend",
    "calibrate_thresholds",
    "channel_major",
    "consecutive_exit",
    "gated_mlp",
    "parallel_for",
    "replay",
    "set_backend",
    "set_parallel_for",
]
