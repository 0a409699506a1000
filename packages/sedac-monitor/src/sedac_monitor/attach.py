"""Attaching a runtime to a Hugging Face model: a hook that starts each forward (with the attention mask's
positions), one after every decoder layer, and the MLP class swaps; :meth:`HFAttachment.detach` undoes all of
it exactly."""

from __future__ import annotations

from typing import Any, List, Optional

import torch

from .channels import channel_order, hf_truncated, permute_channels
from .engine import SkipRuntime
from .patching import make_skippable, restore_mlp


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
