"""Class swap: an MLP whose forward goes through a runtime, and back. Parameter names, ``state_dict`` and
weights are untouched; the swapped class is a subclass of the original, made once per pair."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .channels import intermediate_size

if TYPE_CHECKING:
    from .engine import SkipRuntime


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


def make_skippable(mlp: Any, runtime: SkipRuntime, layer: int,
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
