"""The MLP-skipping runtime shared by the HF accelerator, sedac-probes and sedac-vllm.

A *decider* (V7 :class:`~sedac_monitor.decide.MonitorDecider`, or the V6
probe decider in sedac-probes) sees the residual stream after every decoder
layer and says, before each layer's MLP, which rows (tokens) skip it and what
fraction of MLP channels the others compute. :class:`SkipRuntime` applies
that plan: the MLP runs on the active rows only (gather -> MLP -> scatter);
skipped rows get a zero MLP output, so nothing is added to their residual.
When no row skips, the MLP is called on the untouched input, so a run without
exits is bit-identical to the unpatched model.

The decider follows the :class:`~sedac_monitor.decide.Decider` protocol
(functional: ``start`` / ``step`` / ``plan``, the forward's state kept here in
:attr:`SkipRuntime.state`), the same protocol sedac-vllm's compiled forward uses.

Soft exit (``keep`` < 1) computes only the first ``m`` intermediate channels
of the MLP, in the order :func:`channel_order` documents; rows are grouped by
their channel count (multiples of ``intermediate / SOFT_GROUPS``, rounded up,
so a row never computes fewer channels than asked).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from .channels import soft_channels
from .decide import Decider
from .stats import ExitStats

HOST_SYNC_POLICIES = ("layer", "forward", "none")
"""How often the runtime may read a plan on the host (the only way to learn how many rows skip):

* ``layer``: at every layer whose plan can skip rows. Costs nothing on a CPU (the tensors already
  live in host memory); the default there.
* ``forward``: at most once per forward, at the layer where past forwards skipped the most MLP work;
  cascade plans (an exited row stays exited) reuse that compaction for every later layer, and rows
  that exit after it run masked. The default on accelerators, where a host read waits for the device.
* ``none``: never; every plan runs masked (exact outputs, no work saved). For debugging.
"""

GATHER_MIN_FRACTION = 1 / 32
"""Below this fraction of skipped rows, a layer runs the MLP on every row and zeroes the skipped ones
(the masked path) instead of gathering the active rows: copying the rows costs more than the MLP
work saved (see the sedac-vllm README, "Overhead")."""


class SkipRuntime:
    """Applies a decider's per-row plans to MLP calls and keeps :class:`ExitStats`.

    Tokens at sequence positions below ``protect_first`` (default 1: the first
    token) never skip: the first token is the attention sink every later token
    reads, and changing it changes everyone's prediction (measured: on
    SmolLM2-135M, tau 0.995 / K 2 changes 45% of top-1s with the first token
    exiting and 17% without). Positions are known only when the caller passes
    them to :meth:`begin`.

    Two ways in: :meth:`mlp` asks the decider for the layer's plan (from the
    forward's decider state, :attr:`state`), which is how the Hugging Face
    hooks use it; :meth:`apply` takes the plan as
    tensors, which is how a compiled model (sedac-vllm) calls it from inside its
    gather op. ``host_sync`` is one of
    :data:`HOST_SYNC_POLICIES` (default: ``layer`` on CPU, ``forward`` elsewhere).
    """

    def __init__(self, decider: Decider, num_layers: int, protect_first: int = 1,
                 host_sync: Optional[str] = None) -> None:
        if isinstance(protect_first, bool) or not isinstance(protect_first, int) or protect_first < 0:
            raise ValueError(f"protect_first must be an integer >= 0, got {protect_first!r}")
        if not isinstance(decider, Decider):
            raise TypeError(f"{type(decider).__name__} is not a decider: SkipRuntime needs start(stream), "
                            "step(layer, stream, state), plan(layer, state) and the properties monotone, "
                            "wants_positions, step_layers (see sedac_monitor.api.Decider)")
        if host_sync is not None and host_sync not in HOST_SYNC_POLICIES:
            raise ValueError(f"host_sync must be one of {HOST_SYNC_POLICIES}, got {host_sync!r}")
        self.decider = decider
        self.num_layers = int(num_layers)
        self.state: Any = None  # the decider's state for the current forward (start / step / plan)
        self.protect_first = protect_first
        self.host_sync = host_sync
        self._protected: Optional[torch.Tensor] = None
        self.stats: Optional[ExitStats] = None
        self.modules: Dict[int, nn.Module] = {}  # patched MLPs by layer (for the custom op)
        self._valid: Optional[torch.Tensor] = None
        self._rows, self._device = 0, torch.device("cpu")
        self._sync = self._policy(self._device)
        self._acc: Optional[Dict[str, torch.Tensor]] = None
        self._active: Optional[torch.Tensor] = None
        self._read_layer: Optional[int] = None
        self.forwards = 0  # completed forwards (the vLLM start-up check reads it)
        # called as shadow(layer, rows, skip, mlp) wherever rows skip: lets a caller compute, without applying,
        # what a sample of them skipped (sedac-vllm's online risk estimate)
        self.shadow: Optional[Callable[[int, torch.Tensor, torch.Tensor, Callable], None]] = None
        # False: the caller keeps this forward's per-row results itself (sedac-vllm computes them inside the
        # compiled graph, whichever path a layer takes) and hands them to finish(); True: apply() records them
        self.records = True
        self.host_reads = 0  # reads of a plan on the host, this forward (the policy bounds it)
        self.max_host_reads = 0  # the most host reads any forward needed
        # per row, for the last completed forward: first skipped layer (num_layers: none) and MLP blocks skipped
        self.last_first_skip: Optional[torch.Tensor] = None
        self.last_row_skips: Optional[torch.Tensor] = None

    # -- forward-pass hooks -------------------------------------------------
    def begin(self, stream: torch.Tensor, valid: Optional[torch.Tensor] = None,
              positions: Optional[torch.Tensor] = None) -> None:
        """Start a forward over ``stream`` (``[rows, hidden]``, entering layer 0).
        ``valid``: bool[rows], False for padding (excluded from stats);
        ``positions``: int[rows] sequence positions (for ``protect_first``)."""
        self._protected = self._allowed = None
        if positions is not None and self.protect_first > 0:
            self._protected = positions.reshape(-1) < self.protect_first
            self._allowed = ~self._protected
        self.start(stream.shape[0], stream.device, valid)
        if self.decider.wants_positions:  # e.g. a fused probe gate reads positions
            if positions is None:
                positions = torch.arange(stream.shape[0], device=stream.device)
            self.state = self.decider.start(stream, positions.reshape(-1))
        else:
            self.state = self.decider.start(stream)

    def start(self, rows: int, device: torch.device, valid: Optional[torch.Tensor] = None) -> None:
        """Reset the per-forward bookkeeping (what :meth:`begin` does besides starting the decider)."""
        if self.stats is None:
            self.stats = ExitStats(self.num_layers, device)
        self._valid = valid
        self._rows, self._device = rows, device
        self._acc = None  # this forward's per-row results so far (see _record)
        self._active = None
        self.host_reads = 0
        self._sync = self._policy(device)
        self._read_layer = self._choose_read_layer() if self._sync == "forward" else None

    def after_layer(self, layer: int, stream: torch.Tensor) -> None:
        wanted = self.decider.step_layers
        if wanted is None or layer in wanted:
            self.state = self.decider.step(layer, stream, self.state)
        if layer == self.num_layers - 1:
            self.finish()

    def _record(self, layer: int, skip: torch.Tensor, partial: Optional[torch.Tensor] = None) -> None:
        """Fold one layer's plan into this forward's per-row results at once. Nothing of the plan is
        kept: inside a compiled graph the tensors an op receives are the compiler's buffers, which it
        reuses for later values once the op returns."""
        if not self.records:
            return
        acc = self._acc
        if acc is None:
            L, dev, rows = self.num_layers, skip.device, skip.shape[0]
            acc = self._acc = {"first": torch.full((rows,), L, dtype=torch.int64, device=dev),
                               "row_skips": torch.zeros(rows, dtype=torch.float32, device=dev),
                               "skipped": torch.zeros(L, dtype=torch.float64, device=dev),
                               "full": torch.zeros(L, dtype=torch.int64, device=dev)}
        valid = self._valid
        first = acc["first"]
        first.masked_fill_(skip & (first == self.num_layers), layer)
        acc["row_skips"] += skip
        n = (skip if valid is None else skip & valid).sum()
        acc["full"][layer] += n
        acc["skipped"][layer] += n
        if partial is not None:  # partial skips: counted as work, not as exits
            acc["row_skips"] += partial
            acc["skipped"][layer] += (partial if valid is None else partial * valid).double().sum()

    def _record_everything_skipped(self, layer: int) -> None:
        """:meth:`_record` for a plan that skips every row, each of which already skipped an earlier layer
        (so no row's first skipped layer changes): three additions instead of a pass over the plan."""
        if not self.records:
            return
        acc = self._acc
        assert acc is not None  # _record filled it before the compaction that leads here
        valid = self._valid
        n = acc["row_skips"].shape[0] if valid is None else valid.sum()
        acc["row_skips"] += 1
        acc["full"][layer] += n
        acc["skipped"][layer] += n

    def set_results(self, first: torch.Tensor, row_skips: torch.Tensor, skipped: torch.Tensor,
                    full: torch.Tensor) -> None:
        """This forward's per-row results as the caller kept them (``records`` False): first skipped layer
        per row (``num_layers``: none), MLP blocks skipped per row, and per layer the MLP blocks skipped
        (soft exits fractionally) and the rows that skipped the whole MLP. :meth:`finish` folds them in."""
        self._acc = {"first": first.to(torch.int64), "row_skips": row_skips.float(), "skipped": skipped.double(),
                     "full": full.to(torch.int64)}

    def finish(self) -> None:
        """Fold this forward's per-row results into the running statistics."""
        L, dev = self.num_layers, self._device
        acc = self._acc
        if acc is None:  # no layer skipped anything
            first = torch.full((self._rows,), L, dtype=torch.int64, device=dev)
            row_skips = torch.zeros(self._rows, dtype=torch.float32, device=dev)
        else:
            first, row_skips = acc["first"], acc["row_skips"]
        valid = self._valid
        stats = self.stats
        assert stats is not None  # start() made it
        counted_first = first if valid is None else first[valid]
        stats.tokens += counted_first.numel()
        stats.exit_hist += torch.bincount(counted_first, minlength=L + 1)
        if acc is not None:
            stats.skipped += acc["skipped"]
            stats.full_skips += acc["full"]
        self.last_first_skip = first
        self.last_row_skips = row_skips
        self._acc = None
        self._active = None
        self.forwards += 1
        self.max_host_reads = max(self.max_host_reads, self.host_reads)

    def end_forward(self, rows: int, device: torch.device, count: bool = True) -> None:
        """:meth:`finish` for callers that never called :meth:`begin` (a compiled model's
        ``sedac::finish`` op), then reset for the next forward. ``count=False``: a forward whose
        rows are not real tokens (a serving engine's warm-up): statistics and per-row results
        stay as they were."""
        self._rows, self._device = rows, device
        if count:
            self.finish()
        else:
            self.forwards += 1
            self.max_host_reads = max(self.max_host_reads, self.host_reads)
        self.start(0, device)

    def reset_stats(self) -> None:
        self.stats = None

    # -- when to read a plan on the host -----------------------------------
    def _policy(self, device: torch.device) -> str:
        if self.host_sync is not None:
            return self.host_sync
        return "layer" if torch.device(device).type == "cpu" else "forward"

    def _choose_read_layer(self) -> Optional[int]:
        """``forward`` policy: the layer whose read saved the most MLP work in past forwards (an
        estimate from the running statistics: rows skipping there, times the layers a cascade keeps
        them skipped); ``None`` when no past forward skipped anything."""
        stats = self.stats
        if stats is None or int(stats.tokens) == 0:  # CPU/host counters; on a device, one read per forward
            return None
        rates = (stats.full_skips.double() / float(stats.tokens)).cpu().tolist()
        monotone = bool(self.decider.monotone)
        best, best_gain = None, 0.0
        for layer, rate in enumerate(rates):
            later = sum(1 for r in rates[layer:] if r > 0) if monotone else 1
            gain = rate * later
            if gain > best_gain:
                best, best_gain = layer, gain
        return best

    def _may_read(self, layer: int) -> bool:
        policy = self._sync
        if policy == "layer":
            return True
        if policy == "forward":
            return self.host_reads == 0 and layer == self._read_layer
        return False

    # -- the MLP ------------------------------------------------------------
    def mlp(self, layer: int, x: torch.Tensor, full: Callable[[torch.Tensor], torch.Tensor],
            truncated: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None,
            intermediate: int = 0) -> torch.Tensor:
        """Run ``full`` (the MLP) on the rows the decider's plan keeps; zeros for the rest.

        ``x`` is ``[..., hidden]`` with rows in the order the decider saw them.
        ``truncated(rows, m)`` computes the MLP with its first ``m`` channels
        (``m`` an int, or an int64 tensor with one count per row); it is needed
        only when the plan has ``keep`` < 1.
        """
        skip, keep = self.decider.plan(layer, self.state)
        if skip is None and keep is None:
            return full(x)
        if self._protected is not None:
            if skip is not None:
                assert self._allowed is not None  # set with _protected in begin()
                skip = skip & self._allowed
            if keep is not None:
                keep = torch.where(self._protected, torch.ones_like(keep), keep)
        return self.apply(layer, x, skip, keep, full, truncated, intermediate)

    def apply(self, layer: int, x: torch.Tensor, skip: Optional[torch.Tensor], keep: Optional[torch.Tensor],
              full: Callable[[torch.Tensor], torch.Tensor],
              truncated: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None,
              intermediate: int = 0) -> torch.Tensor:
        """Execute a plan given as tensors (``skip`` bool[rows], ``keep`` float[rows]; protection
        already applied). The output equals the MLP on kept rows and zero on skipped rows, whichever
        path runs; the policy only decides how much work that costs."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        rows = flat.shape[0]
        if keep is not None:
            if truncated is None or intermediate <= 0:
                raise RuntimeError("a soft-exit plan needs the MLP's truncated form and intermediate size")
            if skip is None:
                skip = torch.zeros(rows, dtype=torch.bool, device=flat.device)
            return self._soft(layer, flat, skip, keep, full, truncated, intermediate).view(shape)
        if skip is None:
            return full(x)
        if self.shadow is not None:
            self.shadow(layer, flat, skip, full)
        if self._active is not None and self._active.numel() == 0:
            # a cascade whose every row exited at an earlier layer skips everything here too: no read needed
            self._record_everything_skipped(layer)
            return flat.new_zeros(flat.shape).view(shape)
        if self._may_read(layer):
            self.host_reads += 1
            n = int(skip.sum())  # the host read
            if n == 0:
                return full(x)  # nothing skipped here: no bookkeeping either
            self._record(layer, skip)
            if n == rows:
                if self.decider.monotone:
                    self._active = flat.new_zeros(0, dtype=torch.int64)
                return flat.new_zeros(flat.shape).view(shape)
            if n < GATHER_MIN_FRACTION * rows:
                return full(flat).masked_fill_(skip[:, None], 0).view(shape)
            active = (~skip).nonzero().squeeze(1)
            if self.decider.monotone:
                self._active = active  # rows skipped now stay skipped in later layers
            return self._gathered(flat, active, None, full).view(shape)
        self._record(layer, skip)
        if self._active is not None:  # a cascade compacted at an earlier layer: run only what was active then
            return self._gathered(flat, self._active, skip, full).view(shape)
        return full(flat).masked_fill_(skip[:, None], 0).view(shape)

    @staticmethod
    def _gathered(flat, active, skip, full):
        out = flat.new_zeros(flat.shape)
        if active.numel():
            y = full(flat.index_select(0, active))
            if skip is not None:  # rows that skipped since the compaction: computed, then zeroed
                y.masked_fill_(skip.index_select(0, active)[:, None], 0)
            out.index_copy_(0, active, y)
        return out

    def _soft(self, layer, flat, skip, keep, full, truncated, intermediate):
        m, partial = soft_channels(skip, keep, intermediate)
        self._record(layer, skip, partial)
        if not self._may_read(layer):
            # masked: every row computes every channel, and each row keeps the first m of them
            return truncated(flat, m)
        self.host_reads += 1
        values = torch.unique(m).tolist()  # the host read; at most SOFT_GROUPS + 1 groups
        if values == [intermediate]:
            return full(flat)  # no row truncated or skipped: nothing to gather
        out = flat.new_zeros(flat.shape)
        for value in values:
            if value == 0:
                continue
            rows = (m == value).nonzero().squeeze(1)
            part = flat.index_select(0, rows)
            y = full(part) if value >= intermediate else truncated(part, int(value))
            out.index_copy_(0, rows, y)
        return out




# ---------------------------------------------------------------------------
# MLP channel order and truncation (gate/up/down MLPs: HF and vLLM layouts)
















# ---------------------------------------------------------------------------
# class swap: an MLP whose forward goes through the runtime











# ---------------------------------------------------------------------------
# attaching a runtime to a Hugging Face model




