"""ProbeController behaviour on golden vectors, once per backend."""

import json
import math
import threading

import numpy as np
import pytest

import sedac_core as sc

F32 = np.float32
SEED_LAYERS = [sc.LayerConfig(7, 0.2, 0.8, 0.3), sc.LayerConfig(14, 0.6, 1.0, 0.4), sc.LayerConfig(21, 0.9, 1.2, 0.3)]


def test_threshold_rule_exits_at_first_checkpoint_below_threshold(backend):
    ctrl = sc.ProbeController(SEED_LAYERS, rule="threshold")
    risk = np.array([[0.5, 9, 9], [9, 0.9, 9], [9, 9, 1.1], [0.8, 1.0, 1.2], [9, 9, 9]], F32)
    d = ctrl.evaluate(risk)
    np.testing.assert_array_equal(d.exit_checkpoint, [0, 1, 2, -1, -1])  # exactly at threshold: no exit
    np.testing.assert_array_equal(d.exit_layer, [7, 14, 21, -1, -1])
    assert d.exit_checkpoint.dtype == np.int32


def test_confidence_accumulation_matches_the_formula(backend):
    ctrl = sc.ProbeController(SEED_LAYERS, confidence_decay=0.9, rule="confidence")
    risk = np.array([[0.4, 0.5, 0.6]], F32)
    d = ctrl.evaluate(risk)
    c0 = (0.8 - 0.4) / 0.8 * 0.3                 # 0.15   < 0.2
    c1 = c0 * 0.9 + (1.0 - 0.5) / 1.0 * 0.4      # 0.335  < 0.6
    c2 = c1 * 0.9 + (1.2 - 0.6) / 1.2 * 0.3      # 0.4515 < 0.9
    np.testing.assert_allclose(d.confidence[0], [c0, c1, c2], rtol=1e-6)
    assert d.exit_checkpoint[0] == -1
    soft = [math.tanh(2 * c - 1) * 0.5 + 0.5 for c in (c0, c1, c2)]
    np.testing.assert_allclose(d.skip_fraction[0], soft, rtol=1e-6)
    # a confident token: conf0 = 1 (risk 0), C0 = 0.3 >= 0.2
    assert ctrl.evaluate(np.zeros((1, 3), F32)).exit_checkpoint[0] == 0


def test_soft_exit_off_and_nonpositive_confidence_give_zero_ratio(backend):
    risk = np.array([[5.0, 5.0, 5.0], [0.0, 0.0, 0.0]], F32)
    d = sc.ProbeController(SEED_LAYERS, soft_exit=False).evaluate(risk)
    assert not d.skip_fraction.any()
    d = sc.ProbeController(SEED_LAYERS).evaluate(risk)
    assert not d.skip_fraction[0].any()  # negative confidence
    assert (d.skip_fraction[1] > 0.1).all()


def test_nan_and_inf_risk(backend):
    risk = np.array([[np.nan, 0.0, 0.0], [np.inf, 0.0, 0.0], [-np.inf, 9, 9]], F32)
    d = sc.ProbeController(SEED_LAYERS, rule="confidence").evaluate(risk)
    # NaN poisons the accumulation: no exit at that checkpoint or later
    assert d.exit_checkpoint[0] == -1 and np.isnan(d.confidence[0]).all()
    assert (d.skip_fraction[0] == 0).all()
    assert d.exit_checkpoint[1] == -1  # +inf risk: C = -inf stays below every target
    assert d.exit_checkpoint[2] == 0   # -inf risk: infinite confidence
    d = sc.ProbeController(SEED_LAYERS, rule="threshold").evaluate(risk)
    np.testing.assert_array_equal(d.exit_checkpoint, [1, 1, 0])  # V6.0: only the NaN checkpoint is lost


def test_zero_and_one_token(backend):
    ctrl = sc.ProbeController(SEED_LAYERS)
    d = ctrl.evaluate(np.zeros((0, 3), F32))
    assert d.exit_checkpoint.shape == (0,) and d.confidence.shape == (0, 3)
    assert ctrl.evaluate(np.zeros((1, 3), F32)).exit_checkpoint.shape == (1,)
    assert ctrl.observe(np.zeros((0, 3), F32)) is False and ctrl.observations == 0


def test_float64_and_noncontiguous_inputs_are_read_correctly(backend):
    ctrl = sc.ProbeController(SEED_LAYERS, rule="threshold")
    base = np.array([[0.5, 9, 9, 0], [9, 0.9, 9, 0], [9, 9, 1.1, 0]], np.float64)
    strided = base[:, :3]  # not C-contiguous
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(ctrl.evaluate(strided).exit_checkpoint, [0, 1, 2])
    fortran = np.asfortranarray(base[:, :3].astype(F32))
    np.testing.assert_array_equal(ctrl.evaluate(fortran).exit_checkpoint, [0, 1, 2])
    np.testing.assert_array_equal(ctrl.evaluate(base[:, :3].tolist()).exit_checkpoint, [0, 1, 2])


def test_adaptive_thresholds_warm_up_then_ema_to_quantile(backend):
    layers = [sc.LayerConfig(3, 0.25, 1.0), sc.LayerConfig(6, 0.5, 1.0)]
    ctrl = sc.ProbeController(layers, alpha=0.5, warmup_observations=2)
    risk = np.stack([np.arange(101, dtype=F32) / 100, np.arange(101, dtype=F32) / 50], axis=1)
    assert ctrl.observe(risk) is False and ctrl.observe(risk) is False
    np.testing.assert_array_equal(ctrl.thresholds, [1.0, 1.0])
    assert ctrl.observe(risk) is True
    # quantiles: 0.25 of 0..1 = 0.25; 0.5 of 0..2 = 1.0
    np.testing.assert_allclose(ctrl.thresholds, [0.5 * 1.0 + 0.5 * 0.25, 1.0], rtol=1e-6)
    assert ctrl.observations == 3
    for _ in range(40):
        ctrl.observe(risk)
    np.testing.assert_allclose(ctrl.thresholds, [0.25, 1.0], rtol=1e-5)
    # the new thresholds are what evaluate uses: ~25% exit at the first checkpoint (V6.0)
    v60 = sc.ProbeController(layers, rule="threshold", alpha=1.0, warmup_observations=0)
    v60.observe(risk)
    assert (v60.evaluate(risk).exit_checkpoint == 0).mean() == pytest.approx(0.25, abs=0.01)


def test_observe_ignores_nonfinite_and_floors_threshold(backend):
    ctrl = sc.ProbeController([sc.LayerConfig(1, 0.0, 1.0)], alpha=1.0, warmup_observations=0)
    assert ctrl.observe(np.full((4, 1), np.nan, F32)) is False  # nothing finite: unchanged
    assert ctrl.thresholds[0] == 1.0
    assert ctrl.observe(np.array([[-3.0], [np.inf], [2.0]], F32)) is True
    assert ctrl.thresholds[0] == F32(sc.MIN_THRESHOLD)


def test_non_adaptive_controller_counts_but_never_moves(backend):
    ctrl = sc.ProbeController(SEED_LAYERS, adaptive=False, warmup_observations=0)
    assert ctrl.observe(np.zeros((5, 3), F32)) is False
    assert ctrl.observations == 1
    np.testing.assert_array_equal(ctrl.thresholds, F32([0.8, 1.0, 1.2]))


def test_concurrent_observe_and_evaluate(backend):
    ctrl = sc.ProbeController(SEED_LAYERS, alpha=0.05, warmup_observations=0)
    rng = np.random.default_rng(0)
    risk = rng.gamma(2.0, 0.5, size=(20_000, 3)).astype(F32)
    errors = []

    def worker(observe):
        try:
            for _ in range(20):
                ctrl.observe(risk) if observe else ctrl.evaluate(risk)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert ctrl.observations == 40
    expected = sc.calibrate_thresholds(risk, [0.2, 0.6, 0.9])
    np.testing.assert_allclose(ctrl.thresholds, expected, rtol=0.5)
    assert np.isfinite(ctrl.thresholds).all()


def test_state_dict_round_trips_through_json(backend):
    ctrl = sc.ProbeController(SEED_LAYERS, alpha=0.3, warmup_observations=1, rule="threshold", soft_exit=False)
    risk = np.random.default_rng(0).random((100, 3), dtype=F32)
    ctrl.observe(risk)
    ctrl.observe(risk)
    state = json.loads(json.dumps(ctrl.state_dict()))
    again = sc.ProbeController.from_state_dict(state)
    np.testing.assert_array_equal(again.thresholds, ctrl.thresholds)
    assert again.observations == ctrl.observations == 2
    assert again.state_dict() == ctrl.state_dict()
    np.testing.assert_array_equal(again.evaluate(risk).exit_checkpoint, ctrl.evaluate(risk).exit_checkpoint)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.pop("alpha"), "state_dict is missing 'alpha'"),
    (lambda s: s.update(format_version=99), "expected 'sedac_core.ProbeController' version 1"),
    (lambda s: s.update(thresholds=[1.0]), "state_dict 'thresholds' has 1 values but 3 are needed"),
    (lambda s: s.update(thresholds=[1.0, 0.0, 1.0]), "state_dict 'thresholds'[1] must be in (0, inf]"),
    (lambda s: s["layers"][0].update(target_exit_rate=2), "target_exit_rate must be in [0, 1], got 2.0"),
])
def test_bad_state_dict_names_the_problem(backend, mutate, message):
    state = sc.ProbeController(SEED_LAYERS).state_dict()
    mutate(state)
    with pytest.raises(ValueError) as err:
        sc.ProbeController.from_state_dict(state)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(layer_idx=-1, target_exit_rate=0.5), ValueError, "layer_idx must be >= 0, got -1"),
    (dict(layer_idx=1.5, target_exit_rate=0.5), TypeError, "layer_idx must be an integer, got float"),
    (dict(layer_idx=1, target_exit_rate=-0.1), ValueError, "target_exit_rate must be in [0, 1], got -0.1"),
    (dict(layer_idx=1, target_exit_rate=0.5, initial_threshold=0), ValueError,
     "initial_threshold must be in (0, inf], got 0.0"),
    (dict(layer_idx=1, target_exit_rate=0.5, initial_threshold=float("inf")), ValueError,
     "initial_threshold must be finite, got inf"),
    (dict(layer_idx=1, target_exit_rate="0.5"), TypeError, "target_exit_rate must be a real number, got str"),
])
def test_layer_config_errors_name_the_field(kwargs, exc, message):
    with pytest.raises(exc) as err:
        sc.LayerConfig(**kwargs)
    assert str(err.value) == message


def test_evaluate_errors_name_the_array(backend):
    ctrl = sc.ProbeController(SEED_LAYERS)
    with pytest.raises(ValueError, match=r"risk has 2 columns but 3 checkpoints are configured"):
        ctrl.evaluate(np.zeros((4, 2), F32))
    with pytest.raises(ValueError, match=r"risk must be a 2-D array \[tokens, checkpoints\], got shape \(3,\)"):
        ctrl.evaluate(np.zeros(3, F32))
    with pytest.raises(TypeError, match="risk must be a real-valued array, got dtype bool"):
        ctrl.evaluate(np.zeros((1, 3), bool))


def test_review_edge_inputs_are_read_or_rejected_consistently(backend):
    raw = np.ndarray((3, 2), np.float32, buffer=bytearray(25), offset=1)  # misaligned
    assert not raw.flags.aligned
    np.testing.assert_array_equal(sc.consecutive_exit(raw, 0.5, 1), [-1, -1, -1])
    big = np.array([[0.5, 9, 9]], ">f4")  # big-endian: converted, not misread
    assert sc.ProbeController(SEED_LAYERS, rule="threshold").evaluate(big).exit_checkpoint[0] == 0
    with pytest.raises(ValueError, match="k must be < 2\\*\\*62"):
        sc.consecutive_exit(raw, 0.5, 2**64)
    with pytest.raises(ValueError, match="initial_threshold must be representable as float32"):
        sc.LayerConfig(1, 0.5, 1e-50)
    with pytest.raises(ValueError, match="initial_threshold must be representable as float32"):
        sc.LayerConfig(1, 0.5, 1e300)
    bad = sc.Trace(np.zeros((2, 2)), "risk", (-5, 1), 4, None, 0)
    with pytest.raises(ValueError, match="layers\\[0\\] must be >= 0"):
        sc.replay(bad, [sc.ProbeRule((1.0, 1.0))])


def test_native_rejects_foreign_byte_order():
    from sedac_core import _native

    out = np.empty(2, np.float32)
    with pytest.raises(TypeError, match="expected a C-contiguous 2-D float32 array"):
        _native.quantiles(np.array([[1, 1], [2, 3]], ">f4"), np.array([0.5, 0.5], np.float32), out)
