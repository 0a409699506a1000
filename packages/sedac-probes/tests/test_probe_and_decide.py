"""LREProbe / ProbeBank, and the torch probe rule against sedac_core."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sedac_core
from sedac_probes import LREProbe, ProbeBank, ProbeDecider, TorchProbeRule


def make_bank(target="entropy", hidden=32, rank=8, layers=(1, 3, 4)):
    torch.manual_seed(1)
    probes = {layer: LREProbe(hidden, rank, target) for layer in layers}
    for p in probes.values():  # non-trivial LayerNorm affine
        torch.nn.init.normal_(p.norm.weight)
        torch.nn.init.normal_(p.norm.bias)
    return probes, ProbeBank.from_probes(probes)


@pytest.mark.parametrize("target", ["entropy", "safety"])
def test_bank_applies_every_probe_in_one_call(target):
    probes, bank = make_bank(target)
    h = torch.randn(50, 32)
    with torch.no_grad():
        ref = torch.stack([probes[layer].risk(h) for layer in (1, 3, 4)], 1)
        torch.testing.assert_close(bank(h), ref, atol=1e-5, rtol=1e-5)
        for i in range(3):
            torch.testing.assert_close(bank.risk_at(i, h), ref[:, i], atol=1e-5, rtol=1e-5)
    assert (ref >= 0).all() and (target == "entropy" or (ref <= 1).all())


def test_probe_architecture_is_the_seeds():
    p = LREProbe(576, 64)
    assert [type(m).__name__ for m in p.children()] == ["Linear", "LayerNorm", "Linear"]
    assert p.down.weight.shape == (64, 576) and p.head.weight.shape == (1, 64)
    assert (p(torch.randn(5, 576)) > 0).all()  # Softplus
    with pytest.raises(ValueError, match="target must be one of"):
        LREProbe(8, 4, "perplexity")


risks = st.sampled_from([0.0, 0.1, 0.5, 0.79, 0.8, 0.81, 1.0, 2.0, 5.0, float("nan"), float("inf"), -float("inf")])


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10).flatmap(lambda n: st.lists(st.lists(risks, min_size=3, max_size=3), min_size=n, max_size=n)),
       st.sampled_from(["threshold", "confidence"]), st.booleans(),
       st.sampled_from([(0.8, 1.0, 1.2), (0.5, 0.5, 0.5), (2.0, 0.3, 1.0)]),
       st.sampled_from([(0.2, 0.6, 0.9), (0.0, 0.5, 1.0)]), st.sampled_from([0.0, 0.5, 0.9, 1.0]))
def test_torch_probe_rule_equals_sedac_core(rows, rule, soft, thr, rates, decay):
    risk = np.array(rows, dtype=np.float32).reshape(-1, 3)
    weights = (0.3, 0.4, 0.3)
    ctrl = sedac_core.ProbeController(
        [sedac_core.LayerConfig(i, rates[i], thr[i], weights[i]) for i in range(3)],
        confidence_decay=decay, soft_exit=soft, adaptive=False, rule=rule)
    ref = ctrl.evaluate(risk)
    probe_rule = TorchProbeRule(thr, rule, rates, weights, decay, soft)
    exit_cp, conf, ratio = probe_rule.evaluate(torch.from_numpy(risk))
    np.testing.assert_array_equal(exit_cp.numpy(), ref.exit_checkpoint)
    np.testing.assert_array_equal(conf.numpy(), ref.confidence)
    np.testing.assert_allclose(ratio.numpy(), ref.skip_fraction, rtol=2e-7, atol=0)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10).flatmap(lambda n: st.lists(st.lists(risks, min_size=3, max_size=3), min_size=n, max_size=n)),
       st.sampled_from(["threshold", "confidence"]), st.sampled_from([(0.8, 1.0, 1.2), (2.0, 0.3, 1.0)]),
       st.sampled_from([0.5, 0.9, 1.0]), st.sampled_from([0.0, 0.3, 1.0]), st.sampled_from([0.0, 0.25, 1.0]),
       st.sampled_from([4.0, 2.0, 8.0, 16.0]))
def test_torch_adaptive_decay_and_soft_steepness_equal_sedac_core(rows, rule, thr, decay, bonus, history, soft_k):
    risk = np.array(rows, dtype=np.float32).reshape(-1, 3)
    rates, weights = (0.2, 0.6, 0.9), (0.3, 0.4, 0.3)
    ctrl = sedac_core.ProbeController(
        [sedac_core.LayerConfig(i, rates[i], thr[i], weights[i]) for i in range(3)], confidence_decay=decay,
        soft_exit=True, adaptive=False, rule=rule, adaptive_decay=True, decay_bonus=bonus, soft_k=soft_k)
    ctrl._history = float(np.float32(history))  # the EMA observe() keeps; set directly for the comparison
    ref = ctrl.evaluate(risk)
    probe_rule = TorchProbeRule(thr, rule, rates, weights, decay, True, adaptive_decay=True, decay_bonus=bonus,
                           soft_k=soft_k)
    probe_rule.history.fill_(history)
    exit_cp, conf, ratio = probe_rule.evaluate(torch.from_numpy(risk))
    np.testing.assert_array_equal(exit_cp.numpy(), ref.exit_checkpoint)
    np.testing.assert_array_equal(conf.numpy(), ref.confidence)
    np.testing.assert_allclose(ratio.numpy(), ref.skip_fraction, rtol=2e-7, atol=0)


def test_probe_decider_drives_the_runtime():
    from sedac_monitor.api import SkipRuntime

    _, bank = make_bank("safety", hidden=16, rank=4, layers=(1, 3))
    h = torch.randn(6, 16)
    risk = bank(h)
    thr = [float(risk[:, 0].median()) + 1e-4, 1e-6]  # nobody exits at the second checkpoint
    decider = ProbeDecider(bank, TorchProbeRule(thr, "threshold"), num_layers=6, protect_last=1)
    rt = SkipRuntime(decider, 6, protect_first=0)
    rt.begin(h)
    calls = []
    for layer in range(6):
        y = rt.mlp(layer, h, lambda x, layer=layer: (calls.append((layer, x.shape[0])), x + 1)[1])
        rt.after_layer(layer, h)
        if layer in (2, 3, 4):  # exited rows (first checkpoint, layer 1) skip layers 2..4; layer 5 is protected
            assert torch.equal(y[risk[:, 0] < thr[0]], torch.zeros_like(y[risk[:, 0] < thr[0]]))
    exited = int((risk[:, 0] < thr[0]).sum())
    assert 0 < exited < 6
    assert [n for layer, n in calls if layer in (2, 3, 4)] == [6 - exited] * 3
    assert [n for layer, n in calls if layer in (0, 1, 5)] == [6, 6, 6]
    assert rt.stats.as_dict()["skipped_mlp_blocks"] == 3 * exited
    assert torch.isfinite(decider.risk_matrix(rt.state)).all()


def test_probe_decider_rejects_mismatched_parts():
    _, bank = make_bank(layers=(1, 3, 4))
    with pytest.raises(ValueError, match="3 probes but 2 thresholds"):
        ProbeDecider(bank, TorchProbeRule([1.0, 1.0]), 6)
    with pytest.raises(ValueError, match="probe layer 4 is outside a model of 4 layers"):
        ProbeDecider(bank, TorchProbeRule([1.0, 1.0, 1.0]), 4)
    with pytest.raises(ValueError, match="exit_rates are required"):
        TorchProbeRule([1.0], "confidence")
    with pytest.raises(ValueError, match="thresholds must be > 0"):
        TorchProbeRule([0.0])


def test_adaptive_thresholds_have_one_owner():
    """Adaptive: the controller owns the thresholds; the probe rule's tensors (what a compiled graph reads)
    follow it only when they move, and decide as the controller does."""
    layers = [sedac_core.LayerConfig(i, rate, 0.5, w) for i, rate, w in ((1, 0.2, 0.3), (3, 0.6, 0.4), (4, 0.9, 0.3))]
    controller = sedac_core.ProbeController(layers, alpha=0.5, warmup_observations=2, rule="confidence",
                                              adaptive_decay=True, decay_bonus=0.5)
    probe_rule = TorchProbeRule.following(controller)
    assert probe_rule.controller is controller
    np.testing.assert_array_equal(probe_rule.thresholds.numpy(), controller.thresholds)
    rng = np.random.default_rng(0)
    moves = []
    for _ in range(4):
        risk = rng.uniform(0, 2, size=(64, 3)).astype(np.float32)
        before = probe_rule.thresholds.clone()
        moved = probe_rule.observe(risk)
        moves.append(moved)
        assert moved == (not torch.equal(before, probe_rule.thresholds))
        np.testing.assert_array_equal(probe_rule.thresholds.numpy(), controller.thresholds)
        assert float(probe_rule.history) == pytest.approx(controller.history)
        want = controller.evaluate(risk)
        exit_cp, _conf, _soft = probe_rule.evaluate(torch.from_numpy(risk))
        np.testing.assert_array_equal(exit_cp.numpy(), want.exit_checkpoint)
    assert moves[:2] == [False, False] and any(moves[2:])  # nothing moves during the warm-up
    with pytest.raises(RuntimeError, match="fixed"):
        TorchProbeRule([0.5, 0.5]).observe(np.zeros((1, 2), np.float32))
