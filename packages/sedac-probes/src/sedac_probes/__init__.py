"""sedac_probes: V6 LREProbes trained on a model's hidden states, calibrated thresholds, safetensors probe files.

``sedac-probes collect`` -> ``train`` -> ``calibrate`` on the command line; in
code, :func:`load` reads (and validates) a probe directory and
:class:`ProbeBank` applies a model's checkpoint probes inside a forward.
"""

from importlib import metadata as _metadata

from .decide import ProbeDecider, TorchProbeRule
from .io import ProbeFileError, ProbeSet, load, save
from .probe import LREProbe, ProbeBank

__version__ = _metadata.version("sedac-probes")

__all__ = [
    "LREProbe",
    "ProbeBank",
    "ProbeDecider",
    "ProbeFileError",
    "ProbeSet",
    "TorchProbeRule",
    "__version__",
    "load",
    "save",
]
