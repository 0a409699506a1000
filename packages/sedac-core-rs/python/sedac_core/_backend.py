"""Backend selection: ``SEDAC_CORE_BACKEND=auto|rust|python`` (default ``auto``).

``rust`` when the extension is missing or mismatched is an ImportError; ``auto``
falls back to numpy with one RuntimeWarning. ``set_backend`` switches at run
time (controllers keep the backend they were created with).
"""

from __future__ import annotations

import os
import warnings
from importlib import metadata
from types import ModuleType

ENV = "SEDAC_CORE_BACKEND"
CHOICES = ("auto", "rust", "python")

try:
    __version__ = metadata.version("sedac-core")
except metadata.PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0+unknown"

_active: ModuleType | None = None
_active_name: str | None = None


def _load_native() -> ModuleType:
    from . import _native

    if _native.__version__ != __version__ and __version__ != "0+unknown":
        raise ImportError(
            f"sedac_core._native is version {_native.__version__} but sedac-core is {__version__}; "
            "reinstall sedac-core so both come from the same build"
        )
    return _native


def _load(name: str) -> ModuleType:
    if name == "python":
        from . import _numpy

        return _numpy
    try:
        return _load_native()
    except ImportError as exc:
        raise ImportError(
            f"{ENV}=rust but the Rust extension sedac_core._native cannot be used ({exc}); "
            f"reinstall sedac-core from a wheel or build it with maturin, or set {ENV}=python"
        ) from exc


def parse(value: str | None) -> str:
    """Validate a backend choice (None or empty means ``auto``)."""
    choice = (value or "auto").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={value!r} is not valid; use one of: {', '.join(CHOICES)}")
    return choice


def set_backend(choice: str | None = None) -> str:
    """Select the backend (``auto``, ``rust`` or ``python``; None reads ``SEDAC_CORE_BACKEND``).

    Returns the name of the backend now in use.
    """
    global _active, _active_name
    choice = parse(os.environ.get(ENV) if choice is None else choice)
    if choice == "auto":
        try:
            module, name = _load_native(), "rust"
        except ImportError as exc:
            warnings.warn(
                f"sedac_core: Rust extension unavailable ({exc}); using the numpy backend. "
                f"Set {ENV}=python to silence this warning.",
                RuntimeWarning,
                stacklevel=2,
            )
            module, name = _load("python"), "python"
    else:
        module, name = _load(choice), choice
    _active, _active_name = module, name
    return name


def kernel() -> ModuleType:
    if _active is None:
        set_backend()
    assert _active is not None
    return _active


def backend() -> str:
    """The backend in use: ``"rust"`` or ``"python"``."""
    kernel()
    assert _active_name is not None
    return _active_name
