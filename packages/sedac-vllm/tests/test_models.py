"""The MLP helpers sedac::skip_mlp runs with, on stand-ins for vLLM's layers (no engine): which layers
take the direct CPU GEMM path, and that it computes what the layers' own forward computes."""

import torch
import torch.nn.functional as F

from sedac_vllm.models import direct_mlp, eager_activation, quantization


class UnquantizedLinearMethod:  # named as vLLM's: quantization() goes by the class name
    pass


class Fp8LinearMethod:
    pass


class Linear(torch.nn.Module):
    """A vLLM-like linear layer: ``cpu_linear`` as vLLM's CPU backend sets it, forward returning (y, bias)."""

    def __init__(self, d_in, d_out, method=UnquantizedLinearMethod, tp_size=1, bias=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d_out, d_in), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(d_out), requires_grad=False) if bias else None
        self.skip_bias_add = False
        self.tp_size = tp_size
        self.quant_method = method()
        self.cpu_linear = F.linear

    def forward(self, x):
        return self.cpu_linear(x, self.weight, self.bias), None


def silu_and_mul(h):
    d = h.shape[-1] // 2
    return F.silu(h[..., :d]) * h[..., d:]


def mlp(**kwargs):
    m = torch.nn.Module()
    m.gate_up_proj = Linear(8, 12, **kwargs)
    m.down_proj = Linear(6, 8, **kwargs)
    m.act_fn = silu_and_mul
    return m


def test_quantization_names_the_method_or_none():
    assert quantization(Linear(4, 4)) is None
    assert quantization(torch.nn.Linear(4, 4)) is None  # no quant_method at all: plain weights
    assert quantization(Linear(4, 4, method=Fp8LinearMethod)) == "Fp8LinearMethod"


def test_direct_mlp_equals_the_layers_forward():
    torch.manual_seed(0)
    m = mlp(bias=True)
    x = torch.randn(5, 8)
    run = direct_mlp(m, silu_and_mul)
    want, _ = m.down_proj(silu_and_mul(m.gate_up_proj(x)[0]))
    assert torch.equal(run(x), want)


def test_direct_mlp_keeps_the_module_path_where_it_would_differ():
    assert direct_mlp(mlp(tp_size=3), silu_and_mul) is None  # the down projection all-reduces
    assert direct_mlp(mlp(method=Fp8LinearMethod), silu_and_mul) is None
    no_kernel = mlp()
    del no_kernel.down_proj.cpu_linear  # not on CPU: vLLM sets cpu_linear only there
    assert direct_mlp(no_kernel, silu_and_mul) is None


def test_eager_activation_leaves_quantized_mlps_to_vllm():
    assert eager_activation(mlp(method=Fp8LinearMethod)) is None
    assert eager_activation(mlp()) is silu_and_mul  # a plain callable: called as it is
