"""What one layer's MLP costs on this machine, and when skipping some of its rows pays.

Skipping a row of the MLP saves that row's FLOPs, but not the MLP's weight reads: the weights are read
once per call whatever the number of rows, so at decode batch sizes (weight-read bound) the MLP on 3 rows
costs about what it costs on 4. Only a layer where every row skips saves the reads. The gather path that
runs the MLP on the active rows only (leave the compiled graph, gather, MLP, scatter) has a cost of its
own, so it pays only where ``t(rows) - t(rows - skipped)`` exceeds that cost. Both are measured here:

* ``seconds[r]``: the MLP on ``r`` rows, measured at powers of two and interpolated linearly between
  them (``seconds[0] = 0``: nothing to compute), made non-decreasing. Every layer's MLP is called in
  turn, as a forward calls them: one layer called again and again keeps its weights in the CPU's cache
  and reads them faster than a forward ever does, which made small batches look cheap;
* ``fixed + per_row * rows``: what the gather path costs on top of the MLP on its active rows
  (dispatch, the host read of the plan, the copies), fitted from timing the path itself.

From them :meth:`MlpCost.need` tabulates, for every batch size, the fewest skipped rows at which the gather
path pays (with a safety ``margin`` on its cost); a compiled model compares a layer's skipped-row count
with that table inside the graph and otherwise runs the MLP on every row and zeroes the skipped rows (the
masked path, whose cost equals the plain MLP's). :meth:`MlpCost.saved` is the ideal saving of a plan,
counting weight reads as well as FLOPs: the "byte-aware ideal" the benchmark reports speed-ups against.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TypedDict, Union

import numpy as np
import torch

MARGIN = 1.5
"""The gather path is taken only where its predicted saving exceeds ``MARGIN`` times its predicted
cost: timings on a shared machine move by ±10%, and a wrong "pays" costs time where a wrong "does not
pay" only forgoes a small gain."""


# fn is called without arguments; `...` because mypy cannot infer the callers' `lambda x=x: ...` against `[]`
def _time(fn: Callable[..., object], budget: float = 0.004, batches: int = 3) -> float:
    """Seconds per call of ``fn``: the fastest of ``batches`` batches of calls, each about ``budget`` s."""
    fn()  # first call: allocations, kernel selection
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-7)
    n = max(1, int(budget / once))
    best = float("inf")
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


Mlp = Callable[[torch.Tensor], torch.Tensor]
Mlps = Union[Mlp, Sequence[Mlp]]


def in_turn(mlps: Mlps) -> Mlp:
    """One callable that calls the given layers' MLPs one after the other, a layer per call (a single
    callable is returned as it is): what timing it measures is an average over the layers, each called
    with its weights out of cache as in a forward."""
    if callable(mlps):
        return mlps
    layers = list(mlps)
    if not layers or not all(callable(m) for m in layers):
        raise ValueError("in_turn needs one MLP callable or a non-empty sequence of them")
    turn = [0]

    def call(x: torch.Tensor) -> torch.Tensor:
        i = turn[0]
        turn[0] = (i + 1) % len(layers)
        return layers[i](x)

    return call


def grid(max_rows: int) -> List[int]:
    """The batch sizes measured: 1, 2, 4, ... up to ``max_rows`` (which is included)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    out, r = [], 1
    while r < max_rows:
        out.append(r)
        r *= 2
    return out + [max_rows]


@dataclass(frozen=True)
class MlpCost:
    """Measured MLP cost at every batch size up to ``max_rows`` and the gather path's overhead."""

    points: Dict[int, float]
    """rows -> seconds of one MLP call, as measured."""
    fixed: float = 0.0
    """seconds the gather path adds per call, whatever the batch."""
    per_row: float = 0.0
    """seconds the gather path adds per row of the batch (gather and scatter copies)."""
    margin: float = MARGIN

    def __post_init__(self) -> None:
        if not self.points or min(self.points) < 1:
            raise ValueError("MlpCost needs measured seconds for batch sizes >= 1")
        if self.fixed < 0 or self.per_row < 0 or self.margin <= 0:
            raise ValueError("MlpCost: fixed and per_row must be >= 0 and margin > 0")

    @property
    def max_rows(self) -> int:
        return max(self.points)

    @functools.cached_property
    def _curve(self) -> "tuple[np.ndarray, np.ndarray, float]":
        # the interpolation's nodes, built once: a serving engine reads seconds() at the end of every forward
        xs = np.array([0.0] + sorted(self.points), dtype=np.float64)
        ys = np.maximum.accumulate(np.array([0.0] + [self.points[r] for r in sorted(self.points)]))
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 2 else ys[-1] / xs[-1]
        return xs, ys, float(slope)

    def seconds(self, rows: "float | np.ndarray") -> np.ndarray:
        """Seconds of one MLP call on ``rows`` rows (fractional rows allowed: a soft exit's partial rows),
        linear between measured sizes and beyond the largest, zero at zero rows, never decreasing."""
        xs, ys, slope = self._curve
        r = np.asarray(rows, dtype=np.float64)
        inside = np.interp(r, xs, ys)
        return np.where(r > xs[-1], ys[-1] + (r - xs[-1]) * slope, inside)

    def overhead(self, rows: "int | np.ndarray") -> np.ndarray:
        return self.fixed + self.per_row * np.asarray(rows, dtype=np.float64)

    def saved(self, rows: "int | np.ndarray", skipped: "float | np.ndarray") -> np.ndarray:
        """Ideal seconds saved by not computing ``skipped`` of ``rows`` rows (no path overhead)."""
        rows = np.asarray(rows, dtype=np.float64)
        return self.seconds(rows) - self.seconds(rows - np.asarray(skipped, dtype=np.float64))

    def pays(self, rows: int, skipped: float) -> bool:
        """Does the gather path beat the masked path for a plan skipping ``skipped`` of ``rows`` rows?"""
        return bool(skipped > 0 and self.saved(rows, skipped) > self.margin * self.overhead(rows))

    def need(self, max_rows: Optional[int] = None) -> np.ndarray:
        """``need[rows]``: the fewest skipped rows at which the gather path pays, for rows = 0..max_rows
        (``rows + 1`` where it never does). Monotone in the skipped count, so one comparison decides."""
        n = self.max_rows if max_rows is None else int(max_rows)
        rows = np.arange(n + 1)
        t = self.seconds(rows)
        # pays  <=>  t[rows - skipped] < t[rows] - margin * overhead(rows); t is non-decreasing in rows
        target = t - self.margin * self.overhead(rows)
        below = np.searchsorted(t, target, side="left") - 1  # the most active rows that still pay
        need = np.where(target > 0, rows - below, rows + 1)
        return np.clip(need, 1, rows + 1).astype(np.int64)

    def to_json(self) -> Dict[str, object]:
        return {"points": {str(k): v for k, v in sorted(self.points.items())}, "fixed": self.fixed,
                "per_row": self.per_row, "margin": self.margin}

    @classmethod
    def from_json(cls, data: Dict[str, object]) -> "MlpCost":
        points = data["points"]
        if not isinstance(points, dict):
            raise ValueError("MlpCost JSON: 'points' must map batch sizes to seconds")
        return cls({int(k): float(v) for k, v in points.items()}, float(data.get("fixed", 0.0)),  # type: ignore[arg-type]
                   float(data.get("per_row", 0.0)), float(data.get("margin", MARGIN)))  # type: ignore[arg-type]

    @staticmethod
    def gather_path(mlp: Mlps) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``gather(x, skip)``: what SEDAC's gather path does with ``mlp`` (one MLP, or every layer's, called
        in turn) for a plan (read it on the host, run the MLP on the active rows, scatter them back), for
        :meth:`measure` to time."""
        from .engine import SkipRuntime

        mlp = in_turn(mlp)

        def gather(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
            if int(skip.sum()) == 0:
                return mlp(x)
            return SkipRuntime._gathered(x, (~skip).nonzero().squeeze(1), None, mlp)

        return gather

    @classmethod
    def measure(cls, mlp: Mlps, hidden: int, max_rows: int,
                dtype: torch.dtype = torch.float32, device: "torch.device | str" = "cpu",
                gather: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                sizes: Optional[Sequence[int]] = None, margin: float = MARGIN) -> "MlpCost":
        """Time ``mlp`` (a layer's MLP, ``[rows, hidden] -> [rows, hidden]``, or a sequence of every layer's,
        called in turn: see :func:`in_turn`) at ``sizes`` rows (default :func:`grid` up to ``max_rows``), and,
        given ``gather(x, skip)`` (the gather path on a plan), fit its overhead from two batch sizes with half
        the rows skipped."""
        mlp = in_turn(mlp)
        gen = torch.Generator().manual_seed(0)
        inputs = {r: torch.randn(r, hidden, generator=gen).to(device=device, dtype=dtype)
                  for r in (sizes or grid(max_rows))}
        with torch.no_grad():
            points = {r: _time(lambda x=x: mlp(x)) for r, x in inputs.items()}
            fixed = per_row = 0.0
            if gather is not None:
                small, large = 2, min(256, max(4, max_rows))
                extra = []
                for r in (small, large):
                    x = inputs.get(r)
                    if x is None:
                        x = torch.randn(r, hidden, generator=gen).to(device=device, dtype=dtype)
                    skip = torch.zeros(r, dtype=torch.bool, device=device)
                    skip[::2] = True
                    active = r - r // 2
                    t_path = _time(lambda x=x, s=skip: gather(x, s))
                    t_active = _time(lambda x=x[:active]: mlp(x))
                    extra.append((r, max(t_path - t_active, 0.0)))
                (r0, e0), (r1, e1) = extra
                per_row = max((e1 - e0) / (r1 - r0), 0.0)
                fixed = max(e0 - per_row * r0, 0.0)
        return cls(points, fixed, per_row, margin)


DECODE_BATCHES = (1, 4, 16, 64)
PREFILL_ROWS = 512


def expected_gain(cost: MlpCost, rows: int, rate: float) -> float:
    """Expected seconds one layer saves on a batch of ``rows`` rows when each row skips its MLP with
    probability ``rate`` (independently: the rows of a batch are different sequences), taking the gather
    path only where it pays and paying its overhead there."""
    if rate <= 0 or rows < 1:
        return 0.0

    def gain(k: float) -> float:
        return float(cost.saved(rows, k) - cost.overhead(rows)) if cost.pays(rows, k) else 0.0

    if rows > 64:  # the skipped count concentrates around its mean
        return gain(rate * rows)
    from math import comb

    return sum(comb(rows, k) * rate ** k * (1 - rate) ** (rows - k) * gain(k) for k in range(1, rows + 1))


def expected_speedup(cost: MlpCost, rates: Sequence[float], forward_seconds: float, rows: int) -> float:
    """Expected speed-up of a forward over ``rows`` rows that takes ``forward_seconds`` unpatched, given each
    layer's skip rate (the fraction of tokens skipping that layer's MLP)."""
    saved = sum(expected_gain(cost, rows, float(r)) for r in rates)
    return forward_seconds / max(forward_seconds - saved, 1e-12)


class MeasuredModel(TypedDict):
    """What :func:`measure_model` returns."""

    cost: MlpCost
    forward_seconds: Dict[str, float]
    prefill_rows: int


def measure_model(layout, max_rows: int = PREFILL_ROWS, context: int = 64) -> MeasuredModel:
    """What :func:`expected_speedups` needs, measured on a Hugging Face model on this machine: one layer's
    MLP cost (:class:`MlpCost`, with the gather path SEDAC's runtime runs), the time of a prefill forward of
    ``max_rows`` tokens and of a decode forward at each of :data:`DECODE_BATCHES` (``context`` tokens cached)."""
    model = layout.model
    mlp = in_turn([layer.mlp for layer in layout.layers])
    param = next(model.parameters())
    hidden = int(model.config.hidden_size)

    cost = MlpCost.measure(mlp, hidden, max_rows, param.dtype, param.device, MlpCost.gather_path(mlp))
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    forward: Dict[str, float] = {}
    with torch.no_grad():
        ids = torch.randint(0, vocab, (1, max_rows), generator=gen).to(param.device)
        forward["prefill"] = _time(lambda: model(input_ids=ids), budget=0.0, batches=2)
        for b in DECODE_BATCHES:
            ctx = torch.randint(0, vocab, (b, context), generator=gen).to(param.device)
            token = torch.randint(0, vocab, (b, 1), generator=gen).to(param.device)
            past = model(input_ids=ctx, use_cache=True).past_key_values
            # each call appends one position to the cache: a few calls at ~`context` tokens
            forward[f"decode_b{b}"] = _time(
                lambda token=token, past=past: model(input_ids=token, past_key_values=past, use_cache=True),
                budget=0.0, batches=3)
    return {"cost": cost, "forward_seconds": forward, "prefill_rows": max_rows}


def expected_speedups(measured: MeasuredModel, rates: Sequence[float]) -> Dict[str, float]:
    """Expected speed-up of a setting with per-layer skip ``rates`` at prefill and at each decode batch."""
    cost = measured["cost"]
    forward = measured["forward_seconds"]
    assert isinstance(cost, MlpCost) and isinstance(forward, dict)
    out = {"prefill": expected_speedup(cost, rates, forward["prefill"], int(measured["prefill_rows"]))}
    for b in DECODE_BATCHES:
        out[f"decode_b{b}"] = expected_speedup(cost, rates, forward[f"decode_b{b}"], b)
    return out


def recommendation(expected: Dict[str, float], alternatives: Sequence[Mapping[str, Any]] = ()) -> str:
    """One line: whether the chosen setting pays on this machine, and if not what would.

    ``alternatives``: measured settings (``measured_risk``, ``expected_speedup``, and ``delta_ppl`` where
    measured) outside the budget."""
    best = max(expected.values()) if expected else 1.0
    shown = ", ".join(f"{k.replace('_b', ' batch ')} {v:.3f}x" for k, v in expected.items())
    if best >= 1.01:
        return f"expected speed-up on this machine: {shown}. SEDAC pays here."
    line = (f"expected speed-up on this machine: {shown}. SEDAC will not pay on this model at this budget: "
            "too little MLP work is safe to skip")
    paying = sorted((a for a in alternatives if max(a.get("expected_speedup", {}).values() or [1.0]) >= 1.05),
                    key=lambda a: float(a["measured_risk"]))
    if paying:
        a = paying[0]
        risk = float(a["measured_risk"])
        flags, cost = f"--max-risk {risk:.3f}", f"top-1 risk {risk:.1%}"
        if a.get("delta_ppl") is not None:
            dppl = float(a["delta_ppl"])
            flags += f" --max-delta-ppl {max(dppl, 0.0):.3f}"
            cost += f" and ΔPPL {dppl:+.1%}"
        line += (f"; a looser budget would ({flags}: up to "
                 f"{max(a['expected_speedup'].values()):.2f}x with {cost})")
    return line + ". On a larger model the signal may find more (not measured here)."
