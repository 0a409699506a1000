"""What SEDAC's per-layer path costs, compiled, without a serving engine: microseconds per layer call.

    python -m sedac_bench.layer_bench [--rows 1,4,64,512] [--layers 8] [--seconds 2]

A stack of ``--layers`` residual MLP blocks of SmolLM2-135M's shape (hidden 576, intermediate 1536, SiLU
gate) is compiled with ``torch.compile`` (inductor on CPU, as vLLM compiles on CPU) three times over:

* ``vanilla``: the plain MLPs;
* SEDAC's MLP path (sedac-vllm's ``VllmSedac.run_mlp``: the decider's plan, the in-graph bookkeeping, the
  ``torch.cond`` between the masked and the gather path, ``sedac::finish`` once per forward) with a decider
  that skips no row (``no exits``) or about 1% of the rows at every layer from the second on (``few exits``),
  each with ``SEDAC_GATHER=auto`` (the measured crossover) and ``always`` (every layer where a row skips
  leaves the graph for the gather op: how every version before the crossover ran).

Printed: per batch size, each configuration's time per forward and its extra microseconds per layer call over
vanilla (median of interleaved repeats: the configurations take turns, so the machine's drift falls on all).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

HIDDEN, INTERMEDIATE = 576, 1536


class _Linear(torch.nn.Linear):
    """A linear layer that returns ``(output, bias)``, as vLLM's linear layers do."""

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, None]:  # type: ignore[override]
        return super().forward(x), None


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """vLLM's activation of a merged gate/up output: ``silu(gate) * up``."""
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


class SiluAndMul(torch.nn.Module):
    """:func:`silu_and_mul` as a module, as vLLM's MLP holds its activation (``act_fn``)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(h)


class Mlp(torch.nn.Module):
    """A gate/up/down SiLU MLP shaped as vLLM's: a merged ``gate_up_proj``, ``act_fn``, ``down_proj``, linear
    layers returning ``(output, bias)``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = _Linear(HIDDEN, 2 * INTERMEDIATE, bias=False)
        self.act_fn = SiluAndMul()
        self.down_proj = _Linear(INTERMEDIATE, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gate_up_proj(x)
        y, _ = self.down_proj(self.act_fn(h))
        return y


class FixedRateDecider:
    """Skips the rows whose first stream coordinate is above a quantile: ``rate`` of random rows, decided from
    the data (so the compiled graph cannot fold the plan away), at every layer from the second on."""

    monotone = False
    wants_positions = False
    step_layers: FrozenSet[int] = frozenset()  # reads no stream after layer 0

    def __init__(self, rate: float) -> None:
        self.threshold = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - rate))) if rate > 0 \
            else float("inf")

    def start(self, stream: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"skip": stream[:, 0] > self.threshold}

    def step(self, layer: int, stream: torch.Tensor, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return state

    def plan(self, layer: int, state: Dict[str, torch.Tensor]):
        return (None, None) if layer == 0 else (state["skip"], None)


def shared_weights(layers: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's ``(gate_up, down)`` weights, made once and given to every configuration: each stack then
    reads the same memory, so the configurations compared differ only in what they run, not in where their
    weights landed."""
    torch.manual_seed(0)
    return [(torch.nn.Linear(HIDDEN, 2 * INTERMEDIATE, bias=False).weight.detach(),
             torch.nn.Linear(INTERMEDIATE, HIDDEN, bias=False).weight.detach()) for _ in range(layers)]


def _mlps(weights: List[Tuple[torch.Tensor, torch.Tensor]]) -> List[Mlp]:
    mlps = []
    for gate_up, down in weights:
        m = Mlp()
        m.gate_up_proj.weight = torch.nn.Parameter(gate_up, requires_grad=False)
        m.down_proj.weight = torch.nn.Parameter(down, requires_grad=False)
        mlps.append(m)
    return mlps


def sedac_stack(weights: List[Tuple[torch.Tensor, torch.Tensor]], rate: float, gather: str, max_rows: int,
                inner_mask: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    from sedac_monitor.api import make_skippable
    from sedac_vllm import SedacConfig
    from sedac_vllm.models import _SedacMLP, eager_activation, inner_mask_zeroes_rows
    from sedac_vllm.state import VllmSedac

    layers = len(weights)
    cfg = SedacConfig.from_env({"SEDAC_ENABLED": "1", "SEDAC_GATHER": gather, "SEDAC_PROTECT_FIRST": "0",
                                "SEDAC_LOG_EVERY": "0"})
    hf = {"hidden_size": HIDDEN, "num_hidden_layers": layers, "intermediate_size": INTERMEDIATE}
    sedac = VllmSedac(cfg, hf, layers, HIDDEN, torch.device("cpu"), max_rows=max_rows)
    sedac.decider = sedac.runtime.decider = FixedRateDecider(rate)
    sedac.stream_layers = sedac.decider.step_layers
    mlps: List[Any] = _mlps(weights)  # their classes are swapped for _SedacMLP subclasses (make_skippable)
    for i, m in enumerate(mlps):
        make_skippable(m, sedac.runtime, i, mixin=_SedacMLP)
        m._sedac_owner = sedac
        m._sedac_act = eager_activation(m)
        m._sedac_inner_mask = inner_mask and inner_mask_zeroes_rows(m)
        sedac.mlps[i] = m
    sedac.measure_cost([m._sedac_full for m in mlps], HIDDEN, torch.float32, torch.device("cpu"))

    def run(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        sedac.begin(x, positions)
        h = x
        for i, mlp in enumerate(mlps):
            y = mlp(h)
            sedac.after_layer(i, y, h, positions)
            h = h + y
        return h

    compiled = torch.compile(run, dynamic=True)
    return lambda x: compiled(x, torch.arange(x.shape[0]))


def vanilla_stack(weights: List[Tuple[torch.Tensor, torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    mlps = _mlps(weights)

    def run(x: torch.Tensor) -> torch.Tensor:
        h = x
        for mlp in mlps:
            h = h + mlp(h)
        return h

    return torch.compile(run, dynamic=True)


def measure(runs: Dict[str, Callable[[torch.Tensor], torch.Tensor]], rows: int, seconds: float) -> Dict[str, float]:
    """Median seconds per forward of each configuration, the configurations taking turns."""
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        for fn in runs.values():  # compile for this size, warm up
            fn(x)
            fn(x)
        t = time.perf_counter()
        next(iter(runs.values()))(x)
        reps = max(3, int(seconds / max(time.perf_counter() - t, 1e-6) / len(runs)))
        times: Dict[str, List[float]] = {name: [] for name in runs}
        for _ in range(reps):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: Optional[List[str]] = None) -> Dict[int, Any]:
    p = argparse.ArgumentParser(prog="python -m sedac_bench.layer_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,4,64,512", help="batch sizes (rows per forward), comma-separated")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seconds", type=float, default=2.0, help="timing budget per batch size")
    args = p.parse_args(argv)
    sizes = [int(r) for r in args.rows.split(",")]
    torch._dynamo.config.cache_size_limit = 64
    weights = shared_weights(args.layers)
    runs = {"vanilla": vanilla_stack(weights)}
    for label, rate in (("no exits", 0.0), ("few exits (1%)", 0.01)):
        for gather in ("auto", "always"):
            runs[f"{label}, gather {gather}"] = sedac_stack(weights, rate, gather, max(sizes))
    print(f"{args.layers} MLP blocks of SmolLM2-135M's shape, torch.compile (inductor), "
          f"{torch.get_num_threads()} threads; extra µs per layer call over vanilla")
    out: Dict[int, Any] = {}  # by rows per forward
    for rows in sizes:
        res = measure(runs, rows, args.seconds)
        base = res["vanilla"]
        out[rows] = {name: {"forward_us": 1e6 * s, "extra_us_per_layer": 1e6 * (s - base) / args.layers}
                     for name, s in res.items()}
        print(f"rows {rows}: vanilla {1e6 * base:.0f} µs per forward; " + "; ".join(
            f"{name} {1e6 * (s - base) / args.layers:+.1f}" for name, s in res.items() if name != "vanilla"))
    return out


if __name__ == "__main__":
    main()
