"""Channel soft exit's kernel inside vLLM's forward: at small batches on CPU, a layer's MLP runs through
:class:`sedac_core.ChannelMlp` (Rust), which reads only the weights of the channels some row keeps.

The masked MLP (``_SedacMLP._sedac_masked_mlp``) computes the same values on vLLM's dense matrices, reading
every weight. At decode with one or two rows an MLP's time is the time to read its weights, so only a kernel
that skips the dropped channels' weights turns channel soft exit into time. The kernel needs its own copy
of the MLP weights in a channel-major layout (one channel's weights contiguous), taken when the weights are
loaded. It runs at the batch sizes where it measured faster than vLLM's dense MLP at start-up
(the serving setting ``channel_kernel``: ``auto``, the default), on inputs with the calibrated per-layer
sparsities; above them, and with ``never``, the masked MLP runs. Compiled, the choice is a ``torch.cond`` on
the batch size; the kernel is the ``sedac::channel_mlp`` op.

With tensor parallelism each rank runs the kernel on its shard (thresholds are elementwise, so every rank
masks its shard as the whole would be masked) and all-reduces the partial sums, as vLLM's down projection
does; rank 0's timing decides for all ranks.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

TIMED_ROWS = (1, 2, 4, 8)
"""Batch sizes the kernel is timed at on start-up, in order; it runs up to the last one before its first
loss (the rows' union of kept channels grows with the rows, so past the first loss it only falls further
behind)."""

MARGIN = 0.97
"""The kernel runs where its time is below this fraction of the dense MLP's (a measured win, not noise)."""


def unusable(mlp: Any) -> Optional[str]:
    """Why this vLLM MLP cannot run through the kernel, or None if it can: the kernel computes
    ``down(silu(gate) * up)`` in float32 on CPU, without biases, with sedac-core's Rust extension."""
    import sedac_core

    from .models import quantization

    gate_up, down = getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)
    if gate_up is None or down is None:
        return "no merged gate_up_proj / down_proj"
    if sedac_core.backend() != "rust":
        return "sedac-core runs on numpy (its Rust extension is not loaded)"
    quant = quantization(gate_up) or quantization(down)
    if quant:
        return f"quantized weights ({quant})"
    if type(getattr(mlp, "act_fn", None)).__name__ != "SiluAndMul":
        return f"activation {type(getattr(mlp, 'act_fn', None)).__name__} (the kernel computes SiLU(gate) * up)"
    for lin in (gate_up, down):
        if lin.weight.device.type != "cpu":
            return f"weights on {lin.weight.device.type} (the kernel runs on CPU)"
        if lin.weight.dtype != torch.float32:
            return f"{lin.weight.dtype} weights (the kernel is float32)"
        if getattr(lin, "bias", None) is not None:
            return "a bias on the MLP's linear layers"
    return None


def prepare(mlp: Any, t_in: float, t_mid: float) -> int:
    """Copy the MLP's loaded weights (this rank's shard) into the kernel's layout, before vLLM repacks
    them; returns the bytes the copy takes."""
    import sedac_core

    mlp._sedac_kernel = sedac_core.ChannelMlp(mlp.gate_up_proj.weight.detach().numpy(),
                                              mlp.down_proj.weight.detach().numpy(), t_in, t_mid)
    return mlp._sedac_kernel.nbytes


def runner(tp: int) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """``f(mlp, x)``: the MLP through the kernel (plus the all-reduce of the partial sums with ``tp`` > 1)."""
    reduce: Any = None
    if tp > 1:
        from vllm.distributed import tensor_model_parallel_all_reduce as reduce

    def run(mlp: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        mlp._sedac_kernel(x.numpy(), out.numpy())
        return out if reduce is None else reduce(out)

    return run


def synthetic_inputs(kernels: Sequence[Any], rows: int, input_sparsity: Sequence[float],
                     inner_sparsity: Sequence[float], seed: int = 0):
    """Per layer, an input ``[rows, hidden]`` whose rows keep (at random) ``1 - input_sparsity`` of their
    entries and a copy of the layer's kernel with thresholds that keep about ``1 - inner_sparsity`` of the
    down projection's input: what the kernel reads at the calibrated sparsities (each row its own channels,
    so a batch reads the rows' union). For timing only."""
    rng = np.random.default_rng(seed)
    out = []
    for k, s_in, s_mid in zip(kernels, input_sparsity, inner_sparsity):
        hidden, inter = k.hidden, k.inter
        x = (rng.choice([-1.0, 1.0], (rows, hidden)) * (1 + rng.random((rows, hidden)))
             * (rng.random((rows, hidden)) >= s_in)).astype(np.float32)
        h = x @ k.gate_up
        with np.errstate(over="ignore"):
            a = np.abs(h[:, :inter] / (1 + np.exp(-h[:, :inter])) * h[:, inter:])
        t_mid = float(np.quantile(a, s_mid)) if s_mid > 0 else 0.0
        out.append((k.with_thresholds(0.5, t_mid), x))
    return out


def time_kernel(mlps: Sequence[Any], call: Callable[[int, torch.Tensor], Any], rows: int,
                input_sparsity: Sequence[float], inner_sparsity: Sequence[float], repeats: int = 5,
                between: Optional[Callable[[int, torch.Tensor], Any]] = None) -> float:
    """Median seconds of one layer's ``call(layer, x)`` (the ``sedac::channel_mlp`` op as served) on
    ``rows`` rows at the calibrated sparsities (:func:`synthetic_inputs`; each MLP's kernel swapped for the
    timing copy meanwhile), the layers called in turn (so the weights come from memory, as in a forward).
    ``between(layer, x)``, untimed, runs before each call: torch's own work between two MLPs in a forward
    (its OpenMP threads keep spinning for a while after it, and compete with the kernel's threads)."""
    cases = synthetic_inputs([m._sedac_kernel for m in mlps], rows, input_sparsity, inner_sparsity)
    xs = [torch.from_numpy(x) for _, x in cases]
    served = [m._sedac_kernel for m in mlps]
    times = []
    try:
        for m, (k, _) in zip(mlps, cases):
            m._sedac_kernel = k
        for i, x in enumerate(xs):  # warm-up
            call(i, x)
        for _ in range(repeats):
            spent = 0.0
            for i, x in enumerate(xs):
                if between is not None:
                    between(i, x)
                t = time.perf_counter()
                call(i, x)
                spent += time.perf_counter() - t
            times.append(spent / len(xs))
    finally:
        for m, k in zip(mlps, served):
            m._sedac_kernel = k
    return float(np.median(times))


def crossover(mlps: Sequence[Any], call: Callable[[int, torch.Tensor], Any], dense_seconds: Callable[[int], float],
              input_sparsity: Sequence[float], inner_sparsity: Sequence[float],
              between: Optional[Callable[[int, torch.Tensor], Any]] = None) -> "tuple[int, dict]":
    """The largest batch size of :data:`TIMED_ROWS` up to which the kernel beat the dense MLP's measured time
    (``dense_seconds(rows)``) by :data:`MARGIN` at every size (0: none), and the times measured. Every size
    is timed whatever the results (with tensor parallelism each timed call all-reduces, so every rank must
    make the same calls)."""
    measured = {}
    for rows in TIMED_ROWS:
        kernel = time_kernel(mlps, call, rows, input_sparsity, inner_sparsity, between=between)
        measured[rows] = {"kernel_s": kernel, "dense_s": float(dense_seconds(rows))}
    best = 0
    for rows in TIMED_ROWS:
        if measured[rows]["kernel_s"] >= MARGIN * measured[rows]["dense_s"]:
            break
        best = rows
    return best, measured
