"""The real SmolLM2-135M: calibrate V7 on Wikipedia text (max risk 0.05), evaluate on held-out news.

Needs the assets `nox -s tests` builds (SEDAC_ASSETS); a missing asset fails, it is never skipped.
Figures are printed (run with -s); the wall-clock ratio is reported, not asserted.
"""

import json

import pytest

from sedac_monitor.calibrate import DEFAULT_MAX_DELTA_PPL
from sedac_monitor.cli import evaluate, main

pytestmark = pytest.mark.slow  # minutes on 2 cores; the quick loop deselects it


def test_calibrated_monitor_on_held_out_text(assets, tmp_path, capsys):
    model = assets / "models" / "smollm2-135m-llama"
    out = tmp_path / "sedac_config.json"
    assert main(["calibrate", "--model", str(model), "--text", str(assets / "text" / "enwiki.txt"),
                 "--max-risk", "0.05", "--tokens", "2048", "--out", str(out)]) == 0
    cfg = json.loads(out.read_text())
    chosen = cfg["evidence"]["chosen"]
    assert cfg["status"] == "ok" and chosen["measured_risk"] <= 0.05
    assert cfg["model"]["num_layers"] == 30 and cfg["evidence"]["measurement_tokens"] == 2044
    held = evaluate(model, assets / "text" / "lee_news.txt", cfg, tokens=2048, max_length=512, batch_size=4,
                    timing_tokens=2048)
    capsys.readouterr()
    with capsys.disabled():
        print("\nSmolLM2-135M V7, calibrated on enwiki (max risk 0.05), held-out lee_news:\n"
              + json.dumps({"config": {k: cfg[k] for k in ("tau", "consecutive_k", "min_layer", "protect_last",
                                                           "scope")},
                            "calibration": chosen, "heldout": held}, indent=1))
    seeds = held["original_defaults"]
    # the original defaults skip most MLP work and destroy the predictions; the calibrated setting does not
    assert seeds["skipped_mlp_fraction"] > 0.5 and seeds["measured_risk"] > 0.5
    assert held["config"]["measured_risk"] < seeds["measured_risk"] / 4
    # the distribution budget holds on the calibration text and on held-out text (max ΔPPL, default 2%)
    assert cfg["max_delta_ppl"] == DEFAULT_MAX_DELTA_PPL and chosen["delta_ppl"] <= DEFAULT_MAX_DELTA_PPL
    assert held["config"]["delta_ppl"] <= DEFAULT_MAX_DELTA_PPL
    assert held["timing"]["unpatched_s"] > 0 and held["timing"]["patched_s"] > 0


def test_channel_soft_exit_calibrated_on_wikipedia_holds_on_held_out_news(assets, tmp_path, capsys):
    """`calibrate --channels` at max risk 5% / ΔPPL 2% on enwiki; the same config on held-out Lee news keeps
    its top-1 risk within the budget plus three binomial standard deviations of a 2044-token measurement, and
    its ΔPPL within 3%, while skipping a real share of the MLP's work."""
    model = assets / "models" / "smollm2-135m-llama"
    out = tmp_path / "channels.json"
    assert main(["calibrate", "--model", str(model), "--text", str(assets / "text" / "enwiki.txt"), "--channels",
                 "--max-risk", "0.05", "--tokens", "2048", "--budget", "6", "--out", str(out)]) == 0
    cfg = json.loads(out.read_text())
    chosen = cfg["evidence"]["chosen"]
    assert cfg["status"] == "ok" and cfg["tau"] > 1 and chosen["measured_risk"] <= 0.05
    held = evaluate(model, assets / "text" / "lee_news.txt", cfg, tokens=2048, max_length=512, batch_size=4)
    capsys.readouterr()
    h = held["config"]
    with capsys.disabled():
        print(f"\nSmolLM2-135M channel soft exit, calibrated on enwiki: saved {chosen['mlp_work_saved']:.2%}, risk "
              f"{chosen['measured_risk']:.2%}, ΔPPL {chosen['delta_ppl']:+.2%}; held-out lee_news: saved "
              f"{h['channel_mlp_work_saved']:.2%}, risk {h['measured_risk']:.2%}, ΔPPL {h['delta_ppl']:+.2%}")
    n = h["tokens"]
    assert h["measured_risk"] <= 0.05 + 3 * (0.05 * 0.95 / n) ** 0.5
    assert h["delta_ppl"] <= 0.03
    assert h["channel_mlp_work_saved"] >= 0.08 and h["skipped_mlp_fraction"] == 0.0
