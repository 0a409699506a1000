"""The shared runtime: row gather/scatter, soft truncation, channel order, bookkeeping."""

import math

import pytest
import torch
import torch.nn.functional as F

from sedac_monitor.engine import (
    SOFT_GROUPS,
    HFAttachment,
    SkipRuntime,
    channel_order,
    hf_truncated,
    make_skippable,
    permute_channels,
    restore_mlp,
)
from sedac_monitor.layouts import find_layout
from sedac_monitor.testing import tiny_model


class Scripted:
    """A decider that returns fixed plans per layer."""

    def __init__(self, plans):
        self.plans = plans

    def begin(self, stream):
        pass

    def plan(self, layer):
        return self.plans.get(layer, (None, None))

    def after_layer(self, layer, stream):
        pass


def mlp_of(model, i=2):
    return model.model.layers[i].mlp


def reference(mlp, x, m):
    g = F.linear(x, mlp.gate_proj.weight[:m])
    u = F.linear(x, mlp.up_proj.weight[:m])
    return F.linear(mlp.act_fn(g) * u, mlp.down_proj.weight[:, :m])


def test_permuting_channels_keeps_the_function_and_undoes_exactly():
    model = tiny_model("llama")
    mlp = mlp_of(model)
    x = torch.randn(7, 128)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    y = mlp(x)
    order = channel_order(mlp)
    imp = (mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0))
    assert torch.equal(order, torch.sort(-imp, stable=True).indices)
    permute_channels(mlp, order)
    torch.testing.assert_close(mlp(x), y, atol=1e-5, rtol=1e-5)
    new_imp = (mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0))
    assert (new_imp[:-1] >= new_imp[1:]).all()  # most important channels first
    permute_channels(mlp, torch.argsort(order))
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_soft_plan_computes_a_prefix_of_channels_per_row():
    model = tiny_model("llama")
    mlp = mlp_of(model)
    inter = mlp.gate_proj.weight.shape[0]
    step = inter // SOFT_GROUPS
    x = torch.randn(5, 128)
    skip = torch.tensor([False, True, False, False, False])
    keep = torch.tensor([1.0, 0.3, 0.5, 0.01, 0.26])
    rt = SkipRuntime(Scripted({2: (skip, keep)}), 6, protect_first=0)
    original = make_skippable(mlp, rt, 2, hf_truncated(mlp))
    rt.begin(torch.zeros(5, 128))
    y = mlp(x)
    restore_mlp(mlp, original)
    for row, k in enumerate(keep.tolist()):
        if skip[row]:
            assert torch.equal(y[row], torch.zeros(128))
            continue
        m = min(inter, math.ceil(k * inter / step) * step)  # rounded up: never fewer channels than asked
        torch.testing.assert_close(y[row], reference(mlp, x[row:row + 1], m)[0], atol=1e-5, rtol=1e-5)
    rt.after_layer(5, torch.zeros(5, 128))
    fractions = rt.last_row_skips.tolist()
    assert fractions[1] == 1.0 and fractions[0] == 0.0
    assert fractions[3] == pytest.approx(1 - step / inter) and fractions[2] == pytest.approx(0.5)
    assert rt.last_first_skip.tolist() == [6, 2, 6, 6, 6]  # partial skips are work saved, not exits


def test_rows_outside_the_plan_are_bit_identical_and_padding_is_not_counted():
    model = tiny_model("llama")
    mlp = mlp_of(model)
    x = torch.randn(6, 128)
    skip = torch.tensor([True, False, False, True, False, False])
    rt = SkipRuntime(Scripted({2: (skip, None)}), 6, protect_first=1)
    make_skippable(mlp, rt, 2)
    valid = torch.tensor([True, True, True, True, True, False])
    rt.begin(torch.zeros(6, 128), valid, positions=torch.tensor([0, 1, 2, 3, 4, 5]))
    y = mlp(x)
    rt.after_layer(5, torch.zeros(6, 128))
    full = type(mlp).__mro__[1].forward(mlp, x)
    assert torch.equal(y[0], full[0])  # position 0 is protected: computed although the plan said skip
    assert torch.equal(y[3], torch.zeros(128))
    for r in (1, 2, 4, 5):
        torch.testing.assert_close(y[r], full[r], atol=1e-6, rtol=1e-6)
    stats = rt.stats.as_dict()
    assert stats["tokens"] == 5 and stats["skipped_mlp_blocks"] == 1.0


def test_soft_exit_attachment_restores_weights():
    model = tiny_model("qwen2")
    layout = find_layout(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(3, 300, (1, 20))
    with torch.no_grad():
        ref = model(input_ids=x).logits
        keep = torch.full((20,), 0.5)
        att = HFAttachment(layout, SkipRuntime(Scripted({3: (None, keep)}), 6), soft_exit=True)
        out = model(input_ids=x).logits
        att.detach()
        again = model(input_ids=x).logits
    assert not torch.allclose(out, ref)
    assert torch.equal(again, ref)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
