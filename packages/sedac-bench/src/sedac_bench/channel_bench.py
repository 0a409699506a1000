"""Can reading only the active channels' weights beat vLLM's dense MLP kernel on this machine?

    python -m sedac_bench.channel_bench [--rows 1,2,4] [--keep 0.85] [--layers 30] [--repeats 30]

Channel soft exit saves weight bytes at decode with batch 1-2 only if a kernel reads the active channels'
weights alone. Before such a kernel is worth building, this measures what reading ``--keep`` of an MLP's
weights can gain at all, on SmolLM2-135M's MLP shape (hidden 576, intermediate 1536, SiLU gate, fp32),
``--layers`` different layers called in turn (as a forward calls them, so the weights come from memory, not
from cache):

* ``dense``: ``torch.nn.functional.linear`` on the ``[out, in]`` weights (one GEMM for the merged gate/up,
  one for down), as the Hugging Face model computes it;
* ``vLLM dense``: the same with the kernel vLLM's CPU backend picks for an unquantized linear layer
  (``dispatch_cpu_unquantized_gemm``: oneDNN with pre-packed weights here), when vLLM is installed;
* ``dense, channel-major``: the same MLP with the weights stored input-channel-major (``[in, out]``, so
  one input channel's weights are contiguous), ``x @ W``: the layout a channel-skipping kernel needs;
* ``contiguous prefix``: channel-major, the active channels being the first ``keep`` of them (an ideal no
  real token gives: no index, no gather; the best any kernel reading ``keep`` of the weights can do with
  the same GEMM);
* ``vLLM contiguous prefix``: vLLM's kernel on weights cut to the first ``keep`` input channels (packed
  ahead of time, which per-token channel sets never allow): the bound for a channel kernel against
  ``vLLM dense``;
* ``gather``: channel-major, a random ``keep`` of the channels per matrix, the active rows copied
  (``index_select``) then multiplied: what a kernel written with torch operators does;
* ``sedac-core kernel``: :func:`sedac_core.gated_mlp` (Rust, rayon), which reads only the rows of the
  channel-major weights whose channel some row keeps, with thresholds that keep a random ``keep`` of each
  row's input entries and of its down projection input's (per row: at batch > 1 the rows' union is read,
  printed as ``read``); ``sedac-core kernel, all kept`` the same with every entry kept (its dense speed).
  Each on rayon's thread pool (how sedac-vllm serves it) and, where torch exports ``torch_parallel_for``
  (torch >= 2.10), on torch's intra-op threads (``torch threads``, ``sedac_core.set_parallel_for``).

The MLP's input and the down projection's input are both sparse at ``keep`` (gate/up read ``keep`` of
their input rows, down ``keep`` of its channel rows). Printed: median microseconds per layer for each, and
the speed-up of each over ``dense`` (interleaved repeats: the variants take turns). The decision rule: a
kernel is built only if the contiguous prefix reaches 1.1x over the fastest dense variant at batch 1 (a
kernel that reads fewer bytes must beat the best way to read them all, not the slowest).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .layer_bench import HIDDEN, INTERMEDIATE, silu_and_mul

TARGET = 1.1
"""Speed-up over dense, at batch 1 with 85% of the weights read, that a channel kernel must be able to
reach (the contiguous prefix) before it is worth building."""


def _variants(layers: int, keep: float, rows: int, seed: int = 0) -> Dict[str, Callable[[], torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    gate_up = [torch.randn(2 * INTERMEDIATE, HIDDEN, generator=g) * 0.02 for _ in range(layers)]
    down = [torch.randn(HIDDEN, INTERMEDIATE, generator=g) * 0.02 for _ in range(layers)]
    gate_up_t = [w.t().contiguous() for w in gate_up]  # [HIDDEN, 2*INTERMEDIATE]
    down_t = [w.t().contiguous() for w in down]  # [INTERMEDIATE, HIDDEN]
    x = torch.randn(rows, HIDDEN, generator=g)
    k_in, k_mid = max(1, round(keep * HIDDEN)), max(1, round(keep * INTERMEDIATE))
    idx_in = [torch.randperm(HIDDEN, generator=g)[:k_in].sort().values for _ in range(layers)]
    idx_mid = [torch.randperm(INTERMEDIATE, generator=g)[:k_mid].sort().values for _ in range(layers)]

    def dense() -> torch.Tensor:
        y = x
        for i in range(layers):
            y = F.linear(silu_and_mul(F.linear(x, gate_up[i])), down[i])
        return y

    def dense_t() -> torch.Tensor:
        y = x
        for i in range(layers):
            y = silu_and_mul(x @ gate_up_t[i]) @ down_t[i]
        return y

    def prefix() -> torch.Tensor:
        y = x
        xs = x[:, :k_in]
        for i in range(layers):
            h = silu_and_mul(xs @ gate_up_t[i][:k_in])
            y = h[:, :k_mid] @ down_t[i][:k_mid]
        return y

    def gather() -> torch.Tensor:
        y = x
        for i in range(layers):
            a, b = idx_in[i], idx_mid[i]
            h = silu_and_mul(x.index_select(1, a) @ gate_up_t[i].index_select(0, a))
            y = h.index_select(1, b) @ down_t[i].index_select(0, b)
        return y

    out = {"dense": dense, "dense, channel-major": dense_t, "contiguous prefix": prefix, "gather": gather}
    out.update(_kernel_variants(gate_up, down, rows, keep))
    vllm_mm = _vllm_linear(gate_up, down)
    if vllm_mm is not None:
        gu_mm, d_mm = vllm_mm

        def vllm_dense() -> torch.Tensor:
            y = x
            for i in range(layers):
                y = d_mm[i](silu_and_mul(gu_mm[i](x)))
            return y
        out["vLLM dense"] = vllm_dense
        cut = _vllm_linear([w[:, :k_in].contiguous() for w in gate_up], [w[:, :k_mid].contiguous() for w in down])
        assert cut is not None
        gu_cut, d_cut = cut

        def vllm_prefix() -> torch.Tensor:
            y = x
            xs = x[:, :k_in].contiguous()
            for i in range(layers):
                y = d_cut[i](silu_and_mul(gu_cut[i](xs))[:, :k_mid].contiguous())
            return y
        out["vLLM contiguous prefix"] = vllm_prefix
    return out


def _kernel_variants(gate_up: Sequence[torch.Tensor], down: Sequence[torch.Tensor], rows: int,
                     keep: float) -> Dict[str, Callable[[], torch.Tensor]]:
    import sedac_core
    from sedac_vllm.channel_kernel import synthetic_inputs

    kernels = [sedac_core.ChannelMlp(gu.numpy(), d.numpy()) for gu, d in zip(gate_up, down)]
    # as sedac-vllm times it at start-up: each row keeps a random `keep` of its input entries, and each
    # layer's inner threshold keeps about `keep` of the down projection's input
    cases = synthetic_inputs(kernels, rows, [1 - keep] * len(kernels), [1 - keep] * len(kernels))
    out = np.empty((rows, HIDDEN), dtype=np.float32)
    kept_in, kept_mid = cases[0][0](cases[0][1], out)
    _KERNEL_READ[rows] = (kept_in / HIDDEN + 2 * kept_mid / INTERMEDIATE) / 3

    ones = np.ones((rows, HIDDEN), dtype=np.float32)
    torch_threads = _torch_parallel_for()

    def on(address: Any, inputs: Any) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            sedac_core.set_parallel_for(address)
            for k, x in inputs:
                k(x, out)
            return torch.from_numpy(out)
        return run

    every = [(k, ones) for k in kernels]
    variants = {"sedac-core kernel": on(None, cases), "sedac-core kernel, all kept": on(None, every)}
    if torch_threads:
        variants.update({"sedac-core kernel, torch threads": on(torch_threads, cases),
                         "sedac-core kernel, all kept, torch threads": on(torch_threads, every)})
    return variants


def _torch_parallel_for() -> Any:
    """The address of torch's ``torch_parallel_for`` (a C function ``libtorch_cpu`` exports since torch 2.10,
    running a range's chunks on torch's intra-op threads: see ``sedac_core.set_parallel_for``), or None."""
    import ctypes
    import os

    try:  # the library torch already loaded (RTLD_NOLOAD: never a second copy)
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"),
                          mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        return ctypes.cast(lib.torch_parallel_for, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


_KERNEL_READ: Dict[int, float] = {}
"""Per batch size, the fraction of the first layer's weights the kernel variant read (the rows' union)."""


def _vllm_linear(gate_up: Sequence[torch.Tensor], down: Sequence[torch.Tensor]):
    """Per layer, ``f(x)`` for gate/up and for down through the GEMM vLLM's CPU backend dispatches to for
    these weights, or None without vLLM."""
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    except Exception:  # noqa: BLE001 - vLLM absent or not the CPU build: the variant is left out
        return None

    def kernel(w: torch.Tensor):
        layer: Any = torch.nn.Module()  # vLLM sets cpu_linear on it
        layer.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        mm, weight = layer.cpu_linear, layer.weight
        return lambda x: mm(x, weight, None)
    return [kernel(w) for w in gate_up], [kernel(w) for w in down]


def measure(rows_list: Sequence[int], keep: float, layers: int, repeats: int,
            log: Callable[[str], None] = print) -> List[Dict[str, object]]:
    """Median µs per layer of every variant at each batch size; interleaved, after one warm-up each."""
    out: List[Dict[str, object]] = []
    for rows in rows_list:
        fns = _variants(layers, keep, rows)
        times: Dict[str, List[float]] = {name: [] for name in fns}
        with torch.no_grad():
            for fn in fns.values():
                fn()
            for _ in range(repeats):
                for name, fn in fns.items():
                    t = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t) / layers * 1e6)
        med = {name: statistics.median(v) for name, v in times.items()}
        row: Dict[str, object] = {"rows": rows, "keep": keep, "us_per_layer": med, "kernel_read": _KERNEL_READ[rows],
                                  "speedup": {name: med["dense"] / v for name, v in med.items()}}
        out.append(row)
        log(f"rows {rows:3d} (the kernel read {_KERNEL_READ[rows]:.0%} of the weights): " + "  ".join(
            f"{name} {med[name]:7.1f} µs ({med['dense'] / med[name]:.3f}x)" for name in fns))
    return out


def main(argv: Sequence[str] = ()) -> int:
    p = argparse.ArgumentParser(prog="python -m sedac_bench.channel_bench", description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,2,4", help="batch sizes (rows per MLP call), comma-separated")
    p.add_argument("--keep", type=float, default=0.85, help="fraction of each matrix's channels read (0.85)")
    p.add_argument("--layers", type=int, default=30, help="layers called in turn (30, as SmolLM2-135M)")
    p.add_argument("--repeats", type=int, default=30, help="interleaved repeats (30)")
    args = p.parse_args(list(argv) or None)
    if not 0 < args.keep <= 1:
        p.error(f"--keep must be in (0, 1], got {args.keep}")
    rows = [int(r) for r in args.rows.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MLP {HIDDEN}x{INTERMEDIATE} fp32, "
          f"{args.layers} layers in turn ({args.layers * 3 * HIDDEN * INTERMEDIATE * 4 / 2**20:.0f} MiB of "
          f"weights), keep {args.keep:.0%}")
    result = measure(rows, args.keep, args.layers, args.repeats)
    us: Dict[str, float] = result[0]["us_per_layer"]  # type: ignore[assignment]
    fastest = min((name for name in us if "dense" in name), key=us.__getitem__)
    prefix = min((name for name in us if "prefix" in name), key=us.__getitem__)
    gain = us[fastest] / us[prefix]
    verdict = "worth building" if gain >= TARGET else "not worth building"
    print(f"at batch {rows[0]}, reading {args.keep:.0%} of the weights as a contiguous block ({prefix}) gains "
          f"{gain:.3f}x over the fastest dense variant ({fastest}; target {TARGET}x): a channel kernel is "
          f"{verdict} on this machine")
    for r in result:
        us = r["us_per_layer"]  # type: ignore[assignment]
        fastest = min((name for name in us if "dense" in name), key=us.__getitem__)
        for threads in ("", ", torch threads"):
            kernel, every = f"sedac-core kernel{threads}", f"sedac-core kernel, all kept{threads}"
            if kernel in us:
                print(f"batch {r['rows']}: the sedac-core kernel{threads or ', rayon'}, reading "
                      f"{r['kernel_read']:.0%} of the weights, runs at {us[fastest] / us[kernel]:.3f}x the fastest "
                      f"dense variant ({fastest}); with every channel kept at {us[fastest] / us[every]:.3f}x")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
