"""glibc's malloc, told to keep freed memory for reuse (CPU only).

In vLLM's compiled graph on CPU each MLP that may skip rows sits in a ``torch.cond`` branch, and the
compiler plans the memory of a branch on its own: the MLP's intermediate tensors (a prefill forward of 2,048
tokens: 25 MB for the gate/up projection of the bundled SmolLM2) are allocated and freed at every layer,
where vanilla vLLM's single graph reuses one buffer. glibc serves such sizes with fresh ``mmap`` pages and
returns them when freed, so every layer pays page faults again: measured on the bundled SmolLM2, 16
prompts of 128 tokens, 43,000 faults per forward with SEDAC against 2,500 for vanilla vLLM, about 5% of
the forward's time. vLLM's CPU guide recommends a caching allocator (tcmalloc) for the same reason.

:func:`keep_freed_memory` sets ``M_MMAP_MAX = 0`` (serve every allocation from the heap) and a large
``M_TRIM_THRESHOLD`` (do not give freed heap memory back to the system), the same as starting the
process with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``: freed blocks are reused, and the process
keeps its peak memory instead of returning it. It does nothing where the user already chose (any of
those ``MALLOC_*`` variables set, or an allocator preloaded with ``LD_PRELOAD``), or where the C library
is not glibc.
"""

from __future__ import annotations

import ctypes
import os
from typing import Mapping, Optional

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB of free heap before any is returned

ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
"""The same settings as environment variables glibc reads when a process starts."""

USER_CHOICE = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
               "GLIBC_TUNABLES")
"""Environment variables that mean the user configured glibc's malloc: then it is left as they chose."""
_PRELOADED = ("tcmalloc", "jemalloc", "mimalloc")


def user_choice(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """How the user configured the allocator (any of :data:`USER_CHOICE` set, or tcmalloc, jemalloc or mimalloc
    preloaded with ``LD_PRELOAD``), for the log; None where they did not, and it is ours to tune."""
    if any(k in environ for k in USER_CHOICE):
        return "left as configured (MALLOC_* / GLIBC_TUNABLES set)"
    if any(name in environ.get("LD_PRELOAD", "") for name in _PRELOADED):
        return "left alone (an allocator is preloaded)"
    return None


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> str:
    """Tune glibc's malloc as the module docstring says; returns what was done, for the log."""
    chosen = user_choice(environ)
    if chosen is not None:
        return chosen
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return "left alone (not glibc)"
    del gnu_get_libc_version
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "left alone (mallopt refused)"
    return "set to keep freed memory for reuse (M_MMAP_MAX=0, large M_TRIM_THRESHOLD)"
