"""Decision log and online calibration, without an engine (the e2e and bench runs use the real one)."""

import json

import numpy as np
import pytest
import torch
from test_state import HF, attach, forward, with_settings

from sedac_vllm import (
    ConfigError,
    SedacConfig,
    ops,  # noqa: F401 - registers the custom ops
)
from sedac_vllm.online import DecisionLog, OnlineCalibrator, kl_divergence
from sedac_vllm.state import VllmSedac


def test_decision_log_is_sampled_and_bounded(tmp_path):
    path = tmp_path / "decisions.jsonl"
    cfg = SedacConfig.from_env(with_settings(tmp_path, {
        "SEDAC_ENABLED": "1", "SEDAC_TAU": "0.5", "SEDAC_CONSECUTIVE_K": "1", "SEDAC_DECISION_LOG": str(path)},
        decision_log_rate=1))
    sedac = VllmSedac(cfg, HF, 4, 16, torch.device("cpu"))
    mlps = attach(sedac)
    forward(sedac, mlps, rows=8, seed=0)
    records = [json.loads(line) for line in open(path)]
    assert len(records) == 8 and {r["pos"] for r in records} == set(range(1, 9))
    first = records[0]
    assert [e["layer"] for e in first["layers"]] == [0, 1, 2, 3]
    assert all(set(e) == {"layer", "signal", "threshold"} and e["threshold"] == 0.5 for e in first["layers"])
    assert first["decision"] in ("exit", "stay") and first["tok"] == 0
    assert (first["exit_layer"] is None) == (first["decision"] == "stay")
    # the bound: a file already near its limit takes no more records
    small = DecisionLog(str(tmp_path / "small.jsonl"), 1.0, max_bytes=300)
    n = small.write(0, torch.arange(8), None, torch.full((8,), 4), np.zeros((8, 4)), [0, 1, 2, 3], [0.5], None, 4,
                    "monitor")
    assert n == 0 and small.full and not (tmp_path / "small.jsonl").exists()
    sampled = DecisionLog(str(tmp_path / "s.jsonl"), 0.1, max_bytes=10 ** 7, seed=1)
    total = sum(sampled.write(0, torch.arange(100), None, torch.full((100,), 4), None, [0], [0.5], None, 4, "m")
                for _ in range(20))
    assert 100 < total < 300  # about 10% of 2,000 rows


def test_kl_divergence_is_zero_for_equal_histograms_and_finite_for_disjoint_ones():
    a = np.array([10, 20, 30, 0])
    assert kl_divergence(a, a * 3) == pytest.approx(0.0, abs=1e-9)
    assert 1 < kl_divergence(np.array([100, 0]), np.array([0, 100])) < 20


def calibrator(tau_t, histogram=None, tolerance=0.05, window=100, margin=0.01):
    return OnlineCalibrator(tau_t, 0.9, tolerance, shadow_rate=1.0, window=window, margin=margin,
                            drift_threshold=0.1, histogram=histogram, min_layer=0, tau_increment=0.01)


def shadowed(online, forwards, skipped_work):
    """Forwards of six rows, the first three exiting after layer 0, with the LM head reading class 0 from the
    served stream and whatever ``skipped_work`` adds to the skipped rows."""
    head = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, 4))
    flat = torch.zeros(6, 4)
    flat[:, 0] = 1.0
    skip = torch.tensor([True, True, True, False, False, False])
    for _ in range(forwards):
        online.shadow(3, flat, skip, skipped_work)
        online.end_forward(flat, torch.tensor([1, 1, 1, 4, 4, 4]), 4, None, lambda x: x, head, counted=True)


def flips(x):  # skipped work that moves the top-1 to class 1
    return torch.zeros_like(x).index_fill_(1, torch.tensor([1]), 5.0)


def test_shadow_check_raises_tau_when_skipped_work_changes_the_top1():
    tau_t = torch.tensor(0.9)
    online = calibrator(tau_t)
    shadowed(online, 60, flips)
    st = online.stats()
    assert st["risk_estimate"] == pytest.approx(0.5, rel=0.05)  # all checked rows changed x half the rows exited
    assert st["tau"] > 0.9 and float(tau_t) == st["tau"] and st["adjustments"] > 0
    # undecayed totals: every forward's six rows, three exited, all three checked and changed
    assert st["totals"] == {"rows": 360, "exited_rows": 180, "checked_rows": 180, "changed_rows": 180}
    # skipped work that changes nothing: tau comes back down, but never below its bound
    online.checked = online.changed = 0.0
    shadowed(online, 200, torch.zeros_like)
    assert online.stats()["risk_estimate"] == 0.0 and online.tau == pytest.approx(0.89)


def test_online_calibration_only_tightens_by_default():
    """The estimate is first order and can read low: by default tau never goes below the calibrated value."""
    assert SedacConfig.from_env({"SEDAC_ENABLED": "1"}).online_margin == 0.0
    tau_t = torch.tensor(0.9)
    online = calibrator(tau_t, margin=SedacConfig.from_env({"SEDAC_ENABLED": "1"}).online_margin)
    shadowed(online, 200, torch.zeros_like)  # nothing changes: the estimate says loosen
    assert online.risk_estimate == 0.0 and online.tau == 0.9 and float(tau_t) == pytest.approx(0.9)
    assert online.stats()["tau_bounds"] == [0.9, 1.0]
    shadowed(online, 60, flips)  # traffic where exits hurt: tighten
    raised = online.tau
    assert raised > 0.9
    online.checked = online.changed = 0.0
    shadowed(online, 400, torch.zeros_like)  # and back, to the calibrated tau and no further
    assert online.tau == pytest.approx(0.9) and online.tau >= 0.9


def test_a_margin_that_loosens_is_announced(caplog):
    with caplog.at_level("WARNING", logger="sedac_vllm"):
        calibrator(torch.tensor(0.9), margin=0.01)
    assert "throughput option" in caplog.text and "less safe" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sedac_vllm"):
        calibrator(torch.tensor(0.9), margin=0.0)
    assert "throughput option" not in caplog.text


def test_drift_falls_back_to_no_exits_and_recovers():
    edges = [0.0, 0.9, 0.95, 1.0]
    tau_t = torch.tensor(0.9)
    online = calibrator(tau_t, {"edges": edges, "counts": [0, 2, 98]})
    ident = torch.nn.Identity()
    similar = np.full((50, 4), 0.97)
    for _ in range(20):  # 200 signals a forward: the histogram matures (1500 signals for a window of 100)
        online.end_forward(torch.zeros(50, 4), torch.full((50,), 4), 4, similar, ident, ident, counted=True)
    assert not online.fallback and online.drift_kl < 0.1
    shifted = np.full((50, 4), 0.5)  # a text whose signal looks nothing like the calibration text's
    for _ in range(40):
        online.end_forward(torch.zeros(50, 4), torch.full((50,), 4), 4, shifted, ident, ident, counted=True)
    assert online.fallback and online.fallbacks == 1 and float(tau_t) == 1.5  # no exits while drifting
    for _ in range(400):
        online.end_forward(torch.zeros(50, 4), torch.full((50,), 4), 4, similar, ident, ident, counted=True)
    assert not online.fallback and float(tau_t) == pytest.approx(online.tau)


def test_a_young_histogram_does_not_count_as_drift():
    from sedac_vllm.online import drift_min_signals

    tau_t = torch.tensor(0.9)
    online = calibrator(tau_t, {"edges": [0.0, 0.9, 0.95, 1.0], "counts": [0, 2, 98]})
    assert drift_min_signals(3, 100) == 1500  # half of the 3000 signals a window of 100 spans (> 50 per bin)
    ident = torch.nn.Identity()
    shifted = np.full((10, 4), 0.5)  # 40 signals a forward, all unlike the calibration text's
    forwards = 0
    while online.recent.sum() + 40 * (1 - online.recent.sum() / 3000) < 1500:  # the next forward leaves it young
        online.end_forward(torch.zeros(10, 4), torch.full((10,), 4), 4, shifted, ident, ident, counted=True)
        forwards += 1
        assert online.drift_kl is None and not online.fallback and float(tau_t) == pytest.approx(0.9)
    assert forwards > 30
    online.end_forward(torch.zeros(10, 4), torch.full((10,), 4), 4, shifted, ident, ident, counted=True)
    assert online.drift_kl > 0.1 and online.fallback and online.fallbacks == 1


def test_the_estimate_counts_the_damage_exits_do_to_later_tokens():
    """With the calibration's errors per exit, the estimate is at least exit fraction x errors per exit,
    though the shadow check sees no change: tau rises on that alone."""
    tau_t = torch.tensor(0.9)
    online = OnlineCalibrator(tau_t, 0.9, 0.05, shadow_rate=1.0, window=100, margin=0.0, drift_threshold=0.1,
                              histogram=None, min_layer=0, tau_increment=0.01, errors_per_exit=0.2)
    shadowed(online, 30, torch.zeros_like)  # half the rows exit, no top-1 moves in the shadow check
    st = online.stats()
    assert st["risk_estimate"] == pytest.approx(0.5 * 0.2) and st["errors_per_exit"] == 0.2
    assert st["tau"] > 0.9
    plain = calibrator(torch.tensor(0.9))
    shadowed(plain, 30, torch.zeros_like)
    assert plain.stats()["risk_estimate"] == 0.0 and plain.tau <= 0.9  # the shadow check alone: no rise


def test_online_needs_the_monitor_and_is_exported(tmp_path):
    with pytest.raises(ConfigError, match="SEDAC_ONLINE=1 works with the V7 monitor"):
        SedacConfig.from_env({"SEDAC_ENABLED": "1", "SEDAC_ONLINE": "1", "SEDAC_MODE": "probe",
                              "SEDAC_PROBE_DIR": str(tmp_path)})
    cfg = SedacConfig.from_env(with_settings(tmp_path, {
        "SEDAC_ENABLED": "1", "SEDAC_TAU": "0.5", "SEDAC_CONSECUTIVE_K": "1", "SEDAC_ONLINE": "1"}, shadow_rate=1))
    sedac = VllmSedac(cfg, HF, 4, 16, torch.device("cpu"))
    sedac.final_norm, sedac.compute_logits = torch.nn.Identity(), torch.nn.Linear(16, 5)
    mlps = attach(sedac)
    for seed in range(3):
        forward(sedac, mlps, rows=8, seed=seed)
    online = sedac.stats()["online"]
    assert online["checked_rows"] > 0 and online["risk_estimate"] is not None
    assert online["drift_kl"] is None  # no calibration histogram in an env-only config: drift detection off


def test_decision_log_never_holds_a_partial_line(tmp_path, monkeypatch, caplog):
    """Each forward's records are one append; a write the disk cuts short is taken back; a torn last line
    left by something else is cut off at start. Every line of the file parses."""
    path = tmp_path / "d.jsonl"
    args = (torch.arange(6), None, torch.full((6,), 4), np.zeros((6, 1)), [0], [0.5], None, 4, "monitor")
    log = DecisionLog(str(path), 1.0, max_bytes=10 ** 6)
    assert log.write(0, *args) == 6
    good = path.read_bytes()
    # a disk that takes only part of a write
    import sedac_vllm.online as online

    real_write = online.os.write
    monkeypatch.setattr(online.os, "write", lambda fd, b: real_write(fd, b[: len(b) // 2]))
    assert log.write(1, *args) == 0 and log.full
    monkeypatch.setattr(online.os, "write", real_write)
    assert path.read_bytes() == good and "cut short" in caplog.text
    # a torn last line from an earlier crash: cut off when the log is opened again
    path.write_bytes(good + b'{"forward": 2, "pos"')
    again = DecisionLog(str(path), 1.0, max_bytes=10 ** 6)
    assert path.read_bytes() == good and again.written == len(good) and "partial line" in caplog.text
    assert again.write(3, *args) == 6
    lines = path.read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(line)["forward"] in (0, 3) for line in lines)
