"""The shared runtime: row gather/scatter, soft truncation, channel order, bookkeeping."""

import math

import pytest
import torch
import torch.nn.functional as F

from sedac_monitor.attach import HFAttachment
from sedac_monitor.channels import SOFT_GROUPS, channel_order, hf_truncated, permute_channels
from sedac_monitor.engine import SkipRuntime
from sedac_monitor.layouts import find_layout
from sedac_monitor.patching import make_skippable, restore_mlp
from sedac_monitor.testing import tiny_model


class Scripted:
    """A decider that returns fixed plans per layer."""

    monotone = False
    wants_positions = False
    step_layers = frozenset()

    def __init__(self, plans):
        self.plans = plans

    def start(self, stream):
        return None

    def plan(self, layer, state):
        return self.plans.get(layer, (None, None))

    def step(self, layer, stream, state):
        return state


# An MLP over a subset of the rows can take a different BLAS kernel than over all of them, which sums in a
# different order: float32 results then differ in the last digits (1.4e-5 seen on one CI machine, 0 here).
# Rows that the runtime computes on a gathered subset are compared with this tolerance, never bit for bit.
SUBSET = dict(atol=1e-4, rtol=1e-4)


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
        torch.testing.assert_close(y[r], full[r], **SUBSET)
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


class Cascade:
    """Scripted cascade plans: row r skips every layer after ``exit_at[r]`` (-1: never)."""

    monotone = True
    wants_positions = False
    step_layers = frozenset()

    def __init__(self, exit_at):
        self.exit_at = torch.tensor(exit_at)

    def start(self, stream):
        return None

    def plan(self, layer, state):
        if layer == 0:
            return None, None
        return (self.exit_at >= 0) & (self.exit_at < layer), None

    def step(self, layer, stream, state):
        return state


def run_layers(rt, x, mlps):
    """One forward over every layer's MLP (a residual-free toy: each layer sees the same input)."""
    rt.begin(torch.zeros_like(x), positions=torch.arange(x.shape[0]) + 1)
    outs = [mlp(x) for mlp in mlps]
    rt.after_layer(len(mlps) - 1, torch.zeros_like(x))
    return outs


@pytest.mark.parametrize("policy", ["layer", "forward", "none"])
def test_every_host_sync_policy_gives_the_same_outputs_and_statistics(policy):
    model = tiny_model("llama")
    mlps = [layer.mlp for layer in model.model.layers]
    x = torch.randn(64, 128)
    exit_at = [-1 if r % 3 == 0 else r % 5 for r in range(64)]  # exits spread over layers 1..4
    ref_rt = SkipRuntime(Cascade(exit_at), 6, protect_first=0, host_sync="layer")
    rt = SkipRuntime(Cascade(exit_at), 6, protect_first=0, host_sync=policy)
    with torch.no_grad():
        originals = [make_skippable(m, ref_rt, i) for i, m in enumerate(mlps)]
        ref = [run_layers(ref_rt, x, mlps) for _ in range(2)]
        for m, o in zip(mlps, originals):
            restore_mlp(m, o)
        for i, m in enumerate(mlps):
            make_skippable(m, rt, i)
        got = [run_layers(rt, x, mlps) for _ in range(2)]
    for a, b in zip(ref, got):
        for ya, yb in zip(a, b):
            torch.testing.assert_close(ya, yb, **SUBSET)
    assert rt.stats.as_dict() == ref_rt.stats.as_dict()
    assert torch.equal(rt.last_first_skip, ref_rt.last_first_skip)
    bound = {"layer": 5, "forward": 1, "none": 0}[policy]  # layer 0 has no plan
    assert rt.max_host_reads == bound


def counted_mlps(monkeypatch):
    """A tiny llama's MLPs, and the list every MLP forward appends (layer, rows) to."""
    model = tiny_model("llama")
    mlps = [layer.mlp for layer in model.model.layers]
    calls = []
    original = type(mlps[0]).forward

    def counting(self, x):
        calls.append((mlps.index(self), x.shape[0]))
        return original(self, x)
    monkeypatch.setattr(type(mlps[0]), "forward", counting)
    return mlps, calls


def test_forward_policy_reads_once_at_the_layer_that_saved_most_and_reuses_the_compaction(monkeypatch):
    mlps, calls = counted_mlps(monkeypatch)
    x = torch.randn(40, 128)
    exit_at = [1] * 30 + [-1] * 10  # 30 rows exit after layer 1: a compaction at layer 2 saves 4 layers
    rt = SkipRuntime(Cascade(exit_at), 6, protect_first=0, host_sync="forward")
    for i, m in enumerate(mlps):
        make_skippable(m, rt, i)
    with torch.no_grad():
        run_layers(rt, x, mlps)  # no statistics yet: no read, every layer masked
        assert rt.host_reads == 0 and all(n == 40 for _, n in calls)
        calls.clear()
        run_layers(rt, x, mlps)
    assert rt.max_host_reads == 1
    assert dict(calls) == {0: 40, 1: 40, 2: 10, 3: 10, 4: 10, 5: 10}


def test_few_skipped_rows_take_the_masked_path_without_gathering(monkeypatch):
    from sedac_monitor import engine

    model = tiny_model("llama")
    mlp = mlp_of(model)
    seen = []
    original = type(mlp).forward
    monkeypatch.setattr(type(mlp), "forward", lambda self, x: (seen.append(x.shape[0]), original(self, x))[1])
    x = torch.randn(100, 128)
    skip = torch.zeros(100, dtype=torch.bool)
    skip[7] = True  # 1% of rows: below GATHER_MIN_FRACTION
    assert 1 / 100 < engine.GATHER_MIN_FRACTION
    rt = SkipRuntime(Scripted({2: (skip, None)}), 6, protect_first=0)
    make_skippable(mlp, rt, 2)
    rt.begin(torch.zeros(100, 128))
    with torch.no_grad():
        y = mlp(x)
        full = original(mlp, x)
    assert seen == [100]  # every row computed once, no gather
    assert torch.equal(y[7], torch.zeros(128)) and torch.equal(y[:7], full[:7]) and torch.equal(y[8:], full[8:])
    skip[:50] = True
    seen.clear()
    rt.begin(torch.zeros(100, 128))
    with torch.no_grad():
        mlp(x)
    assert seen == [50]  # half the rows: gathered


def test_soft_plan_without_host_reads_masks_channels_per_row():
    model = tiny_model("llama")
    mlp = mlp_of(model)
    x = torch.randn(5, 128)
    skip = torch.tensor([False, True, False, False, False])
    keep = torch.tensor([1.0, 0.3, 0.5, 0.01, 0.26])
    outs = {}
    for policy in ("layer", "none"):
        rt = SkipRuntime(Scripted({2: (skip, keep)}), 6, protect_first=0, host_sync=policy)
        original = make_skippable(mlp, rt, 2, hf_truncated(mlp))
        rt.begin(torch.zeros(5, 128))
        with torch.no_grad():
            outs[policy] = mlp(x)
        rt.after_layer(5, torch.zeros(5, 128))
        restore_mlp(mlp, original)
        assert rt.max_host_reads == (1 if policy == "layer" else 0)
    torch.testing.assert_close(outs["none"], outs["layer"], atol=1e-5, rtol=1e-5)


def test_bad_host_sync_policy_is_refused():
    with pytest.raises(ValueError, match="host_sync must be one of"):
        SkipRuntime(Scripted({}), 6, host_sync="sometimes")


def test_activation_calibrated_channel_order_ranks_by_typical_contribution():
    from sedac_monitor.api import activation_magnitudes

    model = tiny_model("llama")
    layout = find_layout(model)
    windows = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    acts = activation_magnitudes(layout, windows, 2)
    assert len(acts) == 6 and acts[0].shape == (256,) and (acts[0] >= 0).all()
    mlp = mlp_of(model)
    order = channel_order(mlp, acts[2])
    imp = acts[2] * mlp.down_proj.weight.norm(dim=0)
    assert torch.equal(order, torch.sort(-imp, stable=True).indices)
    assert not torch.equal(order, channel_order(mlp))  # a different order than the data-free one
    # the attachment takes per-layer orders and restores the model exactly
    state = {k: v.clone() for k, v in model.state_dict().items()}
    orders = [channel_order(layer.mlp, a) for layer, a in zip(layout.layers, acts)]
    att = HFAttachment(layout, SkipRuntime(Scripted({3: (None, torch.full((64,), 0.5))}), 6), True, orders)
    assert torch.equal(layout.layers[2].mlp.gate_proj.weight, state["model.layers.2.mlp.gate_proj.weight"][orders[2]])
    att.detach()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_once_every_row_of_a_cascade_exited_later_layers_neither_compute_nor_read(monkeypatch):
    mlps, calls = counted_mlps(monkeypatch)
    x = torch.randn(12, 128)
    exit_at = [1] * 8 + [2] * 4  # 8 rows skip from layer 2 on, the other 4 from layer 3 on
    valid = torch.tensor([True] * 11 + [False])  # one padding row: not counted
    outs, seen = {}, {}
    for policy in ("none", "layer"):  # "none": every layer masked, the reference
        rt = SkipRuntime(Cascade(exit_at), 6, protect_first=0, host_sync=policy)
        originals = [make_skippable(m, rt, i) for i, m in enumerate(mlps)]
        calls.clear()
        with torch.no_grad():
            rt.begin(torch.zeros_like(x), valid=valid)
            outs[policy] = [m(x) for m in mlps]
            rt.after_layer(5, torch.zeros_like(x))
        for m, o in zip(mlps, originals):
            restore_mlp(m, o)
        seen[policy] = (rt, list(calls))
    ref, rt = seen["none"][0], seen["layer"][0]
    # layer 2 computed the 4 rows still active; layer 3 read its plan, found every row skipped and computed
    # nothing; layers 4 and 5 neither computed nor read
    assert seen["layer"][1] == [(0, 12), (1, 12), (2, 4)]
    assert rt.max_host_reads == 3  # layers 1, 2 and 3
    for a, b in zip(outs["none"], outs["layer"]):
        torch.testing.assert_close(a, b, **SUBSET)
    assert all(not o.any() for o in outs["layer"][3:])
    assert rt.stats.as_dict() == ref.stats.as_dict()
    assert rt.stats.as_dict()["per_layer_skip_rate"] == [0, 0, 8 / 11, 1, 1, 1]
    assert torch.equal(rt.last_first_skip, ref.last_first_skip)
    assert torch.equal(rt.last_row_skips, ref.last_row_skips)
