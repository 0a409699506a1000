"""The MLP helpers sedac::skip_mlp runs with, on stand-ins for vLLM's layers (no engine): which layers
take the direct CPU GEMM path, and that it computes what the layers' own forward computes."""

import torch
import torch.nn.functional as F

from sedac_monitor.api import subclass_with
from sedac_vllm.models import _SedacMLP, direct_mlp, eager_activation, inner_mask_zeroes_rows, quantization


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


def test_inner_mask_only_where_a_zero_row_in_is_a_zero_row_out():
    assert inner_mask_zeroes_rows(mlp())
    assert not inner_mask_zeroes_rows(mlp(bias=True))  # the down projection would add its bias to a zero row
    with_bias_returned = mlp(bias=True)
    with_bias_returned.down_proj.skip_bias_add = True  # the bias is returned, and vLLM's MLP drops it
    assert inner_mask_zeroes_rows(with_bias_returned)
    assert not inner_mask_zeroes_rows(mlp(method=Fp8LinearMethod))


def sedac_mlp(**kwargs):
    class Base(torch.nn.Module):  # vLLM's MLP forward: gate/up, activation, down
        def forward(self, x):
            h, _ = self.gate_up_proj(x)
            y, _ = self.down_proj(self.act_fn(h))
            return y

    m = Base()
    base = mlp(**kwargs)
    m.gate_up_proj, m.down_proj, m.act_fn = base.gate_up_proj, base.down_proj, base.act_fn
    m.__class__ = subclass_with(_SedacMLP, Base)
    return m


def test_masked_path_masks_rows_at_the_down_projection_input_as_at_the_output():
    """The masked path zeroes skipped rows at the down projection's input (the mask joins the activation's
    kernel) where that zeroes the output: the rows that run are bit for bit what vLLM's MLP gives them, the
    skipped rows are zero, and with a bias it masks the output instead."""
    torch.manual_seed(0)
    x = torch.randn(7, 8)
    skip = torch.tensor([True, False, False, True, False, True, False])
    for kwargs in ({}, {"bias": True}):
        m = sedac_mlp(**kwargs)
        m._sedac_inner_mask = inner_mask_zeroes_rows(m)
        assert m._sedac_inner_mask == (not kwargs)
        want = m._sedac_vanilla(x).masked_fill(skip[:, None], 0)
        got = m._sedac_masked(x, skip, None, None)
        assert torch.equal(got[~skip], want[~skip])
        assert torch.equal(got[skip], torch.zeros_like(got[skip]))
        assert torch.equal(m._sedac_masked(x, torch.zeros_like(skip), None, None), m._sedac_vanilla(x))


def test_masked_path_with_channel_masks_keeps_both_masks():
    torch.manual_seed(1)
    x = torch.randn(6, 8)
    skip = torch.tensor([False, True, False, False, True, False])
    m = sedac_mlp()
    m._sedac_inner_mask = True
    m._sedac_channels = (True, True)
    m.register_buffer("_sedac_thresholds", torch.tensor([0.5, 0.3]), persistent=False)
    h, _ = m.gate_up_proj(x.masked_fill(x.abs() < 0.5, 0))
    h = m.act_fn(h)
    want, _ = m.down_proj(h.masked_fill(h.abs() < 0.3, 0))
    got = m._sedac_masked(x, skip, None, None)
    assert torch.equal(got[~skip], want[~skip])
    assert torch.equal(got[skip], torch.zeros_like(got[skip]))
    assert torch.equal(m._sedac_vanilla(x), want)
