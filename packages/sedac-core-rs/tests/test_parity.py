"""Property tests: the Rust and numpy backends agree on generated inputs.

Decisions (exit indices, counts) must be identical; continuous outputs equal
within 1e-6 relative; bad input raises the same exception type and message.
Inputs include 0 and 1 tokens, NaN and +/-inf, values exactly at a threshold,
and extreme decay / weights / rates.
"""

import numpy as np
import pytest
from conftest import on_both
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sedac_core as sc

F32 = np.float32
SPECIAL = [0.0, -0.0, 1.0, 0.5, 1e-6, 1e30, -1e30, np.inf, -np.inf, np.nan]
reals = st.floats(width=32, allow_nan=True, allow_infinity=True)
tame = st.floats(min_value=-4, max_value=4, width=32)
positive = st.floats(min_value=float(F32(1e-6)), max_value=1e6, width=32)
rates = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0, 1, width=32))
weights = st.one_of(st.sampled_from([0.0, 1.0, 1e30]), st.floats(0, 10, width=32))
decays = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1, width=32))


def assert_same(results, exact=("exit_checkpoint",)):
    rust, python = results["rust"], results["python"]
    assert rust[0] == python[0], results
    if rust[0] == "error":
        assert rust[1:] == python[1:]
        return
    a, b = rust[1], python[1]
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _compare(a[key], b[key], key in exact)
    else:
        _compare(a, b, True)


def _compare(a, b, exact):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    if exact or a.dtype.kind in "iub":
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0, equal_nan=True)


@st.composite
def risk_case(draw, max_tokens=40):
    c = draw(st.integers(1, 4))
    thresholds = draw(st.lists(positive, min_size=c, max_size=c))
    n = draw(st.sampled_from([0, 1, draw(st.integers(2, max_tokens))]))
    # mix generic values, special values and values exactly at a threshold
    element = st.one_of(tame, reals, st.sampled_from(SPECIAL), st.sampled_from(thresholds))
    risk = draw(hnp.arrays(F32, (n, c), elements=element))
    layers = [sc.LayerConfig(3 * i + 1, draw(rates), thresholds[i], draw(weights)) for i in range(c)]
    return risk, layers


def _decisions(layers, risk, **kw):
    d = sc.ProbeController(layers, **kw).evaluate(risk)
    return {"exit_checkpoint": d.exit_checkpoint, "confidence": d.confidence, "skip_fraction": d.skip_fraction}


@given(risk_case(), decays, st.booleans(), st.sampled_from(["confidence", "threshold"]))
def test_evaluate_agrees(case, decay, soft, rule):
    risk, layers = case
    assert_same(on_both(lambda: _decisions(layers, risk, confidence_decay=decay, soft_exit=soft, rule=rule)))


@given(risk_case(), decays, st.booleans(), st.sampled_from(["confidence", "threshold"]),
       st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1, width=32)),
       st.one_of(st.sampled_from([4.0, 1e-3, 1e3]), st.floats(float(F32(0.01)), 64, width=32)),
       st.integers(0, 3))
def test_adaptive_decay_and_soft_steepness_agree(case, decay, soft, rule, bonus, soft_k, observed):
    """The V6.1 roadmap's options: per-token adaptive decay (with the exit-history bonus a few observed
    batches build up) and the soft-exit steepness k."""
    risk, layers = case

    def run():
        ctrl = sc.ProbeController(layers, confidence_decay=decay, soft_exit=soft, rule=rule, adaptive_decay=True,
                                    decay_bonus=float(bonus), soft_k=float(soft_k), warmup_observations=0)
        for _ in range(observed):
            ctrl.observe(risk)
        out = _decisions_of(ctrl, risk)
        out["history"] = np.array(ctrl.history)
        return out

    assert_same(on_both(run), exact=("exit_checkpoint", "history"))


def test_soft_k_4_is_the_original_tanh_and_adaptive_decay_is_off_by_default():
    rng = np.random.default_rng(3)
    risk = rng.gamma(1.5, 0.7, size=(500, 3)).astype(F32)
    layers = [sc.LayerConfig(7, 0.2, 0.8, 0.3), sc.LayerConfig(14, 0.6, 1.0, 0.4), sc.LayerConfig(21, 0.9, 1.2, 0.3)]
    plain = sc.ProbeController(layers).evaluate(risk)
    same = sc.ProbeController(layers, soft_k=4.0, adaptive_decay=False, decay_bonus=0.5).evaluate(risk)
    np.testing.assert_array_equal(plain.skip_fraction, same.skip_fraction)
    np.testing.assert_array_equal(plain.confidence, same.confidence)
    c = plain.confidence.astype(np.float64)
    np.testing.assert_allclose(plain.skip_fraction, np.where(c > 0, np.tanh(2 * c - 1) * 0.5 + 0.5, 0), rtol=1e-5)
    steep = sc.ProbeController(layers, soft_k=16.0).evaluate(risk).skip_fraction
    assert ((steep > plain.skip_fraction) == (c > 0.5))[c > 0].mean() > 0.99
    adaptive = sc.ProbeController(layers, adaptive_decay=True).evaluate(risk)
    assert (adaptive.confidence[:, 1:] != plain.confidence[:, 1:]).any()  # the option changes something
    with pytest.raises(ValueError, match="soft_k must be in"):
        sc.ProbeController(layers, soft_k=0.0)
    with pytest.raises(ValueError, match="decay_bonus must be in"):
        sc.ProbeController(layers, decay_bonus=2.0)
    state = sc.ProbeController(layers, adaptive_decay=True, decay_bonus=0.3, soft_k=8.0).state_dict()
    again = sc.ProbeController.from_state_dict(state)
    assert again.state_dict() == state


def _decisions_of(ctrl, risk):
    d = ctrl.evaluate(risk)
    return {"exit_checkpoint": d.exit_checkpoint, "confidence": d.confidence, "skip_fraction": d.skip_fraction}


def test_evaluate_agrees_on_the_parallel_path():
    # more tokens than the Rust code handles on one thread
    rng = np.random.default_rng(1)
    risk = rng.gamma(1.5, 0.7, size=(70_001, 3)).astype(F32)
    risk[::97, 1] = np.nan
    layers = [sc.LayerConfig(7, 0.2, 0.8, 0.3), sc.LayerConfig(14, 0.6, 1.0, 0.4), sc.LayerConfig(21, 0.9, 1.2, 0.3)]
    results = on_both(lambda: _decisions(layers, risk))
    assert_same(results)
    assert 0 < (results["rust"][1]["exit_checkpoint"] >= 0).mean() < 1


@given(risk_case(), st.integers(0, 3), st.floats(float(F32(0.01)), 1, width=32), st.integers(1, 4))
def test_observe_agrees(case, warmup, alpha, batches):
    risk, layers = case

    def run():
        ctrl = sc.ProbeController(layers, alpha=float(alpha), warmup_observations=warmup)
        moved = [ctrl.observe(risk) for _ in range(batches)]
        return {"moved": np.array(moved), "thresholds": ctrl.thresholds, "observations": np.array(ctrl.observations)}

    assert_same(on_both(run), exact=("moved", "thresholds", "observations"))


@given(risk_case())
def test_calibrate_agrees(case):
    risk, layers = case
    target = [l.target_exit_rate for l in layers]
    assert_same(on_both(lambda: sc.calibrate_thresholds(risk, target)))


@st.composite
def similarity_case(draw):
    layers = draw(st.integers(1, 12))
    n = draw(st.sampled_from([0, 1, draw(st.integers(2, 40))]))
    tau = draw(st.one_of(st.sampled_from([0.98, 1.0, 1.5, 0.0]), st.floats(float(F32(0.8)), 1.0, width=32)))
    element = st.one_of(st.floats(float(F32(0.9)), 1.0, width=32), reals, st.just(F32(tau)))
    sim = draw(hnp.arrays(F32, (n, layers), elements=element))
    return sim, float(tau)


@given(similarity_case(), st.integers(1, 4), st.integers(0, 14))
def test_consecutive_exit_agrees(case, k, min_layer):
    sim, tau = case
    assert_same(on_both(lambda: sc.consecutive_exit(sim, tau, k, min_layer)))


@given(similarity_case(), st.data())
def test_replay_monitor_agrees(case, data):
    sim, tau = case
    n, layers = sim.shape
    protect = data.draw(st.integers(0, 3))
    safe = data.draw(st.one_of(st.none(), hnp.arrays(np.bool_, (n, layers))))
    rules = [sc.MonitorRule(tau=data.draw(st.sampled_from([tau, 0.95, 0.99, 2.0])), k=data.draw(st.integers(1, 3)),
                            min_layer=data.draw(st.integers(0, layers)), protect_last=protect,
                            scope=data.draw(st.sampled_from(["cascade", "per_layer"])))
             for _ in range(data.draw(st.integers(0, 5)))]
    trace = sc.Trace.similarity(sim, safe=safe, protect_last=protect)
    assert_same(on_both(lambda: sc.replay(trace, rules)), exact=("exits", "skipped_layers", "unsafe_exits"))


@given(risk_case(), st.data())
def test_replay_probe_agrees(case, data):
    risk, layers = case
    n, c = risk.shape
    num_layers = layers[-1].layer_idx + data.draw(st.integers(1, 6))
    protect = data.draw(st.integers(0, 3))
    safe = data.draw(st.one_of(st.none(), hnp.arrays(np.bool_, (n, c))))
    rules = []
    for _ in range(data.draw(st.integers(0, 5))):
        rule = data.draw(st.sampled_from(["confidence", "threshold"]))
        rules.append(sc.ProbeRule(
            thresholds=[l.initial_threshold * data.draw(st.sampled_from([0.5, 1.0, 2.0])) for l in layers],
            rule=rule, exit_rates=[l.target_exit_rate for l in layers],
            weights=[l.confidence_weight for l in layers], decay=float(data.draw(decays)), protect_last=protect))
    trace = sc.Trace.risk(risk, [l.layer_idx for l in layers], num_layers, safe=safe, protect_last=protect)
    assert_same(on_both(lambda: sc.replay(trace, rules)), exact=("exits", "skipped_layers", "unsafe_exits"))


BAD_CALLS = {
    "risk 1-D": lambda: sc.ProbeController([sc.LayerConfig(1, 0.5)]).evaluate(np.zeros(3, F32)),
    "risk 3-D": lambda: sc.ProbeController([sc.LayerConfig(1, 0.5)]).evaluate(np.zeros((2, 1, 1), F32)),
    "risk columns": lambda: sc.ProbeController([sc.LayerConfig(1, 0.5)]).evaluate(np.zeros((2, 2), F32)),
    "risk strings": lambda: sc.ProbeController([sc.LayerConfig(1, 0.5)]).evaluate(np.array([["a"]])),
    "observe columns": lambda: sc.ProbeController([sc.LayerConfig(1, 0.5)]).observe(np.zeros((2, 3), F32)),
    "rate > 1": lambda: sc.LayerConfig(1, 1.5),
    "rate NaN": lambda: sc.LayerConfig(1, float("nan")),
    "threshold 0": lambda: sc.LayerConfig(1, 0.5, 0.0),
    "threshold negative": lambda: sc.LayerConfig(1, 0.5, -1.0),
    "weight negative": lambda: sc.LayerConfig(1, 0.5, 1.0, -0.1),
    "layer_idx bool": lambda: sc.LayerConfig(True, 0.5),
    "decay > 1": lambda: sc.ProbeController([sc.LayerConfig(1, 0.5)], confidence_decay=1.5),
    "alpha 0": lambda: sc.ProbeController([sc.LayerConfig(1, 0.5)], alpha=0),
    "rule": lambda: sc.ProbeController([sc.LayerConfig(1, 0.5)], rule="v6"),
    "unordered layers": lambda: sc.ProbeController([sc.LayerConfig(5, 0.5), sc.LayerConfig(2, 0.5)]),
    "no layers": lambda: sc.ProbeController([]),
    "tau NaN": lambda: sc.consecutive_exit(np.zeros((1, 2), F32), float("nan"), 2),
    "k 0": lambda: sc.consecutive_exit(np.zeros((1, 2), F32), 0.9, 0),
    "min_layer negative": lambda: sc.consecutive_exit(np.zeros((1, 2), F32), 0.9, 1, -1),
    "calibrate rates length": lambda: sc.calibrate_thresholds(np.zeros((2, 2), F32), [0.5]),
    "calibrate all NaN": lambda: sc.calibrate_thresholds(np.full((2, 1), np.nan, F32), [0.5]),
    "calibrate no tokens": lambda: sc.calibrate_thresholds(np.zeros((0, 1), F32), [0.5]),
    "safe labels 2": lambda: sc.Trace.similarity(np.zeros((2, 2), F32), safe=np.full((2, 2), 2)),
    "safe shape": lambda: sc.Trace.similarity(np.zeros((2, 2), F32), safe=np.ones((2, 3), bool)),
    "replay mixed rules": lambda: sc.replay(sc.Trace.similarity(np.zeros((2, 2), F32)), [sc.ProbeRule([1.0])]),
    "replay protect mismatch": lambda: sc.replay(
        sc.Trace.similarity(np.zeros((2, 2), F32), safe=np.ones((2, 2), bool)), [sc.MonitorRule(0.9, protect_last=1)]),
    "probe rule thresholds": lambda: sc.replay(
        sc.Trace.risk(np.zeros((2, 2), F32), [1, 2], 4), [sc.ProbeRule([1.0])]),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_input_raises_the_same_error(name):
    results = on_both(BAD_CALLS[name])
    assert results["rust"][0] == "error", results
    assert_same(results)


@given(st.lists(st.integers(0, 4), min_size=0, max_size=3),
       st.sampled_from(["float32", "float64", "int32", "bool", "complex64", "U1"]), st.integers(1, 3), st.booleans())
def test_generated_shapes_and_dtypes_behave_the_same(shape, dtype, checkpoints, strided):
    arr = np.zeros(tuple(shape), dtype=dtype)
    if strided and arr.ndim == 2 and arr.shape[1] > 1:
        arr = arr[:, ::2]
    layers = [sc.LayerConfig(i + 1, 0.5) for i in range(checkpoints)]
    for call in (
        lambda: sc.ProbeController(layers).evaluate(arr).exit_checkpoint,
        lambda: sc.ProbeController(layers, warmup_observations=0).observe(arr),
        lambda: sc.consecutive_exit(arr, 0.9, 2),
        lambda: sc.calibrate_thresholds(arr, [0.5] * checkpoints),
        lambda: sc.replay(sc.Trace.risk(arr, [l.layer_idx for l in layers], 8), [sc.ProbeRule([1.0] * checkpoints)]),
    ):
        assert_same(on_both(call), exact=("exits", "skipped_layers", "unsafe_exits"))
