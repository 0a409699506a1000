"""The MLP helpers sedac::skip_mlp runs with, on stand-ins for vLLM's layers (no engine): which layers
take the direct CPU GEMM path, and that it computes what the layers' own forward computes."""

import torch
import torch.nn.functional as F

from sedac_monitor.api import subclass_with
from sedac_vllm import channel_kernel
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


class SiluAndMul(torch.nn.Module):  # named as vLLM's activation: the channel kernel goes by the class name
    def forward(self, h):
        return silu_and_mul(h)


class Owner:
    """The part of VllmSedac a layer's channel MLP talks to, with ``kernel_rows`` true up to ``upto`` rows."""

    from sedac_vllm.state import VllmSedac

    channel_mlp = VllmSedac.channel_mlp
    kernel_mlp = VllmSedac.kernel_mlp

    def __init__(self, upto, max_rows=8):
        rows = torch.arange(max_rows + 1)
        self.kernel_rows = None if upto is None else (rows >= 1) & (rows <= upto)
        self.max_rows, self.kernel_calls, self.mlps = max_rows, 0, {}
        self.run_kernel = channel_kernel.runner(1)


def channel_mlp(owner, t_in=0.5, t_mid=0.3):
    m = sedac_mlp()
    m._sedac_inner_mask = True
    m._sedac_channels = (True, True)
    m.register_buffer("_sedac_thresholds", torch.tensor([t_in, t_mid]), persistent=False)
    m._sedac_owner, owner.mlps[0] = owner, m
    m._sedac_kernel_op = lambda x: owner.kernel_mlp(0, x)  # the sedac::channel_mlp op's body
    channel_kernel.prepare(m, t_in, t_mid)
    return m


def test_the_channel_kernel_runs_up_to_its_batch_size_and_computes_the_masked_mlp():
    torch.manual_seed(2)
    owner = Owner(upto=2)
    m = channel_mlp(owner)
    for rows, calls in ((1, 1), (2, 2), (3, 2), (6, 2)):
        x = torch.randn(rows, 8)
        h = m.act_fn(m.gate_up_proj(x.masked_fill(x.abs() < 0.5, 0))[0])
        want = m.down_proj(h.masked_fill(h.abs() < 0.3, 0))[0]
        got = m._sedac_vanilla(x)
        assert owner.kernel_calls == calls, rows
        if rows <= 2:  # the kernel: the same values, summed in another order
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:  # masked on the dense matrices
            assert torch.equal(got, want)
    assert channel_mlp(Owner(None))._sedac_vanilla(torch.randn(1, 8)).shape == (1, 8)  # no kernel: masked


def test_what_the_channel_kernel_cannot_run_is_named():
    m = mlp()
    m.act_fn = SiluAndMul()
    assert channel_kernel.unusable(m) is None
    assert "activation function" in channel_kernel.unusable(mlp())
    m = mlp(bias=True)
    m.act_fn = SiluAndMul()
    assert "bias" in channel_kernel.unusable(m)
    m = mlp(method=Fp8LinearMethod)
    m.act_fn = SiluAndMul()
    assert "Fp8LinearMethod" in channel_kernel.unusable(m)
    m = mlp()
    m.act_fn = SiluAndMul()
    m.down_proj.weight.data = m.down_proj.weight.data.to(torch.bfloat16)
    assert "bfloat16" in channel_kernel.unusable(m)


def test_masked_path_with_channel_masks_keeps_both_masks():
    torch.manual_seed(1)
    x = torch.randn(6, 8)
    skip = torch.tensor([False, True, False, False, True, False])
    m = channel_mlp(Owner(None))
    h, _ = m.gate_up_proj(x.masked_fill(x.abs() < 0.5, 0))
    h = m.act_fn(h)
    want, _ = m.down_proj(h.masked_fill(h.abs() < 0.3, 0))
    got = m._sedac_masked(x, skip, None, None)
    assert torch.equal(got[~skip], want[~skip])
    assert torch.equal(got[skip], torch.zeros_like(got[skip]))
    assert torch.equal(m._sedac_vanilla(x), want)


def test_the_crossover_times_every_size_and_runs_the_kernel_up_to_its_first_loss():
    torch.manual_seed(3)
    owner = Owner(upto=8)
    mlps = [channel_mlp(owner, t_in=0.25)]
    served = mlps[0]._sedac_kernel
    calls = []

    def call(i, x):
        calls.append(x.shape[0])
        return owner.kernel_mlp(i, x)

    slow_dense = {1: 1.0, 2: 1.0, 4: 0.0, 8: 1.0}  # the kernel loses at 4 rows only
    upto, measured = channel_kernel.crossover(mlps, call, slow_dense.__getitem__, [0.3], [0.4])
    assert upto == 2 and sorted(measured) == [1, 2, 4, 8]  # 8 timed too: every rank makes the same calls
    assert all(measured[r]["dense_s"] == slow_dense[r] and measured[r]["kernel_s"] > 0 for r in measured)
    assert sorted(set(calls)) == [1, 2, 4, 8]
    assert channel_kernel.crossover(mlps, call, lambda r: 0.0, [0.3], [0.4])[0] == 0
    assert mlps[0]._sedac_kernel is served and served.t_in == 0.25  # the timing copies are gone
