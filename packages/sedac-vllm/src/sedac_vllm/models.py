"""vLLM model classes with SEDAC: vLLM's own Qwen2 / Llama / Qwen3 classes, subclassed.

Nothing of vLLM's forward is copied. After vLLM builds the model, each decoder
layer's and each MLP's class is swapped for a subclass (same parameters, same
names, same weights loading):

* the decoder layer reports the residual stream after it (``hidden + residual``:
  vLLM fuses the residual add into the next RMSNorm) to the runtime, and the
  first layer starts the forward;
* the MLP goes through :class:`sedac_monitor.engine.SkipRuntime`, which runs it
  on the active rows only (gather -> MLP -> scatter) — the same code the HF
  accelerator uses.

Decisions are per row of vLLM's flattened ``[num_tokens, hidden]`` batch and
depend only on that row's own residual stream and position, so a request's
decisions do not depend on its neighbours, on chunked prefill or on prefix
caching. Under torch.compile the per-layer hooks run inside the custom ops
``sedac::begin`` / ``sedac::after_layer`` / ``sedac::skip_mlp``, which are
added to vLLM's graph splitting ops (untested on GPU; see the README).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import torch

from sedac_monitor.engine import channel_order, make_skippable, permute_channels

from . import runtime as rt_mod
from .config import ConfigError, SedacConfig

logger = logging.getLogger("sedac_vllm")
SPLITTING_OPS = ["sedac::begin", "sedac::after_layer", "sedac::skip_mlp"]
_OPS_READY = False


def _register_ops() -> None:
    global _OPS_READY
    if _OPS_READY:
        return

    @torch.library.custom_op("sedac::begin", mutates_args=())
    def begin(stream: torch.Tensor, positions: torch.Tensor, key: str) -> None:
        rt_mod.get(key).begin(stream, positions, None)

    @begin.register_fake
    def _(stream, positions, key):
        return None

    @torch.library.custom_op("sedac::after_layer", mutates_args=())
    def after_layer(hidden: torch.Tensor, residual: torch.Tensor, key: str, layer: int) -> None:
        sedac = rt_mod.get(key)
        sedac.after_layer(layer, hidden + residual if sedac.wants_stream(layer) else None)

    @after_layer.register_fake
    def _(hidden, residual, key, layer):
        return None

    _OPS_READY = True


class _SedacDecoderLayer:
    """Mixin in front of vLLM's decoder-layer class."""

    _sedac: "rt_mod.VllmSedac"
    _sedac_index: int

    def forward(self, positions, hidden_states, residual, *args, **kwargs):
        sedac, index = self._sedac, self._sedac_index
        compiling = torch.compiler.is_compiling()
        if index == 0:
            # a copy: vLLM's fused add+RMSNorm later updates the residual tensor in place
            stream = (hidden_states if residual is None else hidden_states + residual).clone()
            if compiling:
                torch.ops.sedac.begin(stream, positions, sedac.key)
            else:
                sedac.begin(stream, positions, sedac.pending_input_ids)
        hidden, residual = super().forward(positions, hidden_states, residual, *args, **kwargs)
        if compiling:
            torch.ops.sedac.after_layer(hidden, residual, sedac.key, index)
        else:
            sedac.after_layer(index, hidden + residual if sedac.wants_stream(index) else None)
        return hidden, residual


_LAYER_CLASSES: dict = {}


def _swap_layer(layer: torch.nn.Module, sedac, index: int) -> None:
    original = type(layer)
    cls = _LAYER_CLASSES.get(original)
    if cls is None:
        cls = type(f"Sedac{original.__name__}", (_SedacDecoderLayer, original), {"__module__": __name__})
        _LAYER_CLASSES[original] = cls
    layer.__class__ = cls
    layer._sedac = sedac
    layer._sedac_index = index


def vllm_truncated(mlp: torch.nn.Module):
    """``f(x, m)``: vLLM's merged gate/up MLP with its first ``m`` local intermediate channels.

    It reads copies of the weights taken at load time (``_sedac_gate_up`` / ``_sedac_down``, see
    :meth:`SedacModelMixin.load_weights`): vLLM's CPU backend repacks its linear weights after loading
    (leaving ``weight`` empty), so they cannot be sliced at run time.
    """
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

    tp = get_tensor_model_parallel_world_size()

    def run(x: torch.Tensor, m: int) -> torch.Tensor:
        w = mlp._sedac_gate_up
        inter = w.shape[0] // 2
        gate = torch.nn.functional.linear(x, w[:m])
        up = torch.nn.functional.linear(x, w[inter:inter + m])
        h = mlp.act_fn(torch.cat([gate, up], dim=-1))
        y = torch.nn.functional.linear(h, mlp._sedac_down[:, :m])
        return tensor_model_parallel_all_reduce(y) if tp > 1 else y

    return run


class SedacModelMixin:
    """Put in front of a vLLM ``*ForCausalLM`` class; see the module docstring."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        cfg = SedacConfig.from_env()
        if not cfg.enabled:  # registered in this process but disabled since: behave as vLLM's class
            self._sedac = None
            return
        if get_pp_group().world_size > 1:
            raise ConfigError("SEDAC does not support pipeline parallelism (pipeline_parallel_size > 1)")
        text_config = vllm_config.model_config.hf_config.get_text_config()
        layers = list(self.model.layers)
        device = next(iter(self.parameters())).device
        sedac = rt_mod.VllmSedac(cfg, text_config, len(layers), int(text_config.hidden_size), device,
                                 get_tensor_model_parallel_rank())
        sedac.pending_input_ids = None
        if cfg.soft_exit:
            quant = getattr(layers[0].mlp.gate_up_proj, "quant_method", None)
            if quant is not None and type(quant).__name__ != "UnquantizedLinearMethod":
                raise ConfigError(f"SEDAC_SOFT_EXIT=1 needs unquantized MLP weights ({type(quant).__name__} found)")
        for i, layer in enumerate(layers):
            _swap_layer(layer, sedac, i)
            make_skippable(layer.mlp, sedac.runtime, i, vllm_truncated(layer.mlp) if cfg.soft_exit else None)
        self._sedac = sedac
        comp = getattr(vllm_config, "compilation_config", None)
        if comp is not None and getattr(comp, "splitting_ops", None) is not None:
            _register_ops()
            for op in SPLITTING_OPS:
                if op not in comp.splitting_ops:
                    comp.splitting_ops.append(op)

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor, *args: Any, **kwargs: Any):
        if self._sedac is not None:
            self._sedac.pending_input_ids = input_ids
        return super().forward(input_ids, positions, *args, **kwargs)

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        sedac = self._sedac
        if sedac is not None and sedac.cfg.soft_exit:
            # soft exit computes a prefix of the intermediate channels: order them by importance once
            # (a permutation: the MLP computes the same function)
            for layer in self.model.layers:
                mlp = layer.mlp
                permute_channels(mlp, channel_order(mlp))
                # the truncated MLP's own copy (the backend may repack `weight` after loading)
                mlp._sedac_gate_up = mlp.gate_up_proj.weight.detach().clone()
                mlp._sedac_down = mlp.down_proj.weight.detach().clone()
            logger.info("SEDAC soft exit: MLP channels ordered by importance in %d layers (and copied for "
                        "truncated computation)", len(self.model.layers))
        return loaded


@functools.lru_cache(maxsize=None)
def sedac_class(base: type) -> type:
    return type(f"Sedac{base.__name__}", (SedacModelMixin, base), {"__module__": __name__})


def _base(module: str, name: str) -> type:
    import importlib

    return getattr(importlib.import_module(module), name)


# the classes registered with vLLM's ModelRegistry ("sedac_vllm.models:SedacQwen2ForCausalLM", ...)
def __getattr__(name: str) -> type:
    bases = {
        "SedacQwen2ForCausalLM": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
        "SedacLlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
        "SedacQwen3ForCausalLM": ("vllm.model_executor.models.qwen3", "Qwen3ForCausalLM"),
    }
    if name in bases:
        cls = sedac_class(_base(*bases[name]))
        cls.__name__ = cls.__qualname__ = name
        globals()[name] = cls
        return cls
    raise AttributeError(name)
