"""V7 consecutive rule, calibration and replay on golden vectors, once per backend."""

import numpy as np
import pytest

import sedac_core as sc

F32 = np.float32


def test_consecutive_exit_golden(backend):
    sim = np.array([
        [0.99, 0.50, 0.99, 0.99, 0.99],
        [0.99, 0.99, 0.10, 0.10, 0.10],
        [0.10, 0.10, 0.10, 0.10, 0.10],
        [0.98, 0.98, np.nan, 0.98, 0.98],
    ], F32)
    np.testing.assert_array_equal(sc.consecutive_exit(sim, 0.98, 2), [3, 1, -1, 1])
    np.testing.assert_array_equal(sc.consecutive_exit(sim, 0.98, 3), [4, -1, -1, -1])  # NaN breaks a run
    np.testing.assert_array_equal(sc.consecutive_exit(sim, 0.98, 1, min_layer=2), [2, -1, -1, 3])
    np.testing.assert_array_equal(sc.consecutive_exit(sim, 1.01, 1), [-1, -1, -1, -1])  # tau > 1: never
    np.testing.assert_array_equal(sc.consecutive_exit(sim, 0.98, 1, min_layer=9), [-1] * 4)
    assert sc.consecutive_exit(np.zeros((0, 5), F32), 0.9, 2).shape == (0,)


def test_calibrate_thresholds_hits_target_rates(backend):
    rng = np.random.default_rng(3)
    risk = rng.gamma(2.0, 0.5, size=(10_000, 3)).astype(F32)
    risk[::50, 0] = np.nan
    thr = sc.calibrate_thresholds(risk, [0.2, 0.6, 0.9])
    assert thr.dtype == np.float32
    for i, rate in enumerate([0.2, 0.6, 0.9]):
        col = risk[:, i][np.isfinite(risk[:, i])]
        assert (col < thr[i]).mean() == pytest.approx(rate, abs=1e-3)
    np.testing.assert_allclose(thr[1:], np.quantile(risk[:, 1:], [0.6, 0.9], axis=0).diagonal(), rtol=1e-6)
    # never below the floor, even when the quantile is 0 or negative
    assert sc.calibrate_thresholds(np.array([[-1.0], [0.0]], F32), [0.0])[0] == F32(sc.MIN_THRESHOLD)


def test_replay_monitor_matches_a_direct_count(backend):
    rng = np.random.default_rng(4)
    n, layers = 3000, 12
    sim = (1 - rng.gamma(1.0, 0.02, size=(n, layers))).astype(F32)
    safe = rng.random((n, layers)) < 0.7
    rules = [sc.MonitorRule(tau=t, k=k, min_layer=m, protect_last=2)
             for t in (0.97, 0.98, 0.99) for k in (1, 2) for m in (0, 4)]
    table = sc.replay(sc.Trace.similarity(sim, safe=safe, protect_last=2), rules)
    for i, rule in enumerate(rules):
        exit_layer = sc.consecutive_exit(sim, rule.tau, rule.k, rule.min_layer)
        skipped = np.where(exit_layer >= 0, np.maximum(layers - 2 - (exit_layer + 1), 0), 0)
        exited = skipped > 0
        unsafe = exited & ~safe[np.arange(n), np.maximum(exit_layer, 0)]
        assert table["exits"][i] == exited.sum()
        assert table["skipped_layers"][i] == skipped.sum()
        assert table["unsafe_exits"][i] == unsafe.sum()
        assert table["skipped_mlp"][i] == pytest.approx(skipped.sum() / (n * layers))
        assert table["disagreement"][i] == pytest.approx(unsafe.sum() / n)
    # higher tau never skips more
    by_tau = table["skipped_layers"].reshape(3, 4)
    assert (np.diff(by_tau, axis=0) <= 0).all()


def test_replay_per_layer_mode_and_missing_labels(backend):
    sim = np.array([[0.99, 0.99, 0.10, 0.99, 0.99, 0.99]], F32)
    per_layer = sc.MonitorRule(0.98, k=1, scope="per_layer")
    cascade = sc.MonitorRule(0.98, k=1)
    table = sc.replay(sc.Trace.similarity(sim), [per_layer, cascade])
    # per layer: layer j skipped when S_{j-1} >= tau -> j = 1, 2, 4, 5; cascade exits after layer 0 -> 5 skipped
    np.testing.assert_array_equal(table["skipped_layers"], [4, 5])
    assert np.isnan(table["disagreement"]).all()  # no labels; per-layer is never label-measurable
    labelled = sc.replay(sc.Trace.similarity(sim, safe=np.ones_like(sim, bool)), [per_layer, cascade])
    assert np.isnan(labelled["disagreement"][0]) and labelled["disagreement"][1] == 0


def test_replay_probe_rules(backend):
    risk = np.array([[0.5, 2.0, 2.0], [2.0, 2.0, 0.1], [2.0, 2.0, 2.0]], F32)
    safe = np.array([[0, 1, 1], [1, 1, 1], [1, 1, 1]], bool)
    trace = sc.Trace.risk(risk, layers=[1, 3, 5], num_layers=8, safe=safe)
    table = sc.replay(trace, [sc.ProbeRule([1.0, 1.0, 1.0]), sc.ProbeRule([0.1, 0.1, 0.1])])
    # rule 0: token 0 exits after layer 1 (6 skipped, unsafe), token 1 after layer 5 (2 skipped)
    np.testing.assert_array_equal(table["exits"], [2, 0])
    np.testing.assert_array_equal(table["skipped_layers"], [8, 0])
    np.testing.assert_allclose(table["disagreement"], [1 / 3, 0])
    np.testing.assert_allclose(table["exit_rate"], [2 / 3, 0])
    # a controller's decisions and a confidence-rule replay agree
    layers = [sc.LayerConfig(1, 0.3, 1.0, 0.5), sc.LayerConfig(3, 0.6, 1.0, 0.5), sc.LayerConfig(5, 0.9, 1.0, 0.5)]
    decisions = sc.ProbeController(layers).evaluate(risk)
    rule = sc.ProbeRule([1.0] * 3, rule="confidence", exit_rates=[0.3, 0.6, 0.9], weights=[0.5] * 3)
    assert sc.replay(trace, [rule])["exits"][0] == (decisions.exit_checkpoint >= 0).sum()


def test_replay_empty_trace_and_no_configs(backend):
    table = sc.replay(sc.Trace.similarity(np.zeros((0, 4), F32)), [sc.MonitorRule(0.9)])
    assert table["exits"][0] == 0 and np.isnan(table["exit_rate"][0])
    table = sc.replay(sc.Trace.similarity(np.zeros((3, 4), F32)), [])
    assert all(len(col) == 0 for col in table.values())


@pytest.mark.parametrize("call, exc, message", [
    (lambda: sc.Trace.risk(np.zeros((2, 2), F32), [3, 1], 8), ValueError, "layers must be strictly increasing"),
    (lambda: sc.Trace.risk(np.zeros((2, 2), F32), [1, 8], 8), ValueError,
     "checkpoint layer 8 is outside a model of 8 layers"),
    (lambda: sc.Trace.risk(np.zeros((2, 3), F32), [1, 2], 8), ValueError,
     "risk has 3 columns but 2 checkpoint layers are configured"),
    (lambda: sc.Trace.similarity(np.zeros((2, 0), F32)), ValueError, "similarity must have at least one layer column"),
    (lambda: sc.ProbeRule([1.0], rule="confidence"), ValueError, "exit_rates are required with rule='confidence'"),
    (lambda: sc.MonitorRule(0.9, scope="skip"), ValueError, "scope must be one of 'cascade', 'per_layer', got 'skip'"),
    (lambda: sc.replay(np.zeros((2, 2)), []), TypeError, "trace must be a Trace, got ndarray"),
])
def test_trace_and_rule_errors(call, exc, message):
    with pytest.raises(exc) as err:
        call()
    assert message in str(err.value)
