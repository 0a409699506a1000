"""Metric and baseline code on constructed cases with known answers."""

import json
import math

import numpy as np
import pytest
import torch

from sedac_bench.methods import (
    Method,
    PlannedExitDecider,
    StaticDropDecider,
    layers_for_fraction,
    monitor_method,
    oracle_exits,
    shortgpt_order,
    shuffled_exits,
)
from sedac_bench.metrics import (
    ModelShape,
    compute_summary,
    delta_ppl,
    identical_prefix,
    latency_percentiles,
    mean_context,
    perplexity,
    realized_vs_ideal,
    top1_agreement,
)
from sedac_bench.quality import evaluate, greedy_agreement
from sedac_bench.report import END, START, headline, update_readme
from sedac_monitor.api import find_layout, teacher_forced
from sedac_monitor.testing import tiny_model

SHAPE = ModelShape(hidden=4, intermediate=8, layers=2, heads=2, kv_heads=1, head_dim=2, vocab=10)


def test_compute_model_by_hand():
    # per layer: attention projections 4*(2*4 + 2*2) = 48, scores 2*ctx*4 = 8*ctx, MLP 3*4*8 = 96
    assert SHAPE.layer_macs(1) == 48 + 8 + 96
    assert SHAPE.token_macs(1, logits=True) == 2 * 152 + 40
    s = compute_summary(SHAPE, skipped_blocks_per_token=1.0, context=1, logits=True)
    assert s["skipped_mlp_fraction"] == 0.5
    assert s["flops_saved_fraction"] == pytest.approx(96 / 344)
    assert s["ideal_speedup"] == pytest.approx(344 / 248)
    assert s["effective_layers"] == pytest.approx(2 - 96 / 152)
    none = compute_summary(SHAPE, 0.0, 10)
    assert none["ideal_speedup"] == 1.0 and none["effective_layers"] == 2
    assert mean_context(3) == 2.0


def test_quality_metrics_by_hand():
    assert perplexity([math.log(4)] * 3) == pytest.approx(4.0)
    assert delta_ppl([0.0, 0.0], [math.log(2), math.log(2)]) == pytest.approx(1.0)
    assert delta_ppl([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert top1_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError, match="differ in shape"):
        top1_agreement([1, 2], [1])
    assert identical_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert identical_prefix([1, 2], [1, 2, 3]) == 2
    assert latency_percentiles([1.0] * 99 + [10.0])["p50"] == 1.0
    r = realized_vs_ideal(1.2, 1.5)
    assert r["speedup_ratio"] == pytest.approx(0.8) and r["time_saving_ratio"] == pytest.approx((1 / 6) / (1 / 3))


def test_baseline_building_blocks():
    assert shortgpt_order([0.2, 0.9, 0.5, 0.9]) == [1, 3, 2, 0]
    assert layers_for_fraction([1, 3, 2, 0], 0.5, 4) == [1, 3]
    assert layers_for_fraction([1, 3, 2, 0], 0.01, 4) == [1]  # at least one layer when anything is skipped
    assert layers_for_fraction([1, 3, 2, 0], 0.0, 4) == []
    safe = np.array([[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 1, 1]], dtype=np.uint8)
    protected = np.array([False, False, True, False])
    # 4 layers, protect_last 1: exiting at layer 2 or later skips nothing
    np.testing.assert_array_equal(oracle_exits(safe, 4, 1, protected), [1, -1, -1, -1])
    np.testing.assert_array_equal(oracle_exits(safe, 4, 0, protected), [1, -1, -1, 2])
    ex = np.array([3, -1, 5, 7, -1, 2])
    sh = shuffled_exits(ex, np.array([True, True, True, True, True, False]), seed=1)
    assert sorted(sh[:5].tolist()) == sorted(ex[:5].tolist()) and sh[5] == -1


def test_planned_and_static_deciders():
    d = PlannedExitDecider([0, -1, 2, 1], num_layers=4, protect_last=1)
    state = d.start(torch.zeros(2, 3))
    assert d.plan(1, state)[0].tolist() == [True, False] and d.plan(3, state) == (None, None)
    state = d.step(1, torch.zeros(2, 3), d.start(torch.zeros(2, 3)))
    assert d.plan(2, state)[0].tolist() == [False, True]
    with pytest.raises(RuntimeError, match="the exit plan has 4 rows"):
        d.start(torch.zeros(1, 3))
    s = StaticDropDecider([1])
    state = s.start(torch.zeros(3, 2))
    assert s.plan(1, state)[0].all() and s.plan(0, state) == (None, None)


def test_a_model_where_skipping_changes_nothing_scores_zero():
    """MLPs that output zero: skipping them changes nothing, so risk and ΔPPL are 0 while work is skipped."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
    layout = find_layout(model)
    windows = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    base = teacher_forced(layout, windows, None, 2)
    shape = ModelShape.of(model.config)
    m = monitor_method("everything exits", "V7", 6, 0.0, 1)
    r = evaluate(layout, windows, m, base, shape, batch_size=2)
    assert r["risk"] == 0.0 and r["delta_ppl"] == pytest.approx(0.0, abs=1e-12)
    assert r["skipped_mlp_fraction"] > 0.5 and r["ideal_speedup"] > 1
    drop = Method("drop all", "baseline", lambda: StaticDropDecider(range(6)), protect_first=0)
    r2 = evaluate(layout, windows, drop, base, shape, batch_size=2)
    assert r2["risk"] == 0.0 and r2["skipped_mlp_fraction"] == 1.0
    prompts = [windows[0, :10], windows[1, :12]]
    ref = greedy_agreement(layout, prompts, None, 5)["generated"]
    g = greedy_agreement(layout, prompts, m, 5, ref)
    assert g["identical_prefix_mean"] == 5 and g["fully_identical"] == 1.0


def test_a_model_where_skipping_matters_is_caught():
    model = tiny_model("llama")
    layout = find_layout(model)
    windows = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    base = teacher_forced(layout, windows, None, 2)
    drop = Method("drop all", "baseline", lambda: StaticDropDecider(range(6)), protect_first=0)
    r = evaluate(layout, windows, drop, base, ModelShape.of(model.config), batch_size=2)
    assert r["risk"] > 0.3 and r["delta_ppl"] != 0.0


def _results():
    rows = [
        {"name": "V7 calibrated (max risk 5%)", "family": "V7", "skipped_mlp_fraction": 0.01, "risk": 0.04,
         "delta_ppl": 0.05, "generation": {"fully_identical": 0.5, "identical_prefix_mean": 10}},
        {"name": "static drop 1 MLP(s) (ShortGPT-style)", "family": "baseline", "skipped_mlp_fraction": 0.033,
         "risk": 0.2, "delta_ppl": 0.4},
        {"name": "V7 original defaults", "family": "V7", "skipped_mlp_fraction": 0.75, "risk": 0.99, "delta_ppl": 1e6},
    ]
    return {"quality": {"rows": rows, "best_sedac": rows[0]["name"]}, "command": "sedac-bench run",
            "started": "2026-11-25", "machine": {"processor": "x86_64", "cpu_count": 2},
            "vllm": {"llama": {"compiled": {"rounds": 4, "rows": [
                {"config": "V7 calibrated", "kind": "prefill", "batch": 4, "speedup": 1.01, **_spread("prefill", 4)},
                # not a headline batch
                {"config": "V7 calibrated", "kind": "prefill", "batch": 64, "speedup": 1.5, **_spread("prefill", 64)},
                {"config": "V7 calibrated", "kind": "decode", "batch": 4, "speedup": 0.99, **_spread("decode", 4)}]}}}}


def _spread(kind, batch):
    """The rest of a vLLM row as sedac-bench run writes it."""
    return {"workload": f"{kind}-heavy, batch {batch}", "speedup_min": 0.9, "speedup_max": 1.6, "ideal_speedup": 1.01,
            "skipped_mlp_fraction": 0.01}


def test_headline_table_and_readme_block(tmp_path):
    lines = headline(_results())
    assert lines[0].startswith("| method | skipped MLP | top-1 risk | ΔPPL") and "compiled (batch 4) |" in lines[0]
    no_vllm = {k: v for k, v in _results().items() if k != "vllm"}  # sedac-bench run --no-vllm
    assert "compiled (not run) |" in headline(no_vllm)[0]
    assert "| V7 calibrated (max risk 5%) | 1.00% | 4.00% | +5.00% | 50% | 1.010x | 0.990x |" in lines
    assert any(line.startswith("| V7 original defaults | 75.00% | 99.00% | ×1e+06") for line in lines)
    res = tmp_path / "results.json"
    res.write_text(json.dumps(_results()))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold table\n{END}\noutro\n")
    update_readme(res, readme)
    text = readme.read_text()
    assert "old table" not in text and "| V7 calibrated (max risk 5%) | 1.00%" in text
    assert text.startswith("intro\n") and text.endswith("outro\n")
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="has no sedac-bench block"):
        update_readme(res, readme)


def test_every_block_is_generated_and_the_command_shows_no_local_paths(tmp_path, monkeypatch):
    from sedac_bench.cli import display_path
    from sedac_bench.report import BLOCKS

    results = _results()
    results["monitor_calibration"] = {"scope": "cascade", "tau": 0.99, "consecutive_k": 2, "min_layer": 10,
                                      "protect_last": 2, "status": "ok",
                                      "evidence": {"chosen": {"tokens": 2044, "skipped_mlp_fraction": 0.01,
                                                              "measured_risk": 0.04, "delta_ppl": 0.05}}}
    results["quality"]["tokens"] = 2044
    results["probes"] = {"entropy": {"heldout_metrics": {"7": {"spearman": 0.4, "auroc_unsafe": 0.7}}},
                         "safety": {"heldout_metrics": {"7": {"auroc_unsafe": 0.75, "safe_fraction": 0.01}}}}
    results["invoked_as"] = "nox -s demo"
    res = tmp_path / "results.json"
    res.write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    readme.write_text("".join(f"<!-- sedac-bench:{n}:start -->\nold\n<!-- sedac-bench:{n}:end -->\n" for n in BLOCKS))
    assert update_readme(res, readme) == list(BLOCKS)
    text = readme.read_text()
    assert "old" not in text and "made by `nox -s demo` (`sedac-bench run`)" in text
    assert "| calibrated (cascade, tau 0.99, K 2, min_layer 10, protect_last 2) | calibration" in text
    assert "| 7 | 0.40 | 0.70 | 0.75 | 1.0% |" in text
    monkeypatch.chdir(tmp_path)
    assert display_path(str(tmp_path / "bench-results")) == "bench-results"
    assert display_path("/tmp/tmp.abc123/x/.sedac-cache") == "…/x/.sedac-cache"
    assert display_path("--size") == "--size"


def test_vllm_targets_pass_or_fail_as_measured():
    from sedac_bench.vllm_compare import CALIBRATED, DEFAULTS, NO_EXITS, vllm_targets

    data = {"compiled": {"rows": [
        {"config": NO_EXITS, "workload": "prefill b4", "kind": "prefill", "speedup": 0.99},  # 1.0% overhead
        {"config": NO_EXITS, "workload": "decode b4", "kind": "decode", "speedup": 0.975},  # 2.6% overhead
        # judged against the byte-aware ideal (a FLOP-ideal ratio alone is not a target)
        {"config": DEFAULTS, "workload": "prefill b4", "kind": "prefill", "speedup_ratio": 0.5,
         "byte_speedup_ratio": 0.91},
        {"config": DEFAULTS, "workload": "decode b4", "kind": "decode", "speedup_ratio": 0.9,
         "byte_speedup_ratio": 0.79},
        # calibrated: within 0.5% of no exits and both >= 0.98x
        {"config": CALIBRATED, "workload": "prefill b4", "kind": "prefill", "speedup": 0.986},
        {"config": CALIBRATED, "workload": "decode b4", "kind": "decode", "speedup": 0.99}]}}
    got = [(t["workload"], t["passed"]) for t in vllm_targets(data)]
    assert got == [("prefill b4", True), ("prefill b4", True), ("decode b4", False), ("decode b4", True),
                   ("prefill b4", True), ("decode b4", False),
                   ("prefill b4", True), ("decode b4", False)]  # decode: no exits itself is below 0.98x
    calibrated = [t for t in vllm_targets(data) if "calibrated" in t["target"]]
    assert [round(t["value"], 3) for t in calibrated] == [-0.004, 0.015]
    slow = {"compiled": {"rows": [{"config": NO_EXITS, "workload": "w", "kind": "decode", "speedup": 1.0},
                                  {"config": CALIBRATED, "workload": "w", "kind": "decode", "speedup": 0.994}]}}
    assert [t["passed"] for t in vllm_targets(slow)][-1] is False  # 0.6% below no exits
    gauge = [t for t in vllm_targets(data) if "gauge" in t["target"]]
    assert [t["value"] for t in gauge] == [0.99, 0.975]
    wide = {"compiled": {"rows": [{"config": NO_EXITS, "workload": "w", "kind": "decode", "speedup": 1.04}]}}
    assert [t["passed"] for t in vllm_targets(wide)] == [True, False]  # faster than vanilla, outside the band


def test_calibrated_against_exits_off_is_judged_per_forward_where_both_rows_have_it():
    from sedac_bench.vllm_compare import CALIBRATED, NO_EXITS, vllm_targets

    def rows(cal, off):
        return {"compiled": {"rows": [{"config": NO_EXITS, "workload": "w", "kind": "prefill", **off},
                                      {"config": CALIBRATED, "workload": "w", "kind": "prefill", **cal}]}}

    # summed times 1.5% apart (a slow forward), per forward level: judged per forward, passes
    t = vllm_targets(rows({"speedup": 0.985, "forward_speedup": 1.001}, {"speedup": 1.0, "forward_speedup": 1.0}))[-1]
    assert t["passed"] and t["target"].endswith("(per forward)") and t["value"] == pytest.approx(0.001)
    assert (t["calibrated"], t["exits_off"]) == (1.001, 1.0)
    # per forward 1% apart: fails though the sums agree
    t = vllm_targets(rows({"speedup": 1.0, "forward_speedup": 0.99}, {"speedup": 1.0, "forward_speedup": 1.0}))[-1]
    assert not t["passed"] and t["value"] == pytest.approx(-0.01)
    # per forward, both must still be >= 0.98x
    assert not vllm_targets(rows({"speedup": 1.0, "forward_speedup": 0.979},
                                 {"speedup": 1.0, "forward_speedup": 0.978}))[-1]["passed"]
    # one row without per-forward times: both judged on summed times
    t = vllm_targets(rows({"speedup": 0.985, "forward_speedup": 1.001}, {"speedup": 1.0, "forward_speedup": None}))[-1]
    assert not t["passed"] and "per forward" not in t["target"]


def test_per_forward_speedup_pools_each_rounds_paired_forwards():
    from sedac_bench.vllm_compare import per_forward_speedup

    vanilla = [[1.0, 1.0, 1.0, 5.0], [2.0, 2.0, 2.0]]
    runs = [{"forward_seconds": [0.5, 0.5, 1.0, 1.0]}, {"forward_seconds": [2.0, 4.0, 1.0]}]
    got = per_forward_speedup(vanilla, runs)
    # ratios 2, 2, 1, 5 | 1, 0.5, 2: pooled median 2; per-round medians 2 and 1
    assert got == {"median": 2.0, "min": 1.0, "max": 2.0}
    assert per_forward_speedup([[1.0, 1.0]], [{"forward_seconds": [1.0]}]) is None  # forwards do not pair up
    assert per_forward_speedup([None], [{"forward_seconds": [1.0]}]) is None  # no vanilla forwards kept
    assert per_forward_speedup([[1.0]], [{}]) is None


def test_byte_aware_ideal_is_vanilla_time_over_vanilla_less_the_saving():
    from sedac_bench.vllm_compare import byte_aware_ideal

    runs = [{"mlp_seconds": 5.0, "ideal_saved_seconds": 2.0}, {"mlp_seconds": 5.0, "ideal_saved_seconds": 5.0},
            {"mlp_seconds": 5.0, "ideal_saved_seconds": 1.0}]
    assert byte_aware_ideal([10.0, 10.0, 10.0], runs) == 10.0 / 8.0  # median of 1.25, 2.0, 1.111
    assert byte_aware_ideal([10.0], [{"mlp_seconds": 0, "ideal_saved_seconds": 0}]) is None  # no accounting


def test_held_out_stream_never_repeats_a_window():
    from sedac_bench.vllm_compare import HeldOutStream

    stream = HeldOutStream(list(range(5000)))
    windows = [tuple(w) for _ in range(12) for w in stream.take(4, 256)]  # 12k tokens from 5k: wraps twice
    assert len(set(windows)) == len(windows) and all(len(w) == 256 for w in windows)
    assert len({w[:16] for w in windows}) == len(windows)  # not even a first block in common
    with pytest.raises(ValueError, match="too short"):
        HeldOutStream(list(range(100)))


def test_speculative_speedup_formula_and_prompt_lookup():
    from sedac_bench.spec import implied_speedup, ngram_proposals, required_alpha

    # Leviathan et al.: alpha 0.8, gamma 4, c 0.1 -> (1 - 0.8^5) / (0.2 * 1.4)
    assert implied_speedup(0.8, 0.1, max_gamma=4)["speedup"] == pytest.approx((1 - 0.8 ** 5) / (0.2 * 1.4))
    assert implied_speedup(0.0, 0.5) == {"speedup": 1.0, "gamma": 0}  # a useless draft is never used
    assert implied_speedup(1.0, 0.0, max_gamma=3)["speedup"] == 4.0
    a = [required_alpha(c) for c in (0.2, 0.5, 0.8)]
    assert a == sorted(a) and all(0 < x < 1 for x in a)
    assert implied_speedup(a[1], 0.5)["speedup"] == pytest.approx(1.1, abs=1e-3)
    ids = np.array([5, 6, 7, 5, 6, 9, 5, 6])
    # at t=4 (tokens 5 6) the last "5 6" ended at t=1, followed by 7; at t=7 it ended at t=4, followed by 9
    assert ngram_proposals(ids).tolist() == [-1, -1, -1, -1, 7, -1, -1, 9]


def test_expected_speedup_is_set_beside_the_measured_one():
    from sedac_bench.report import expected_section, expected_vs_measured

    calibration = {"evidence": {"expected_speedup": {"prefill": 1.0, "decode_b4": 1.01},
                                "original_defaults": {"expected_speedup": {"prefill": 2.0, "decode_b4": 1.2}},
                                "recommendation": "expected speed-up on this machine: ..."}}
    data = {"compiled": {"rows": [
        {"workload": "prefill b4", "kind": "prefill", "batch": 4, "config": "V7 calibrated", "speedup": 0.99},
        {"workload": "decode b4", "kind": "decode", "batch": 4, "config": "V7 original defaults", "speedup": 1.08},
        {"workload": "decode b4", "kind": "decode", "batch": 4, "config": "V7 calibrated, exits off", "speedup": 1.0}]}}
    rows = expected_vs_measured(calibration, data)
    assert [(r["config"], r["expected"]) for r in rows] == [("V7 calibrated", 1.0), ("V7 original defaults", 1.2)]
    assert [round(r["error"], 3) for r in rows] == [-0.01, -0.1]
    text = "\n".join(expected_section(calibration, data))
    assert "| decode b4 | V7 original defaults | 1.200x | 1.080x | -10.0% |" in text and "largest 10.0%" in text
    assert expected_section({}, data) == []
