"""Loading local Hugging Face models and text, and teacher-forced passes over token windows.

Shared by ``sedac-monitor calibrate``, ``sedac-probes collect`` and sedac-bench.
Everything here reads local folders and files only; a hub id that is not a
local folder is an error that says so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import torch

from .engine import HFAttachment, SkipRuntime, _first_tensor
from .layouts import DecoderLayout, find_layout


class InputError(ValueError):
    """A user-supplied path, file or value is unusable; the message names it."""


def load_model(model_dir: Any, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local HF folder, in eval mode on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(f"model folder not found: {path} (SEDAC loads local Hugging Face folders only)")
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a Hugging Face model folder: config.json is missing")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - re-raised with the folder named
        raise InputError(f"cannot load the tokenizer from {path}: {exc}") from exc
    find_layout(model)  # fail early, naming the class, for unsupported layouts
    return model, tokenizer


def read_text(path: Any) -> str:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"text file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InputError(f"text file is empty: {p}")
    return text


def token_windows(tokenizer, text: str, max_length: int, samples: Optional[int] = None,
                  source: str = "text") -> torch.Tensor:
    """Consecutive, non-overlapping windows of ``max_length`` tokens from ``text``
    (the tail that does not fill a window is dropped). Returns int64 ``[n, max_length]``."""
    if max_length < 2:
        raise InputError(f"max_length must be >= 2, got {max_length}")
    if samples is not None and samples < 1:
        raise InputError(f"samples must be >= 1, got {samples}")
    ids: List[int] = []
    need = None if samples is None else samples * max_length
    # tokenize paragraph by paragraph: fast, and stops once enough tokens are read
    for para in text.split("\n\n"):
        if para.strip():
            ids.extend(tokenizer(para + "\n\n", add_special_tokens=False)["input_ids"])
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // max_length
    if samples is not None:
        n = min(n, samples)
    if n == 0:
        raise InputError(f"{source} has {len(ids)} tokens, fewer than one window of max_length={max_length}")
    return torch.tensor(ids[: n * max_length], dtype=torch.int64).view(n, max_length)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


PROGRESS_ENV = "SEDAC_PROGRESS"
"""The one environment variable sedac-monitor reads: 0 turns its progress bars off."""


def progress(iterable, total: Optional[int] = None, desc: str = "", enabled: Optional[bool] = None):
    """tqdm progress bar on stderr (off when SEDAC_PROGRESS=0)."""
    if enabled is None:
        enabled = os.environ.get(PROGRESS_ENV, "1") != "0"
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


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


class RecordingDecider:
    """Never skips; records the similarity S_l after every layer, and optionally
    the residual stream at some layers (for probes and the logit lens). A
    :class:`~sedac_monitor.decide.Decider` whose state is the previous stream;
    what it records is kept on the object (``sims``, ``streams``: the last
    forward's), for the Hugging Face passes that read it."""

    monotone = False
    wants_positions = False
    step_layers = None

    def __init__(self, num_layers: int, keep_layers: Sequence[int] = ()) -> None:
        from .decide import similarity

        self._similarity = similarity
        self.num_layers = num_layers
        self.keep_layers = set(keep_layers)
        self.sims: List[torch.Tensor] = []
        self.streams: Dict[int, torch.Tensor] = {}

    def start(self, stream: torch.Tensor) -> torch.Tensor:
        self.sims = []
        self.streams = {}
        return stream

    def plan(self, layer: int, state: torch.Tensor) -> Tuple[None, None]:
        return None, None

    def step(self, layer: int, stream: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        self.sims.append(self._similarity(stream, state))
        if layer in self.keep_layers:
            self.streams[layer] = stream
        return stream


class ForcedExitDecider:
    """Every row skips the MLPs of layers ``exit_layer+1 .. num_layers-protect_last-1``."""

    monotone = False
    wants_positions = False
    step_layers: FrozenSet[int] = frozenset()  # decides from the layer index alone

    def __init__(self, num_layers: int, exit_layer: int, protect_last: int = 0) -> None:
        self.end = num_layers - protect_last
        self.exit_layer = exit_layer

    def start(self, stream: torch.Tensor) -> torch.Tensor:
        return torch.ones(stream.shape[0], dtype=torch.bool, device=stream.device)

    def plan(self, layer: int, state: torch.Tensor) -> Tuple[Optional[torch.Tensor], None]:
        return (state, None) if self.exit_layer < layer < self.end else (None, None)

    def step(self, layer: int, stream: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return state


def activation_magnitudes(layout: DecoderLayout, windows: torch.Tensor, batch_size: int = 4) -> List[torch.Tensor]:
    """Per layer, the mean ``|act(gate(x)) * up(x)|`` of every MLP intermediate channel over ``windows``
    (the input of ``down_proj``): what a data-calibrated soft-exit channel order ranks by."""
    sums: List[Optional[torch.Tensor]] = [None] * layout.num_layers
    count = 0
    handles = []

    def hook(i):
        def grab(module, args):
            h = args[0].detach().abs().reshape(-1, args[0].shape[-1]).double().sum(0)
            sums[i] = h if sums[i] is None else sums[i] + h
        return grab

    try:
        for i, layer in enumerate(layout.layers):
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook(i)))
        with torch.no_grad():
            for sl in batches(windows.shape[0], batch_size):
                layout.model(input_ids=windows[sl], use_cache=False)
                count += windows[sl].numel()
    finally:
        for h in handles:
            h.remove()
    return [(s / count).float() for s in sums]


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
    L = layout.num_layers
    n, length = windows.shape
    calls: dict = {}

    def capture(index):
        def hook(module, args, kwargs):
            calls[index] = (args[1:], kwargs)
        return hook

    rec = RecordingDecider(L, keep_layers=set(keep_layers) | set(p for p in positions if p < L - 1))
    runtime = SkipRuntime(rec, L)
    handles = [layer.register_forward_pre_hook(capture(j), with_kwargs=True) for j, layer in enumerate(layout.layers)]
    top1, nll, safe = [], [], []
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
                cols = []
                for p in positions:
                    if p >= L - protect_last - 1:  # nothing left to skip
                        cols.append(torch.ones(base.numel(), dtype=torch.uint8))
                        continue
                    forced = SkipRuntime(ForcedExitDecider(L, p, protect_last), L, protect_first)
                    att = HFAttachment(layout, forced)
                    try:
                        h = rec.streams[p].view(*ids.shape, -1)
                        pos = torch.arange(ids.shape[1]).repeat(ids.shape[0])
                        forced.begin(h.reshape(-1, h.shape[-1]), None, pos)
                        for j in range(p + 1, L):
                            args, kwargs = calls[j]
                            h = _first_tensor(layout.layers[j](h, *args, **kwargs))
                        exit_top1 = layout.logits(h)[:, :-1].float().argmax(-1)
                    finally:
                        att.detach()
                    cols.append((exit_top1 == base).reshape(-1).to(torch.uint8))
                safe.append(torch.stack(cols, 1) if cols else torch.zeros(base.numel(), 0, dtype=torch.uint8))
                calls.clear()
    finally:
        for h in handles:
            h.remove()
    return Pass(torch.cat(top1), torch.cat(nll)), torch.cat(safe)


def drop_last_position(per_token: torch.Tensor, windows: int, length: int) -> torch.Tensor:
    """[windows*length, ...] -> [windows*(length-1), ...], matching :class:`Pass`."""
    return per_token.reshape(windows, length, *per_token.shape[1:])[:, :-1].reshape(-1, *per_token.shape[1:])


def split_windows(n: int, fraction: float) -> Tuple[slice, slice]:
    cut = max(1, min(n - 1, int(round(n * fraction))))
    return slice(0, cut), slice(cut, n)
