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

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .decide import Decider

SOFT_GROUPS = 16
"""Soft exit computes channel counts in steps of intermediate_size / SOFT_GROUPS."""


class ExitStats:
    """Running counts over the valid (non-padding) tokens a runtime has seen.

    ``exit_hist[j]`` counts tokens whose first skipped MLP was at layer ``j``
    (their exit layer is ``j - 1``); ``exit_hist[num_layers]`` counts tokens
    that never skipped. ``skipped[l]`` counts skipped MLP blocks at layer ``l``
    (a soft exit that computes a fraction ``f`` of the channels counts ``1 - f``).
    Counts stay on the model's device until read.
    """

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.num_layers = num_layers
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.exit_hist = torch.zeros(num_layers + 1, dtype=torch.int64, device=device)
        self.skipped = torch.zeros(num_layers, dtype=torch.float64, device=device)
        self.full_skips = torch.zeros(num_layers, dtype=torch.int64, device=device)

    @staticmethod
    def empty(num_layers: int) -> Dict[str, Any]:
        """:meth:`as_dict` before any token was seen."""
        return ExitStats(num_layers, torch.device("cpu")).as_dict()

    def as_dict(self) -> Dict[str, Any]:
        tokens = int(self.tokens)
        skipped = self.skipped.tolist()
        hist = self.exit_hist.tolist()
        total = tokens * self.num_layers
        return {
            "tokens": tokens,
            "skipped_mlp_blocks": float(sum(skipped)),
            "skipped_mlp_fraction": float(sum(skipped)) / total if total else 0.0,
            "per_layer_skip_rate": [s / tokens if tokens else 0.0 for s in skipped],
            # exit layer e = first skipped layer - 1; key "none" = no skip
            "exit_layer_histogram": {**{str(j - 1): c for j, c in enumerate(hist[:-1]) if c}, "none": hist[-1]},
            "exited_fraction": (tokens - hist[-1]) / tokens if tokens else 0.0,
        }


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
                            "wants_positions, step_layers (see sedac_monitor.runtime.Decider)")
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
        self._mode = self._policy(self._device)
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
        self._mode = self._policy(device)
        self._read_layer = self._choose_read_layer() if self._mode == "forward" else None

    def after_layer(self, layer: int, stream: torch.Tensor) -> None:
        wanted = self.decider.step_layers
        if wanted is None or layer in wanted:
            self.state = self.decider.step(layer, stream, self.state)
        if layer == self.num_layers - 1:
            self.finish()

    def _record(self, layer: int, skip: torch.Tensor, frac: Optional[torch.Tensor] = None) -> None:
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
        if frac is not None:  # partial skips: counted as work, not as exits
            acc["row_skips"] += frac
            acc["skipped"][layer] += (frac if valid is None else frac * valid).double().sum()

    def _record_everything_skipped(self, layer: int) -> None:
        """:meth:`_record` for a plan that skips every row, each of which already skipped an earlier layer
        (so no row's first skipped layer changes): three additions instead of a pass over the plan."""
        if not self.records:
            return
        acc = self._acc
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
        policy = self._mode
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
        m, frac = soft_channels(skip, keep, intermediate)
        self._record(layer, skip, frac)
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


def soft_channels(skip: torch.Tensor, keep: torch.Tensor, intermediate: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A soft-exit plan as channel counts: ``m`` (int64[rows], channels each row computes: ``keep`` of them
    rounded up to a multiple of ``intermediate / SOFT_GROUPS``, 0 for skipped rows) and ``frac`` (float[rows],
    the fraction of the MLP each row skips partially: 0 for skipped and full rows). Pure torch (compiles)."""
    step = max(intermediate // SOFT_GROUPS, 1)
    m = torch.clamp(torch.ceil(keep.float() * intermediate / step) * step, max=intermediate).to(torch.int64)
    m = torch.where(skip, torch.zeros_like(m), m)
    frac = torch.where(skip, torch.zeros(1, device=m.device), (intermediate - m).float() / intermediate)
    return m, frac


# ---------------------------------------------------------------------------
# MLP channel order and truncation (gate/up/down MLPs: HF and vLLM layouts)


def _hf_weights(mlp: nn.Module):
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def channel_importance(mlp: nn.Module) -> torch.Tensor:
    """Data-free importance of each intermediate channel c:
    ||W_up[c, :]||_2 * ||W_gate[c, :]||_2 * ||W_down[:, c]||_2 (an upper-bound
    proxy for how much the channel can add to the output)."""
    with torch.no_grad():
        if hasattr(mlp, "gate_up_proj"):  # vLLM: merged [2*I_local, H]
            w = mlp.gate_up_proj.weight
            inter = w.shape[0] // 2
            gate, up = w[:inter], w[inter:]
        else:
            gate, up, _ = _hf_weights(mlp)
        down = mlp.down_proj.weight
        return (gate.float().norm(dim=1) * up.float().norm(dim=1) * down.float().norm(dim=0)).cpu()


def channel_order(mlp: nn.Module, activation: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The order soft exit truncates in: channels by decreasing importance, ties by index (stable).

    Without ``activation``: the data-free :func:`channel_importance`. With ``activation`` (the mean
    ``|act(gate(x)) * up(x)|`` of each intermediate channel on calibration text, see
    :func:`sedac_monitor.runtime.activation_magnitudes`): ``activation[c] * ||W_down[:, c]||``, the
    channel's typical contribution to the MLP's output."""
    if activation is None:
        imp = channel_importance(mlp)
    else:
        with torch.no_grad():
            imp = activation.float().cpu() * mlp.down_proj.weight.float().norm(dim=0).cpu()
    return torch.sort(-imp, stable=True).indices


def permute_channels(mlp: nn.Module, order: torch.Tensor) -> None:
    """Reorder the MLP's intermediate channels in place (the MLP's function is
    unchanged; apply ``torch.argsort(order)`` to undo)."""
    with torch.no_grad():
        if hasattr(mlp, "gate_up_proj"):
            w = mlp.gate_up_proj.weight
            inter = w.shape[0] // 2
            idx = order.to(w.device)
            w.copy_(torch.cat([w[:inter][idx], w[inter:][idx]]))
            bias = getattr(mlp.gate_up_proj, "bias", None)
            if bias is not None:
                bias.copy_(torch.cat([bias[:inter][idx], bias[inter:][idx]]))
        else:
            for lin in (mlp.gate_proj, mlp.up_proj):
                idx = order.to(lin.weight.device)
                lin.weight.copy_(lin.weight[idx])
                if lin.bias is not None:
                    lin.bias.copy_(lin.bias[idx])
        down = mlp.down_proj.weight
        down.copy_(down[:, order.to(down.device)])


def channel_mask(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Zero, per row, the intermediate channels at and after that row's count ``m`` (int64[rows])."""
    idx = torch.arange(h.shape[-1], device=h.device)
    return h * (idx[None, :] < m[:, None]).to(h.dtype)


def hf_truncated(mlp: nn.Module) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """``f(x, m)``: the HF gate/up/down MLP computed with its first ``m`` channels; ``m`` is an int,
    or an int64 tensor with one count per row (then every channel is computed and masked per row)."""

    def run(x: torch.Tensor, m: Any) -> torch.Tensor:
        if isinstance(m, torch.Tensor):
            h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            return mlp.down_proj(channel_mask(h, m)) * (m > 0).to(x.dtype)[:, None]

        def lin(layer, rows=None):
            w = layer.weight[:m] if rows is None else layer.weight[:, :m]
            b = None if layer.bias is None else (layer.bias[:m] if rows is None else layer.bias)
            return w, b

        gw, gb = lin(mlp.gate_proj)
        uw, ub = lin(mlp.up_proj)
        dw, db = lin(mlp.down_proj, rows=True)
        h = mlp.act_fn(F.linear(x, gw, gb)) * F.linear(x, uw, ub)
        return F.linear(h, dw, db)

    return run


def intermediate_size(mlp: nn.Module) -> int:
    if hasattr(mlp, "gate_up_proj"):
        return int(mlp.gate_up_proj.weight.shape[0] // 2)
    return int(mlp.gate_proj.weight.shape[0])


# ---------------------------------------------------------------------------
# class swap: an MLP whose forward goes through the runtime

_SWAPPED: Dict[Tuple[type, type], type] = {}


def subclass_with(mixin: type, cls: type) -> type:
    """``class Sedac<cls>(mixin, cls)``, made once per pair and reused (so instances of the same
    class share one subclass, and ``isinstance`` against ``cls`` still holds)."""
    made = _SWAPPED.get((mixin, cls))
    if made is None:
        made = type(f"Sedac{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})
        _SWAPPED[(mixin, cls)] = made
    return made


class SkippableMLP:
    """Mixin put in front of the MLP's own class while a runtime is attached: the forward asks the
    runtime (and through it the decider) which rows run. Hugging Face models run it eagerly;
    compiled models (sedac-vllm) subclass it and run the plan their own way (:meth:`SkipRuntime.apply`)."""

    _sedac_runtime: SkipRuntime
    _sedac_layer: int

    def forward(self, x):  # noqa: D401 - same contract as the wrapped MLP
        if torch.compiler.is_compiling():
            raise RuntimeError("SEDAC's Hugging Face accelerator runs eagerly: call torch.compile on the model "
                               "outside the accelerator's `with` block, or serve with sedac-vllm")
        return self._sedac_runtime.mlp(self._sedac_layer, x, super().forward, self._sedac_truncated,
                                       self._sedac_inter)


def make_skippable(mlp: nn.Module, runtime: SkipRuntime, layer: int,
                   truncated: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None,
                   mixin: type = SkippableMLP) -> type:
    """Swap ``mlp``'s class for a subclass whose forward goes through ``runtime``.
    Parameter names, state_dict and weights are untouched. Returns the original
    class (give it to :func:`restore_mlp`)."""
    original = type(mlp)
    if issubclass(original, SkippableMLP):
        raise RuntimeError(f"layer {layer}'s MLP is already patched by SEDAC (nested accelerators are not supported)")
    mlp.__class__ = subclass_with(mixin, original)
    mlp._sedac_runtime = runtime
    runtime.modules[layer] = mlp
    mlp._sedac_layer = layer
    mlp._sedac_truncated = truncated
    mlp._sedac_inter = intermediate_size(mlp)
    return original


def restore_mlp(mlp: nn.Module, original: type) -> None:
    rt = mlp.__dict__.get("_sedac_runtime")
    if rt is not None:
        rt.modules.pop(mlp.__dict__.get("_sedac_layer"), None)
    mlp.__class__ = original
    for attr in ("_sedac_runtime", "_sedac_layer", "_sedac_truncated", "_sedac_inter"):
        mlp.__dict__.pop(attr, None)


# ---------------------------------------------------------------------------
# attaching a runtime to a Hugging Face model


def _first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


class HFAttachment:
    """Hooks and class swaps that route an HF causal LM's forward through a runtime.

    ``detach()`` removes every hook, restores every MLP class and undoes any
    channel permutation, leaving the model exactly as it was.
    """

    def __init__(self, layout, runtime: SkipRuntime, soft_exit: bool = False,
                 orders: Optional[List[torch.Tensor]] = None) -> None:
        self.layout = layout
        self.runtime = runtime
        self._handles: List[Any] = []
        self._originals: List[type] = []
        self._orders: List[Optional[torch.Tensor]] = []
        self._mask: Optional[torch.Tensor] = None
        model = layout.model
        try:
            self._handles.append(model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
            self._handles.append(layout.layers[0].register_forward_pre_hook(self._begin, with_kwargs=True))
            for i, layer in enumerate(layout.layers):
                self._handles.append(layer.register_forward_hook(self._after(i)))
                mlp = layer.mlp
                order = None
                if soft_exit:  # `orders`: one channel permutation per layer (default: the data-free order)
                    order = orders[i] if orders is not None else channel_order(mlp)
                    permute_channels(mlp, order)
                self._orders.append(order)
                self._originals.append(make_skippable(mlp, runtime, i, hf_truncated(mlp) if soft_exit else None))
        except BaseException:
            self.detach()
            raise

    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _begin(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, seq = hidden.shape[0], hidden.shape[1]
        valid = positions = None
        mask = self._mask
        if mask is not None and mask.shape[0] == batch and mask.shape[1] >= seq:
            # positions counted over real tokens, so a left-padded sequence's first token is position 0
            valid = mask[:, -seq:].reshape(-1).bool()
            positions = (mask.long().cumsum(-1) - 1)[:, -seq:].reshape(-1)
        else:
            pid = kwargs.get("position_ids")
            if isinstance(pid, torch.Tensor) and pid.shape[-1] == seq:
                positions = pid.reshape(-1, seq).expand(batch, seq).reshape(-1)
        self.runtime.begin(hidden.reshape(-1, hidden.shape[-1]), valid, positions)

    def _after(self, index: int):
        def hook(module, args, output):
            out = _first_tensor(output)
            self.runtime.after_layer(index, out.reshape(-1, out.shape[-1]))
        return hook

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for i, original in enumerate(self._originals):
            mlp = self.layout.layers[i].mlp
            restore_mlp(mlp, original)
            order = self._orders[i]
            if order is not None:
                permute_channels(mlp, torch.argsort(order))
        self._originals.clear()
        self._orders.clear()
