"""Teacher-forced passes over token windows: each position's top-1 and next-token NLL with or without a
decider attached, and cascade labels (does the top-1 survive an exit at layer ``p``?) for calibration and
probe training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .attach import HFAttachment, _first_tensor
from .bound import clopper_pearson_upper, delta_ppl_upper
from .decide import ForcedExitDecider, RecordingDecider
from .engine import SkipRuntime
from .layouts import DecoderLayout
from .loading import batches, progress


@dataclass
class Pass:
    """Teacher-forced results per token (flattened over windows, the last
    position of each window dropped: it has no next token)."""

    top1: torch.Tensor  # int64 [tokens]: argmax of the logits at each position
    nll: torch.Tensor  # float64 [tokens]: -log p(next token)
    first_skip: Optional[torch.Tensor] = None  # int64 [tokens] first skipped layer (num_layers: none)
    row_skips: Optional[torch.Tensor] = None  # float32 [tokens] MLP blocks skipped (soft exits fractional)
    stats: Optional[dict] = None  # the runtime's ExitStats over every position (last ones included)

    @property
    def ppl(self) -> float:
        return float(math.exp(self.nll.mean().item()))


def compared(run: Pass, base_top1: torch.Tensor, base_nll: torch.Tensor,
             confidence: Optional[float] = None) -> Dict[str, Any]:
    """``run`` against the unmodified pass: tokens, top-1 errors and risk, perplexities and ΔPPL, and with
    ``confidence`` their upper bounds (Clopper-Pearson; Student's t over blocks for ΔPPL)."""
    n = int(base_top1.numel())
    errors = int((run.top1 != base_top1).sum())
    ppl_base = float(math.exp(base_nll.mean().item()))
    out: Dict[str, Any] = {"tokens": n, "errors": errors, "measured_risk": errors / n, "ppl_base": ppl_base,
                           "ppl": run.ppl, "delta_ppl": run.ppl / ppl_base - 1.0}
    if confidence is not None:
        out["risk_upper_bound"] = clopper_pearson_upper(errors, n, confidence)
        out["delta_ppl_upper_bound"] = delta_ppl_upper(run.nll.numpy(), base_nll.numpy(), confidence)
        out["bound_confidence"] = confidence
    return out


def teacher_forced(layout: DecoderLayout, windows: torch.Tensor, decider: Any = None, batch_size: int = 4,
                   desc: str = "", on_batch: Optional[Callable[[slice, Any], None]] = None,
                   protect_first: int = 1, soft_exit: bool = False,
                   soft_orders: Optional[List[torch.Tensor]] = None) -> Pass:
    """Run ``windows`` through the model (with ``decider`` attached, if given)
    and collect each position's top-1 and next-token NLL. ``on_batch(slice,
    decider)`` is called after each batch (e.g. to read recorded signals)."""
    model = layout.model
    runtime = SkipRuntime(decider, layout.num_layers, protect_first) if decider is not None else None
    attachment = HFAttachment(layout, runtime, soft_exit, soft_orders) if runtime is not None else None
    top1, nll, first, skips = [], [], [], []
    try:
        with torch.no_grad():
            for sl in progress(list(batches(windows.shape[0], batch_size)), desc=desc):
                ids = windows[sl]
                logits = model(input_ids=ids, use_cache=False).logits.float()
                top1.append(logits[:, :-1].argmax(-1).reshape(-1))
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                nll.append(-logp.gather(-1, ids[:, 1:, None]).reshape(-1).double())
                if runtime is not None:
                    assert runtime.last_first_skip is not None and runtime.last_row_skips is not None  # finish() ran
                    first.append(runtime.last_first_skip.view(ids.shape)[:, :-1].reshape(-1))
                    skips.append(runtime.last_row_skips.view(ids.shape)[:, :-1].reshape(-1))
                if on_batch is not None:
                    on_batch(sl, decider)
    finally:
        if attachment is not None:
            attachment.detach()
    return Pass(torch.cat(top1), torch.cat(nll), torch.cat(first) if first else None,
                torch.cat(skips) if skips else None,
                runtime.stats.as_dict() if runtime is not None and runtime.stats is not None else None)


def cascade_labels(layout: DecoderLayout, windows: torch.Tensor, positions: Sequence[int], protect_last: int,
                   batch_size: int = 4, desc: str = "cascade labels", keep_layers: Sequence[int] = (),
                   on_batch: Optional[Callable[[slice, Any], None]] = None, protect_first: int = 1):
    """Unmodified teacher-forced pass plus, for each exit position ``p``, whether
    the top-1 survives a cascade exit there: every token skips the MLPs of
    layers ``p+1 .. L-protect_last-1`` (one extra pass per position, run from
    the stored stream after layer ``p``, so layers ``0..p`` are not recomputed).
    The first ``protect_first`` positions of each window never exit (as in
    :class:`~sedac_monitor.engine.SkipRuntime`); their labels say 1.

    Returns ``(base: Pass, safe: uint8 [tokens, len(positions)])`` with the
    last position of each window dropped (as in :class:`Pass`). ``on_batch``
    receives the :class:`RecordingDecider` of the unmodified pass, which
    records similarities and the streams after ``keep_layers``.
    """
    base, safe = cascade_labels_for(layout, windows, positions, (protect_last,), batch_size, desc, keep_layers,
                                    on_batch, protect_first)
    return base, safe[protect_last]


def cascade_labels_for(layout: DecoderLayout, windows: torch.Tensor, positions: Sequence[int],
                       protects: Sequence[int], batch_size: int = 4, desc: str = "cascade labels",
                       keep_layers: Sequence[int] = (), on_batch: Optional[Callable[[slice, Any], None]] = None,
                       protect_first: int = 1) -> Tuple[Pass, Dict[int, torch.Tensor]]:
    """:func:`cascade_labels` for several ``protect_last`` values at once: ``(base, {protect_last: safe})``.

    The exits at ``p`` under every value skip the same MLPs up to layer ``L-max(protects)-1``, so that part
    of each position's pass runs once and only the last layers run once per value (the calibration's two
    values cost about 1.2 passes' time instead of 2)."""
    L = layout.num_layers
    n, length = windows.shape
    protects = sorted(set(int(q) for q in protects))
    if not protects or protects[0] < 0:
        raise ValueError(f"protect_last values must be >= 0, got {list(protects)}")
    calls: dict = {}

    def capture(index):
        def hook(module, args, kwargs):
            calls[index] = (args[1:], kwargs)
        return hook

    def run_layers(h: torch.Tensor, first: int, stop: int, exit_layer: int, protect: int,
                   pos: torch.Tensor) -> torch.Tensor:
        """Layers ``first .. stop-1`` from ``h`` with the forced exit at ``exit_layer`` attached."""
        forced = SkipRuntime(ForcedExitDecider(L, exit_layer, protect), L, protect_first)
        att = HFAttachment(layout, forced)
        try:
            forced.begin(h.reshape(-1, h.shape[-1]), None, pos)
            for j in range(first, stop):
                args, kwargs = calls[j]
                h = _first_tensor(layout.layers[j](h, *args, **kwargs))
        finally:
            att.detach()
        return h

    rec = RecordingDecider(L, keep_layers=set(keep_layers) | set(p for p in positions if p < L - 1))
    runtime = SkipRuntime(rec, L)
    handles = [layer.register_forward_pre_hook(capture(j), with_kwargs=True) for j, layer in enumerate(layout.layers)]
    top1, nll = [], []
    safe: Dict[int, List[torch.Tensor]] = {q: [] for q in protects}
    try:
        with torch.no_grad():
            for sl in progress(list(batches(n, batch_size)), desc=desc):
                ids = windows[sl]
                attachment = HFAttachment(layout, runtime)
                try:
                    logits = layout.model(input_ids=ids, use_cache=False).logits.float()
                finally:
                    attachment.detach()
                base = logits[:, :-1].argmax(-1)
                top1.append(base.reshape(-1))
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                nll.append(-logp.gather(-1, ids[:, 1:, None]).reshape(-1).double())
                if on_batch is not None:
                    on_batch(sl, rec)
                pos = torch.arange(ids.shape[1]).repeat(ids.shape[0])
                cols: Dict[int, List[torch.Tensor]] = {q: [] for q in protects}
                for p in positions:
                    active = [q for q in protects if p < L - q - 1]  # the others have nothing left to skip
                    for q in protects:
                        if q not in active:
                            cols[q].append(torch.ones(base.numel(), dtype=torch.uint8))
                    if not active:
                        continue
                    # layers p+1 .. L-max(active)-1 skip their MLP under every value: run them once
                    split = L - max(active)
                    h = run_layers(rec.streams[p].view(*ids.shape, -1), p + 1, split, p, max(active), pos)
                    for q in active:
                        tail = run_layers(h, split, L, p, q, pos) if split < L else h
                        exit_top1 = layout.logits(tail)[:, :-1].float().argmax(-1)
                        cols[q].append((exit_top1 == base).reshape(-1).to(torch.uint8))
                for q in protects:
                    safe[q].append(torch.stack(cols[q], 1) if cols[q]
                                   else torch.zeros(base.numel(), 0, dtype=torch.uint8))
                calls.clear()
    finally:
        for handle in handles:
            handle.remove()
    return Pass(torch.cat(top1), torch.cat(nll)), {q: torch.cat(v) for q, v in safe.items()}


def first_order_changes(layout: DecoderLayout, windows: torch.Tensor, decider: Any, batch_size: int = 4,
                        protect_first: int = 1) -> Dict[str, int]:
    """What an online shadow check sees, on every position: run ``windows`` with ``decider`` attached and,
    for each token that skipped MLPs, add the skipped MLPs' outputs (computed on the inputs they were
    skipped on) back to its final residual stream; count the tokens whose top-1 that moves. It is first
    order: it does not replay how the skipped work would have changed later attention, so it reads lower
    than the measured risk (its ratio to the measured risk corrects sedac-vllm's online estimate).

    Returns ``{"tokens", "exited", "changed"}`` over the windows' positions but each window's last."""
    L = layout.num_layers
    runtime = SkipRuntime(decider, L, protect_first)
    delta: Dict[str, torch.Tensor] = {}

    def shadow(layer: int, flat: torch.Tensor, skip: torch.Tensor, full: Callable) -> None:
        idx = skip.nonzero().squeeze(1)
        if idx.numel():
            buf = delta.setdefault("d", torch.zeros(flat.shape, dtype=torch.float32))
            buf.index_add_(0, idx, full(flat.index_select(0, idx)).float())

    runtime.shadow = shadow
    captured: Dict[str, torch.Tensor] = {}
    hook = layout.final_norm.register_forward_pre_hook(lambda m, args: captured.__setitem__("h", args[0]))
    attachment = HFAttachment(layout, runtime)
    counts = {"tokens": 0, "exited": 0, "changed": 0}
    try:
        with torch.no_grad():
            for sl in progress(list(batches(windows.shape[0], batch_size)), desc="first-order check"):
                ids = windows[sl]
                delta.clear()
                served = layout.model(input_ids=ids, use_cache=False).logits.float()[:, :-1].argmax(-1)
                assert runtime.last_first_skip is not None  # finish() ran
                exited = (runtime.last_first_skip.view(ids.shape) < L)[:, :-1]
                changed = torch.zeros_like(exited)
                if "d" in delta:
                    h = captured["h"]
                    full = h.float() + delta["d"].view(h.shape)
                    changed = (layout.logits(full.to(h.dtype)).float()[:, :-1].argmax(-1) != served) & exited
                counts["tokens"] += int(exited.numel())
                counts["exited"] += int(exited.sum())
                counts["changed"] += int(changed.sum())
    finally:
        attachment.detach()
        hook.remove()
    return counts
