"""MlpCost: the measured MLP time per batch size, and where the gather path pays."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sedac_monitor.api import MlpCost


def weight_bound(read=1e-3, per_row=1e-6):
    """An MLP whose time is its weight reads up to 64 rows, then its FLOPs (a CPU's decode-to-prefill shape)."""
    return MlpCost({r: max(read, per_row * r * 16) for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)},
                   fixed=20e-6, per_row=0.05e-6)


def test_decode_batches_gather_only_when_every_row_skips():
    cost = weight_bound()
    need = cost.need(16)
    # weight-read bound: 3 of 4 rows skipped saves nothing; all 4 saves the reads
    assert not cost.pays(4, 3) and cost.pays(4, 4)
    assert need[1] == 1 and need[4] == 4 and need[16] == 16


def test_prefill_batches_gather_once_the_rows_removed_pay_for_the_copy():
    cost = weight_bound()
    need = cost.need(512)
    assert 1 < need[512] < 512  # compute bound: enough skipped rows pay
    assert cost.pays(512, int(need[512])) and not cost.pays(512, int(need[512]) - 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1e-6, 1e-2), min_size=2, max_size=8), st.floats(0, 1e-4), st.floats(0, 1e-6),
       st.floats(0.5, 3))
def test_need_table_agrees_with_pays_everywhere(times, fixed, per_row, margin):
    cost = MlpCost({2 ** i: t for i, t in enumerate(times)}, fixed, per_row, margin)
    n = 2 ** (len(times) - 1) + 5  # past the largest measured size too (extrapolated)
    need = cost.need(n)
    for rows in range(1, n + 1):
        first = next((k for k in range(1, rows + 1) if cost.pays(rows, k)), rows + 1)
        assert need[rows] == first, (rows, need[rows], first)
        # monotone in the skipped count: one comparison in the graph decides
        assert all(cost.pays(rows, k) for k in range(first, rows + 1))


def test_seconds_interpolate_never_decrease_and_are_zero_at_zero_rows():
    cost = MlpCost({1: 2e-3, 2: 1e-3, 4: 4e-3})  # a noisy measurement that went down
    s = cost.seconds(np.arange(0, 9))
    assert s[0] == 0 and np.all(np.diff(s) >= 0)
    assert s[1] == pytest.approx(2e-3) and s[3] == pytest.approx(3e-3) and s[8] == pytest.approx(8e-3)
    assert cost.saved(4, 4) == pytest.approx(4e-3) and cost.saved(4, 0) == 0


def test_json_round_trip_and_bad_values_are_refused():
    cost = weight_bound()
    assert MlpCost.from_json(cost.to_json()) == cost
    with pytest.raises(ValueError, match="batch sizes >= 1"):
        MlpCost({})
    with pytest.raises(ValueError, match="fixed and per_row"):
        MlpCost({1: 1e-3}, fixed=-1.0)
    with pytest.raises(ValueError, match="'points'"):
        MlpCost.from_json({"points": [1, 2]})


def test_measure_times_a_real_mlp_and_fits_the_gather_overhead():
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)

    def mlp(x):
        return lin2(torch.relu(lin1(x)))

    def gather(x, skip):
        active = (~skip).nonzero().squeeze(1)
        out = x.new_zeros(x.shape)
        out.index_copy_(0, active, mlp(x.index_select(0, active)))
        return out

    cost = MlpCost.measure(mlp, 64, 64, gather=gather)
    assert sorted(cost.points) == [1, 2, 4, 8, 16, 32, 64]
    assert all(t > 0 for t in cost.points.values()) and cost.fixed >= 0 and cost.per_row >= 0
    assert cost.need(64).shape == (65,)


def test_measure_calls_every_layer_in_turn():
    """A forward reads each layer's weights once, out of cache: timing one layer again and again would
    time cache reads (the small-batch cost read low), so every layer given is called, in turn."""
    from sedac_monitor.cost import in_turn

    calls = []

    def layer(i):
        def mlp(x):
            calls.append(i)
            return x * 2
        return mlp

    mlps = [layer(i) for i in range(3)]
    cost = MlpCost.measure(mlps, 8, 4, gather=MlpCost.gather_path(mlps))
    assert sorted(cost.points) == [1, 2, 4]
    assert set(calls) == {0, 1, 2}
    calls.clear()
    one = in_turn(mlps)
    for _ in range(4):
        one(torch.ones(1, 8))
    assert calls == [0, 1, 2, 0]
    assert in_turn(mlps[0]) is mlps[0]
    with pytest.raises(ValueError, match="non-empty"):
        in_turn([])


def test_expected_speedup_and_recommendation_for_a_setting_that_pays_and_one_that_does_not():
    from sedac_monitor.cost import expected_speedup, recommendation

    cost = weight_bound()
    layers = 30
    forward = layers * 2 * float(cost.seconds(1))  # the MLP is half of a decode step at batch 1
    few = [0.007] * layers  # the calibrated setting's rate: 0.7% of tokens skip each layer
    many = [0.75] * layers  # the original defaults'
    # decode batch 1: a skip saves the whole MLP, so the expected saving is the rate times half the step
    assert expected_speedup(cost, many, forward, 1) == pytest.approx(1 / (1 - 0.5 * 0.75), rel=0.05)
    # batch 4 is weight-read bound: only the layers where all 4 rows skip save anything (0.75^4 of them)
    b4 = expected_speedup(cost, many, layers * 2 * float(cost.seconds(4)), 4)
    assert 1.0 < b4 < 1 / (1 - 0.5 * 0.75 ** 4) + 1e-9
    low = {"prefill": expected_speedup(cost, few, 2 * layers * float(cost.seconds(512)), 512),
           "decode_b1": expected_speedup(cost, few, forward, 1)}
    assert max(low.values()) < 1.01
    line = recommendation(low, [{"measured_risk": 0.4, "expected_speedup": {"decode_b1": 1.3}}])
    assert "will not pay on this model at this budget" in line and "--max-risk 0.400" in line and "1.30x" in line
    high = {"decode_b1": expected_speedup(cost, many, forward, 1)}
    assert "SEDAC pays here" in recommendation(high)
