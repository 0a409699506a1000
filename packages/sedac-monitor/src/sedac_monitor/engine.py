"""The MLP-skipping runtime shared by the HF accelerator, sedac-probes and sedac-vllm.

A *decider* (V7 :class:`~sedac_monitor.decide.MonitorDecider`, or the V6
probe decider in sedac-probes) sees the residual stream after every decoder
layer and says, before each layer's MLP, which rows (tokens) skip it and what
fraction of MLP channels the others compute. :class:`SkipRuntime` applies
that plan: the MLP runs on the active rows only (gather -> MLP -> scatter);
skipped rows get a zero MLP output, so nothing is added to their residual.
When no row skips, the MLP is called on the untouched input, so a run without
exits is bit-identical to the unpatched model.

Decider protocol (duck-typed)::

    begin(stream0: Tensor[rows, hidden])      # stream entering layer 0; resets state
    plan(layer) -> (skip: bool[rows] | None, keep: float[rows] | None)
    after_layer(layer, stream: Tensor[rows, hidden])

Soft exit (``keep`` < 1) computes only the first ``m`` intermediate channels
of the MLP, in the order :func:`channel_order` documents; rows are grouped by
their channel count (multiples of ``intermediate / SOFT_GROUPS``, rounded up,
so a row never computes fewer channels than asked).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

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


class SkipRuntime:
    """Applies a decider's per-row plans to MLP calls and keeps :class:`ExitStats`.

    Tokens at sequence positions below ``protect_first`` (default 1: the first
    token) never skip: the first token is the attention sink every later token
    reads, and changing it changes everyone's prediction (measured: on
    SmolLM2-135M, tau 0.995 / K 2 changes 45% of top-1s with the first token
    exiting and 17% without). Positions are known only when the caller passes
    them to :meth:`begin`.
    """

    def __init__(self, decider: Any, num_layers: int, protect_first: int = 1) -> None:
        if isinstance(protect_first, bool) or not isinstance(protect_first, int) or protect_first < 0:
            raise ValueError(f"protect_first must be an integer >= 0, got {protect_first!r}")
        self.decider = decider
        self.num_layers = int(num_layers)
        self.protect_first = protect_first
        self._protected: Optional[torch.Tensor] = None
        self.stats: Optional[ExitStats] = None
        self.modules: Dict[int, nn.Module] = {}  # patched MLPs by layer (for the custom op)
        self.key = f"rt{id(self):x}"
        _RUNTIME_REGISTRY[self.key] = self
        self._valid: Optional[torch.Tensor] = None
        # per row, for the last completed forward: first skipped layer (num_layers: none) and MLP blocks skipped
        self.last_first_skip: Optional[torch.Tensor] = None
        self.last_row_skips: Optional[torch.Tensor] = None

    # -- forward-pass hooks -------------------------------------------------
    def begin(self, stream: torch.Tensor, valid: Optional[torch.Tensor] = None,
              positions: Optional[torch.Tensor] = None) -> None:
        """Start a forward over ``stream`` (``[rows, hidden]``, entering layer 0).
        ``valid``: bool[rows], False for padding (excluded from stats);
        ``positions``: int[rows] sequence positions (for ``protect_first``)."""
        rows = stream.shape[0]
        self._protected = self._allowed = None
        if positions is not None and self.protect_first > 0:
            self._protected = positions.reshape(-1) < self.protect_first
            self._allowed = ~self._protected
        if self.stats is None:
            self.stats = ExitStats(self.num_layers, stream.device)
        self._valid = valid
        self._rows, self._device = rows, stream.device
        self._skips: List[Any] = []  # (layer, skip mask) of the layers where rows skipped, this forward
        self._soft_parts: List[Any] = []  # (layer, fraction of channels skipped per row) of soft exits
        self.decider.begin(stream)

    def after_layer(self, layer: int, stream: torch.Tensor) -> None:
        self.decider.after_layer(layer, stream)
        if layer == self.num_layers - 1:
            self._finish()

    def _finish(self) -> None:
        """Fold this forward's skips into the per-row results and the running statistics."""
        L, dev = self.num_layers, self._device
        first = torch.full((self._rows,), L, dtype=torch.int64, device=dev)
        row_skips = torch.zeros(self._rows, dtype=torch.float32, device=dev)
        skipped = torch.zeros(L, dtype=torch.float64, device=dev)
        full = torch.zeros(L, dtype=torch.int64, device=dev)
        valid = self._valid
        for layer, skip in self._skips:
            first.masked_fill_(skip & (first == L), layer)
            row_skips += skip
            counted = skip if valid is None else skip & valid
            n = counted.sum()
            full[layer] += n
            skipped[layer] += n
        for layer, frac in self._soft_parts:  # partial skips: counted as work, not as exits
            row_skips += frac
            skipped[layer] += (frac if valid is None else frac * valid).double().sum()
        stats = self.stats
        counted_first = first if valid is None else first[valid]
        stats.tokens += counted_first.numel()
        stats.exit_hist += torch.bincount(counted_first, minlength=L + 1)
        stats.skipped += skipped
        stats.full_skips += full
        self.last_first_skip = first
        self.last_row_skips = row_skips
        self._skips = []
        self._soft_parts = []

    def reset_stats(self) -> None:
        self.stats = None

    # -- the MLP ------------------------------------------------------------
    def mlp(self, layer: int, x: torch.Tensor, full: Callable[[torch.Tensor], torch.Tensor],
            truncated: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
            intermediate: int = 0) -> torch.Tensor:
        """Run ``full`` (the MLP) on the rows the plan keeps; zeros for the rest.

        ``x`` is ``[..., hidden]`` with rows in the order the decider saw them.
        ``truncated(rows, m)`` computes the MLP with its first ``m`` channels;
        it is needed only when the plan has ``keep`` < 1.
        """
        skip, keep = self.decider.plan(layer)
        if skip is None and keep is None:
            return full(x)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        rows = flat.shape[0]
        if skip is None:
            skip = torch.zeros(rows, dtype=torch.bool, device=flat.device)
        if self._protected is not None:
            skip = skip & self._allowed
            if keep is not None:
                keep = torch.where(self._protected, torch.ones_like(keep), keep)
        if keep is None or truncated is None or intermediate <= 0:
            if keep is not None:
                raise RuntimeError("a soft-exit plan needs the MLP's truncated form and intermediate size")
            if not bool(skip.any()):  # the one host sync of a layer without exits
                return full(x)  # nothing skipped here: no bookkeeping either
            self._skips.append((layer, skip))  # counted once per forward, in _finish
            active = (~skip).nonzero().squeeze(1)
            out = flat.new_zeros(flat.shape)
            if active.numel():
                out.index_copy_(0, active, full(flat.index_select(0, active)))
            return out.view(shape)
        self._skips.append((layer, skip))
        return self._soft(layer, flat, skip, keep, full, truncated, intermediate).view(shape)

    def _soft(self, layer, flat, skip, keep, full, truncated, intermediate):
        step = max(intermediate // SOFT_GROUPS, 1)
        # channels to compute per row, rounded up to a multiple of `step`; skipped rows compute 0
        m = torch.clamp(torch.ceil(keep.float() * intermediate / step) * step, max=intermediate).to(torch.int64)
        m = torch.where(skip, torch.zeros_like(m), m)
        frac = torch.where(skip, torch.zeros(1, device=m.device), (intermediate - m).float() / intermediate)
        self._soft_parts.append((layer, frac))
        out = flat.new_zeros(flat.shape)
        values = torch.unique(m).tolist()  # one host sync; at most SOFT_GROUPS + 1 groups
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


def channel_order(mlp: nn.Module) -> torch.Tensor:
    """The order soft exit truncates in: channels by decreasing
    :func:`channel_importance`, ties by index (stable)."""
    imp = channel_importance(mlp)
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


def hf_truncated(mlp: nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``f(x, m)``: the HF gate/up/down MLP computed with its first ``m`` channels."""

    def run(x: torch.Tensor, m: int) -> torch.Tensor:
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

_SKIP_CLASSES: Dict[type, type] = {}


class _SkippableMLP:
    """Mixin put in front of the MLP's own class while a runtime is attached.

    In eager mode the forward calls the runtime directly. Under torch.compile
    the data-dependent gather -> MLP -> scatter runs inside the registered
    custom op ``sedac::skip_mlp`` (opaque to the compiler, with a fake
    implementation for shape propagation); vLLM also treats it as a graph
    splitting point, so it runs outside captured CUDA graphs.
    """

    _sedac_runtime: SkipRuntime
    _sedac_layer: int

    def forward(self, x):  # noqa: D401 - same contract as the wrapped MLP
        if torch.compiler.is_compiling():
            return skip_mlp_op()(x, self._sedac_runtime.key, self._sedac_layer)
        return self._sedac_call(x)

    def _sedac_call(self, x):
        return self._sedac_runtime.mlp(self._sedac_layer, x, super().forward, self._sedac_truncated,
                                       self._sedac_inter)


_RUNTIME_REGISTRY: "weakref.WeakValueDictionary[str, SkipRuntime]" = weakref.WeakValueDictionary()
_OP = None


def skip_mlp_op():
    """``torch.ops.sedac.skip_mlp(x, runtime_key, layer)``, registered on first use."""
    global _OP
    if _OP is None:
        @torch.library.custom_op("sedac::skip_mlp", mutates_args=())
        def skip_mlp(x: torch.Tensor, key: str, layer: int) -> torch.Tensor:
            rt = _RUNTIME_REGISTRY[key]
            return rt.modules[layer]._sedac_call(x)

        @skip_mlp.register_fake
        def _(x, key, layer):
            return torch.empty_like(x)

        _OP = torch.ops.sedac.skip_mlp
    return _OP


def make_skippable(mlp: nn.Module, runtime: SkipRuntime, layer: int,
                   truncated: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None) -> type:
    """Swap ``mlp``'s class for a subclass whose forward goes through ``runtime``.
    Parameter names, state_dict and weights are untouched. Returns the original
    class (give it to :func:`restore_mlp`)."""
    original = type(mlp)
    if issubclass(original, _SkippableMLP):
        raise RuntimeError(f"layer {layer}'s MLP is already patched by SEDAC (nested accelerators are not supported)")
    cls = _SKIP_CLASSES.get(original)
    if cls is None:
        cls = type(f"Sedac{original.__name__}", (_SkippableMLP, original), {"__module__": __name__})
        _SKIP_CLASSES[original] = cls
    mlp.__class__ = cls
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

    def __init__(self, layout, runtime: SkipRuntime, soft_exit: bool = False) -> None:
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
                if soft_exit:
                    order = channel_order(mlp)
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
