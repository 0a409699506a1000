"""vLLM model classes with SEDAC: vLLM's own Qwen2 / Llama / Qwen3 classes, subclassed.

Nothing of vLLM's forward is copied. After vLLM builds the model, each decoder
layer's and each MLP's class is swapped for a subclass (same parameters, same
names, same weight loading):

* the decoder layer starts the decider's state from the stream entering layer 0
  and advances it with the residual stream after every layer (``hidden +
  residual``: vLLM fuses the residual add into the next RMSNorm); after the
  last layer it calls the ``sedac::finish`` op (statistics, trace, adaptive
  thresholds);
* the MLP asks the decider for its layer's plan and, where rows skip, runs masked
  in the graph or, where the rows removed pay for it, through the ``sedac::skip_mlp``
  op (the active rows only, with the gather -> MLP -> scatter the HF accelerator uses).

The decision math is plain torch on tensors that flow from layer to layer, so
vLLM's compiler (dynamo + inductor on CPU, piecewise CUDA graphs on GPU) puts
it in the model's graph; only the data-dependent row selection and the
bookkeeping live in the two custom ops, registered when the plugin loads.
Eager execution (``enforce_eager``) runs the same code without compiling it.

Decisions are per row of vLLM's flattened ``[num_tokens, hidden]`` batch and
depend only on that row's own residual stream and position, so a request's
decisions do not depend on its neighbours, on chunked prefill or on prefix
caching. With tensor parallelism every rank computes the same decisions from
the same (all-reduced) residual stream.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Optional, Tuple

import torch

from sedac_monitor.api import (
    SkippableMLP,
    channel_mask,
    channel_order,
    make_skippable,
    permute_channels,
    subclass_with,
)

from . import channel_kernel, ops
from . import state as state_mod
from .config import ConfigError
from .plugin import active_config

logger = logging.getLogger("sedac_vllm")


class _SedacDecoderLayer:
    """Mixin in front of vLLM's decoder-layer class."""

    _sedac: "state_mod.VllmSedac"
    _sedac_index: int

    def forward(self, positions, hidden_states, residual, *args, **kwargs):
        sedac, index = self._sedac, self._sedac_index
        if index == 0:
            # a copy: vLLM's fused add+RMSNorm later updates these tensors in place (eager execution)
            sedac.begin((hidden_states if residual is None else hidden_states + residual).clone(), positions)
        hidden, residual = super().forward(positions, hidden_states, residual, *args, **kwargs)
        sedac.after_layer(index, hidden, residual, positions)
        return hidden, residual


class _SedacMLP(SkippableMLP):
    """vLLM's MLP with the plan taken from the in-graph decider state: layers where no row can skip run
    vLLM's MLP untouched; elsewhere :meth:`VllmSedac.run_mlp <sedac_vllm.state.VllmSedac.run_mlp>` picks
    the masked path (in the graph) or the gather path (the ``sedac::skip_mlp`` op) by what each costs."""

    _sedac_owner: "state_mod.VllmSedac"

    _sedac_act: Any = None
    # channel soft exit: whether this layer masks its input and its down projection's input; the two
    # thresholds are the buffer ``_sedac_thresholds``
    _sedac_channels: Optional[Tuple[bool, bool]] = None
    # whether zeroing a row of the down projection's input zeroes that row of the MLP's output (no bias added
    # by the down projection, activation not fused with a quantization): the masked path then masks there
    _sedac_inner_mask = False

    def forward(self, x):
        return self._sedac_owner.run_mlp(self, x)

    def _sedac_vanilla(self, x):
        if self._sedac_channels is not None:
            return self._sedac_owner.channel_mlp(self, x)
        return super(SkippableMLP, self).forward(x)

    def _sedac_kernel_op(self, x):
        return torch.ops.sedac.channel_mlp(x, self._sedac_owner.key, self._sedac_layer)

    def _sedac_masked_mlp(self, x, skip=None):
        """vLLM's MLP (gate/up, activation, down, as its forward runs them) with entries of the inputs zeroed,
        per token: with channel soft exit, the input's entries below the layer's input threshold and the down
        projection input's below its inner threshold (elementwise, so every tensor-parallel rank masks its own
        shard as the whole would be masked); and the rows of ``skip`` at the down projection's input, so they
        come out zero. Masked, not gathered: the dense matrices run, in the graph, and the result is what a
        channel kernel would compute; the masks join the activation's kernel, so they cost no extra pass.

        The thresholds are a tensor, not constants: the compiled graph reads them as inputs, so every
        layer's masks are one kernel (as constants, each layer compiled its own: 144 s against vanilla's
        56 s for SmolLM2's 30 layers on 2 cores)."""
        mask_in, mask_mid = self._sedac_channels or (False, False)
        t = self._sedac_thresholds if mask_in or mask_mid else None
        if mask_in:
            x = x.masked_fill(x.abs() < t[0], 0)
        h, _ = self.gate_up_proj(x)
        h = self.act_fn(h)
        if mask_mid:
            small = h.abs() < t[1]
            h = h.masked_fill(small if skip is None else small | skip[:, None], 0)
        elif skip is not None:
            h = h.masked_fill(skip[:, None], 0)
        y, _ = self.down_proj(h)
        return y

    def _sedac_masked(self, x, skip, keep, m):
        """Every row through vLLM's MLP, skipped rows zeroed (at the down projection's input where that zeroes
        the output, else at the output); with a soft exit every channel computed and each row's first ``m``
        kept. Out of place (a ``torch.cond`` branch)."""
        if m is not None:
            return self._sedac_truncated(x, m)
        if self._sedac_inner_mask:
            return self._sedac_masked_mlp(x, skip)
        return self._sedac_vanilla(x).masked_fill(skip[:, None], 0)

    def _sedac_op(self, x, skip, keep, m):
        return torch.ops.sedac.skip_mlp(x, skip, keep, self._sedac_owner.key, self._sedac_layer)

    _sedac_direct: Any = None

    def _sedac_full(self, x):
        """The whole MLP as the op runs it (eagerly, outside the compiled graph): vLLM's own layers, with
        the activation called directly (see :func:`eager_activation`), and on CPU their GEMM kernels
        called directly too (see :func:`direct_mlp`)."""
        act = self._sedac_act
        if self._sedac_channels is not None:
            return self._sedac_owner.channel_mlp(self, x)
        if act is None:
            return super(SkippableMLP, self).forward(x)
        direct = self._sedac_direct
        if direct is None:
            direct = self._sedac_direct = direct_mlp(self, act) or False
        if direct:
            return direct(x)
        h, _ = self.gate_up_proj(x)
        y, _ = self.down_proj(act(h))
        return y

    def _sedac_local(self):
        """``f(x)``: this rank's shard of the MLP without the all-reduce (for timing: no collective, so each
        rank can time it on its own), or None where vLLM's kernels cannot be called directly."""
        act = self._sedac_act
        return direct_mlp(self, act, shard=True) if act is not None else None



def quantization(linear: torch.nn.Module) -> Optional[str]:
    """The class name of a vLLM linear layer's quantization method, or None for unquantized weights."""
    quant = getattr(linear, "quant_method", None)
    name = type(quant).__name__
    return None if quant is None or name == "UnquantizedLinearMethod" else name


def eager_activation(mlp: torch.nn.Module):
    """The MLP's activation as a plain callable for use inside SEDAC's op, or None to use vLLM's forward.

    Compiled, vLLM disables its custom activation kernels and wraps their torch-native code in
    ``torch.compile``, for calls from inside opaque ops. Called per layer from SEDAC's op that wrapper costs
    about 100 µs a call on CPU (guards, recompiles for new shapes) — more than the activation itself for a
    decode batch — and gives the same values as the native code run directly (checked bit for bit: the
    e2e tests compare SEDAC without exits to vanilla vLLM). So the native code is called directly; an
    enabled kernel (eager execution) is called as vLLM calls it. Quantized MLPs (which may fuse the activation
    with the next layer's input quantization) keep vLLM's forward.
    """
    act, down = getattr(mlp, "act_fn", None), getattr(mlp, "down_proj", None)
    if act is None or down is None or getattr(mlp, "gate_up_proj", None) is None:
        return None
    if quantization(down):
        return None
    method = getattr(act, "_forward_method", None)
    if method is None:
        return act
    if getattr(method, "__self__", None) is act:  # a bound method of the op: an enabled kernel, or native code
        return method
    native = getattr(act, "forward_native", None)
    return native if native is not None else act


def inner_mask_zeroes_rows(mlp: Any) -> bool:  # a vLLM MLP module
    """Whether a row of zeros at the down projection's input gives a row of zeros at the MLP's output: the
    down projection adds no bias, and the MLP is gate/up -> activation -> down with unquantized weights (its
    activation is not fused with a quantization of the down projection's input)."""
    down = getattr(mlp, "down_proj", None)
    if eager_activation(mlp) is None or quantization(mlp.gate_up_proj):
        return False
    return getattr(down, "bias", None) is None or bool(getattr(down, "skip_bias_add", False))


def direct_mlp(mlp: Any, act, shard: bool = False):  # a vLLM MLP module
    """``f(x)``: the MLP with the GEMM kernels vLLM's CPU backend picked for its two linear layers
    (``cpu_linear``, set when the weights are loaded) called directly, or None where that is not the
    same computation as the layers' forward: not on CPU, tensor parallel (the down projection's
    all-reduce; ``shard=True`` accepts that and computes this rank's partial sum), quantized weights.

    The op runs the MLP once per layer per forward outside the compiled graph, where the layers'
    Python (module call, quantization method, GEMM dispatch) is paid eagerly; at decode batch sizes on
    CPU that is a visible share of the MLP's time. The kernels, inputs and bias are the layers' own,
    so the values are the same (the e2e tests compare SEDAC without exits to vanilla vLLM bit for bit).
    """
    gate_up, down = mlp.gate_up_proj, mlp.down_proj
    for lin in (gate_up, down):
        if getattr(lin, "cpu_linear", None) is None or (getattr(lin, "tp_size", 1) != 1 and not shard) \
                or quantization(lin):
            return None
    gate_up_mm, down_mm = gate_up.cpu_linear, down.cpu_linear

    def run(x):
        h = gate_up_mm(x, gate_up.weight, None if gate_up.skip_bias_add else gate_up.bias)
        return down_mm(act(h), down.weight, None if down.skip_bias_add else down.bias)

    return run


def _swap_layer(layer: Any, sedac, index: int) -> None:  # a vLLM decoder layer
    layer.__class__ = subclass_with(_SedacDecoderLayer, type(layer))
    layer._sedac = sedac
    layer._sedac_index = index


def vllm_truncated(mlp: Any):  # a vLLM MLP module
    """``f(x, m)``: vLLM's merged gate/up MLP with its first ``m`` local intermediate channels (``m`` an
    int, or an int64 tensor with a count per row: every channel computed, then masked per row).

    It reads copies of the weights taken at load time (``_sedac_gate_up`` / ``_sedac_down``, see
    :meth:`SedacModelMixin.load_weights`): vLLM's CPU backend repacks its linear weights after loading
    (leaving ``weight`` empty), so they cannot be sliced at run time.
    """
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

    tp = get_tensor_model_parallel_world_size()

    def run(x: torch.Tensor, m: Any) -> torch.Tensor:
        w = mlp._sedac_gate_up
        inter = w.shape[0] // 2
        act = mlp._sedac_act or mlp.act_fn
        if isinstance(m, torch.Tensor):
            h = act(torch.nn.functional.linear(x, w))
            y = torch.nn.functional.linear(channel_mask(h, m), mlp._sedac_down)
        else:
            gate = torch.nn.functional.linear(x, w[:m])
            up = torch.nn.functional.linear(x, w[inter:inter + m])
            h = act(torch.cat([gate, up], dim=-1))
            y = torch.nn.functional.linear(h, mlp._sedac_down[:, :m])
        return tensor_model_parallel_all_reduce(y) if tp > 1 else y

    return run


if TYPE_CHECKING:
    _VllmCausalLM = Any  # what the mixin is put in front of: a vLLM *ForCausalLM (model, compute_logits, ...)
else:
    _VllmCausalLM = object


class SedacModelMixin(_VllmCausalLM):
    """Put in front of a vLLM ``*ForCausalLM`` class; see the module docstring."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        cfg = active_config()
        if not cfg.enabled:  # registered in this process but disabled since: behave as vLLM's class
            self._sedac = None
            return
        from vllm.distributed import get_tensor_model_parallel_world_size

        if cfg.online and get_tensor_model_parallel_world_size() > 1:
            raise ConfigError("SEDAC_ONLINE=1 supports tensor_parallel_size=1 only (its shadow check reads the "
                              "LM head's output on one rank)")
        if get_pp_group().world_size > 1:
            raise ConfigError("SEDAC does not support pipeline parallelism (pipeline_parallel_size > 1): a "
                              "token's exit state would have to cross the stage boundary with the residual "
                              "stream. Use tensor parallelism (tensor_parallel_size), which SEDAC supports.")
        text_config = vllm_config.model_config.hf_config.get_text_config()
        layers = list(self.model.layers)
        device = next(iter(self.parameters())).device
        if device.type == "cpu":
            from .allocator import keep_freed_memory

            logger.info("SEDAC: glibc malloc %s", keep_freed_memory())
        sched = getattr(vllm_config, "scheduler_config", None)
        max_rows = max(int(getattr(sched, "max_num_batched_tokens", 0) or 0),
                       int(getattr(sched, "max_num_seqs", 0) or 0), 1)
        sedac = state_mod.VllmSedac(cfg, text_config, len(layers), int(text_config.hidden_size), device,
                                 get_tensor_model_parallel_rank(), max_rows=max_rows)
        self._sedac_dtype = vllm_config.model_config.dtype
        self._sedac_hidden = int(text_config.hidden_size)
        sedac.pending_input_ids = None
        if cfg.soft_exit:
            quant = quantization(layers[0].mlp.gate_up_proj)
            if quant:
                raise ConfigError(f"SEDAC_SOFT_EXIT=1 needs unquantized MLP weights ({quant} found)")
        for i, layer in enumerate(layers):
            _swap_layer(layer, sedac, i)
            make_skippable(layer.mlp, sedac.runtime, i, vllm_truncated(layer.mlp) if cfg.soft_exit else None,
                           mixin=_SedacMLP)
            layer.mlp._sedac_owner = sedac
            if cfg.channels is not None:
                t_in, t_mid = float(cfg.channels[0][i]), float(cfg.channels[1][i])
                layer.mlp._sedac_channels = (t_in > 0, t_mid > 0)
                layer.mlp.register_buffer("_sedac_thresholds", torch.tensor(
                    [t_in, t_mid], device=next(layer.mlp.parameters()).device), persistent=False)
            sedac.mlps[i] = layer.mlp
            layer.mlp._sedac_act = eager_activation(layer.mlp)
            layer.mlp._sedac_inner_mask = inner_mask_zeroes_rows(layer.mlp)
        if cfg.channels is not None and cfg.channel_kernel != "never":
            why = channel_kernel.unusable(layers[0].mlp)
            if why:
                logger.info("SEDAC: channel soft exit runs masked on the dense matrices (the channel kernel "
                            "cannot run this MLP: %s)", why)
            sedac.kernel_wanted = not why
        self._sedac = sedac
        sedac.final_norm = self.model.norm  # the shadow check's top-1: final norm, then vLLM's own LM head
        sedac.compute_logits = self.compute_logits
        _adapt_compilation(vllm_config, sedac)

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor, *args: Any, **kwargs: Any):
        sedac = self._sedac
        if sedac is None:
            return super().forward(input_ids, positions, *args, **kwargs)
        if sedac.cost is None and positions.device.type == "cpu":
            _measure_cost(self, sedac)
        sedac.pending_input_ids = input_ids
        sedac.warming_up = _is_dummy_run()
        before = sedac.runtime.forwards
        out = super().forward(input_ids, positions, *args, **kwargs)
        if sedac.runtime.forwards == before:
            raise RuntimeError(
                "SEDAC is enabled but this forward never reached its ops: the model vLLM runs was built without "
                "them (for example a compiled graph loaded from vLLM's compile cache that was made without "
                "SEDAC). Start-up stops here rather than serve without SEDAC. Clear vLLM's compile cache "
                "(~/.cache/vllm/torch_compile_cache) or set VLLM_DISABLE_COMPILE_CACHE=1, and retry.")
        return out

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
        if sedac is not None and sedac.kernel_wanted:
            assert sedac.cfg.channels is not None  # kernel_wanted implies channels
            t_in, t_mid = sedac.cfg.channels
            nbytes = sum(channel_kernel.prepare(layer.mlp, t_in[i], t_mid[i])
                         for i, layer in enumerate(self.model.layers))
            logger.info("SEDAC channel soft exit: the MLP weights copied channel-major for the channel kernel "
                        "(%.0f MiB more memory; the serving setting \"channel_kernel\": \"never\" saves it)",
                        nbytes / 2**20)
        return loaded


def _measure_cost(model: Any, sedac: "state_mod.VllmSedac") -> None:
    """Before the first forward (weights loaded and repacked by then): time the layers' MLPs, called in turn
    as a forward calls them, which decides where gathering pays (see :meth:`VllmSedac.measure_cost
    <sedac_vllm.state.VllmSedac.measure_cost>`)."""
    from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

    mlps = [layer.mlp for layer in model.model.layers]
    local = [mlp._sedac_local() for mlp in mlps]
    tp = get_tensor_model_parallel_world_size()
    if any(f is None for f in local) and tp > 1:
        logger.warning("SEDAC: this MLP's kernels cannot be timed per rank (quantized or not vLLM's CPU linear "
                       "layers): layers where some rows skip run masked (SEDAC_GATHER=always to gather anyway)")
        sedac.cost = False
        return
    device = next(model.parameters()).device
    timed = [f if f is not None else mlp._sedac_full for f, mlp in zip(local, mlps)]
    broadcast = get_tp_group().broadcast_object if tp > 1 else None
    sedac.measure_cost(timed, model._sedac_hidden, model._sedac_dtype, device, broadcast)
    if sedac.kernel_wanted:
        sedac.time_kernel(channel_kernel.runner(tp), broadcast, timed)


def _is_dummy_run() -> bool:
    """vLLM's profiling and warm-up forwards run without attention metadata; real batches have it."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return not is_forward_context_available() or get_forward_context().attn_metadata is None


def _adapt_compilation(vllm_config: Any, sedac: "state_mod.VllmSedac") -> None:
    """Make vLLM's compilation SEDAC-aware:

    * SEDAC's settings are baked into the compiled graph (thresholds, layers), so they join the
      compile-cache key (``additional_config`` is part of vLLM's config hash): a graph compiled
      without SEDAC, or with other settings, is never loaded for this one;
    * on GPU, the custom ops become graph-splitting points, so they run eagerly between the
      CUDA-graph pieces, and full-model CUDA graphs (which could not contain them) are turned off.
    """
    extra = getattr(vllm_config, "additional_config", None)
    if isinstance(extra, dict):
        extra["sedac"] = sedac.cache_key()
    comp = getattr(vllm_config, "compilation_config", None)
    if comp is None:
        return
    splitting = getattr(comp, "splitting_ops", None)
    if isinstance(splitting, list):
        for op in ops.SPLITTING_OPS:
            if op not in splitting:
                splitting.append(op)
    mode = getattr(comp, "cudagraph_mode", None)
    if mode is not None and hasattr(mode, "has_full_cudagraphs") and mode.has_full_cudagraphs():
        from vllm.config import CUDAGraphMode

        logger.info("SEDAC: cudagraph_mode %s -> PIECEWISE (SEDAC's ops run between the graph pieces)", mode)
        comp.cudagraph_mode = CUDAGraphMode.PIECEWISE


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
