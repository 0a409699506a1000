"""Soft exit's channels, for gate/up/down MLPs in the Hugging Face and vLLM layouts: the order a soft exit
truncates in (data-free weight norms, or activation statistics from calibration text), the permutation that
puts that order first, a truncated MLP, per-row channel masks, and the per-row channel counts of a plan
(multiples of ``intermediate / SOFT_GROUPS``)."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple, cast

import torch
import torch.nn.functional as F

from .layouts import DecoderLayout
from .loading import batches

SOFT_GROUPS = 16
"""Soft exit computes channel counts in multiples of intermediate_size / SOFT_GROUPS."""


def soft_channels(skip: torch.Tensor, keep: torch.Tensor, intermediate: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A soft-exit plan as channel counts: ``m`` (int64[rows], channels each row computes: ``keep`` of them
    rounded up to a multiple of ``intermediate / SOFT_GROUPS``, 0 for skipped rows) and ``partial`` (float[rows],
    the fraction of the MLP each row skips partially: 0 for skipped and full rows). Pure torch (compiles)."""
    group = max(intermediate // SOFT_GROUPS, 1)
    m = torch.clamp(torch.ceil(keep.float() * intermediate / group) * group, max=intermediate).to(torch.int64)
    m = torch.where(skip, torch.zeros_like(m), m)
    partial = torch.where(skip, torch.zeros(1, device=m.device), (intermediate - m).float() / intermediate)
    return m, partial


def _hf_weights(mlp: Any):  # an HF gate/up/down MLP (submodules reached by attribute)
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def channel_importance(mlp: Any) -> torch.Tensor:  # an HF or vLLM MLP module
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


def channel_order(mlp: Any, activation: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The order soft exit truncates in: channels by decreasing importance, ties by index (stable).

    Without ``activation``: the data-free :func:`channel_importance`. With ``activation`` (the mean
    ``|act(gate(x)) * up(x)|`` of each intermediate channel on calibration text, see
    :func:`sedac_monitor.api.activation_magnitudes`): ``activation[c] * ||W_down[:, c]||``, the
    channel's typical contribution to the MLP's output."""
    if activation is None:
        imp = channel_importance(mlp)
    else:
        with torch.no_grad():
            imp = activation.float().cpu() * mlp.down_proj.weight.float().norm(dim=0).cpu()
    return torch.sort(-imp, stable=True).indices


def permute_channels(mlp: Any, order: torch.Tensor) -> None:
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


def hf_truncated(mlp: Any) -> Callable[[torch.Tensor, Any], torch.Tensor]:
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


def intermediate_size(mlp: Any) -> int:
    if hasattr(mlp, "gate_up_proj"):
        return int(mlp.gate_up_proj.weight.shape[0] // 2)
    return int(mlp.gate_proj.weight.shape[0])


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
            mlp: Any = layer.mlp  # an HF MLP: down_proj reached by attribute
            handles.append(mlp.down_proj.register_forward_pre_hook(hook(i)))
        with torch.no_grad():
            for sl in batches(windows.shape[0], batch_size):
                layout.model(input_ids=windows[sl], use_cache=False)
                count += windows[sl].numel()
    finally:
        for h in handles:
            h.remove()
    return [(s / count).float() for s in cast(List[torch.Tensor], sums)]  # every layer's hook ran
