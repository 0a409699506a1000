"""sedac-monitor calibrate / evaluate on a tiny model; the Clopper-Pearson bound."""

import json
import math

import numpy as np
import pytest
import torch

from sedac_monitor import clopper_pearson_upper, create_universal_accelerator, load_config
from sedac_monitor.api import InputError, load_model
from sedac_monitor.calibrate import BUDGET_NOT_MET, Grid, calibrate, candidate_list
from sedac_monitor.cli import main

TEXT = "\n\n".join(f"Record {i}: rivers carry {i % 13} stones past {i * 3} old mills, and the miller counts them."
                   for i in range(300))
GRID = Grid(taus=(0.85, 0.9, 0.93, 0.95, 0.97), ks=(1, 2), min_layers=(0, 2), protect=(0, 1))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "text.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="module")
def result(tiny_dir, text_file):
    return calibrate(tiny_dir / "llama", text_file, max_risk=0.2, tokens=1024, max_length=128, grid=GRID,
                     budget=6, log=lambda m: None)


def test_config_has_the_setting_and_its_evidence(result, text_file):
    assert result["format"] == "sedac_config" and result["status"] == "ok"
    for key in ("tau", "consecutive_k", "min_layer", "protect_last", "scope", "protect_first"):
        assert key in result
    ev = result["evidence"]
    chosen = ev["chosen"]
    assert chosen["measured_risk"] <= 0.2 and chosen["skipped_mlp_fraction"] > 0
    assert ev["measurement_tokens"] == 8 * 127 and ev["text"] == str(text_file)
    assert 1 <= len(ev["measured"]) <= 6
    # the chosen setting is the passing one with the most skipped work
    passing = [m for m in ev["measured"] if m["passes"]]
    assert chosen["skipped_mlp_fraction"] == max(m["skipped_mlp_fraction"] for m in passing)
    assert {"measured_risk", "delta_ppl", "ppl", "ppl_base", "exit_rate"} <= set(chosen)
    assert ev["original_defaults"]["tau"] == 0.98
    # what the chosen setting is expected to gain on this machine, and what the user is told
    assert set(ev["expected_speedup"]) == {"prefill", "decode_b1", "decode_b4", "decode_b16", "decode_b64"}
    assert all(v >= 1.0 for v in ev["expected_speedup"].values())
    assert ev["recommendation"].startswith("expected speed-up on this machine")
    assert len(chosen["per_layer_skip_rate"]) == 6 and ev["mlp_cost"]["points"]


def test_measured_numbers_are_what_the_accelerator_does(result, tiny_dir, text_file):
    """Re-measure the chosen setting independently through create_universal_accelerator(config=...)."""
    from sedac_monitor.loading import read_text, token_windows

    model, tok = load_model(tiny_dir / "llama")
    windows = token_windows(tok, read_text(text_file), 128, 8)
    acc = create_universal_accelerator(model, config=result)
    with torch.no_grad():
        base = model(input_ids=windows).logits[:, :-1].argmax(-1)
        with acc:
            out = model(input_ids=windows).logits[:, :-1].argmax(-1)
    assert int((out != base).sum()) == result["evidence"]["chosen"]["errors"] > 0


def test_online_correction_counts_exits_and_what_a_first_order_check_sees(result, tiny_dir, text_file):
    """The errors per exit sedac-vllm's online estimate uses: the chosen setting's measured errors over the
    tokens that exited, counted independently here; a first-order check sees at most the exited tokens."""
    from sedac_monitor.api import MonitorDecider, find_layout, monitor_rule
    from sedac_monitor.loading import read_text, token_windows
    from sedac_monitor.teacher import first_order_changes

    oc = result["evidence"]["online_correction"]
    chosen = result["evidence"]["chosen"]
    assert oc["measured_errors"] == chosen["errors"] and oc["tokens"] == chosen["tokens"]
    assert oc["exited"] == round(chosen["exit_rate"] * chosen["tokens"]) > 0
    assert oc["errors_per_exit"] == pytest.approx(oc["measured_errors"] / oc["exited"])
    assert 0 <= oc["first_order_changed"] <= oc["exited"]
    model, tok = load_model(tiny_dir / "llama")
    layout = find_layout(model)
    windows = token_windows(tok, read_text(text_file), 128, 8)
    never = MonitorDecider(monitor_rule(6, 1.5, 1, 0, 0, "cascade"), 6)
    assert first_order_changes(layout, windows, never) == {"tokens": 8 * 127, "exited": 0, "changed": 0}
    everyone = MonitorDecider(monitor_rule(6, -1.0, 1, 0, 0, "cascade"), 6)  # every token exits at once
    c = first_order_changes(layout, windows, everyone, protect_first=1)
    assert c["exited"] == 8 * 126 and 0 < c["changed"] <= c["exited"]  # position 0 never exits


def test_confidence_splits_the_text_and_bounds_the_risk(tiny_dir, text_file):
    r = calibrate(tiny_dir / "llama", text_file, max_risk=0.3, confidence=0.9, tokens=1024, max_length=128,
                  grid=GRID, budget=4, log=lambda m: None)
    ev = r["evidence"]
    assert ev["search_tokens"] == ev["measurement_tokens"] == 4 * 127
    for m in ev["measured"]:
        assert m["bound_confidence"] == pytest.approx(1 - 0.1 / 4)
        assert m["risk_upper_bound"] >= m["measured_risk"]
        assert m["delta_ppl_upper_bound"] >= m["delta_ppl"]
        assert m["passes"] == (m["risk_upper_bound"] <= 0.3 and m["delta_ppl_upper_bound"] <= 0.02)


def test_a_setting_must_keep_the_distribution_too(tiny_dir, text_file):
    """A setting within the top-1 budget is refused when its ΔPPL is over the distribution budget."""
    loose = calibrate(tiny_dir / "llama", text_file, max_risk=0.99, max_delta_ppl=10.0, tokens=512, max_length=128,
                      grid=GRID, budget=4, log=lambda m: None)
    top = loose["evidence"]["chosen"]
    assert loose["status"] == "ok" and top["delta_ppl"] > 0 and loose["max_delta_ppl"] == 10.0
    budget = top["delta_ppl"] / 2  # the risk budget still admits `top`; the distribution budget does not
    strict = calibrate(tiny_dir / "llama", text_file, max_risk=0.99, max_delta_ppl=budget, tokens=512,
                       max_length=128, grid=GRID, budget=4, log=lambda m: None)
    ev = strict["evidence"]
    for m in ev["measured"]:
        assert m["passes"] == (m["measured_risk"] <= 0.99 and m["delta_ppl"] <= budget)
    assert any(m["measured_risk"] <= 0.99 and not m["passes"] for m in ev["measured"])
    assert strict["max_delta_ppl"] == budget
    if strict["status"] == "ok":
        assert ev["chosen"]["delta_ppl"] <= budget
        assert ev["chosen"]["skipped_mlp_fraction"] < top["skipped_mlp_fraction"]
    else:
        assert strict["status"] == BUDGET_NOT_MET and strict["tau"] > 1


def test_delta_ppl_bound_and_t_quantiles():
    from sedac_monitor.bound import delta_ppl_upper, student_t_quantile

    # Student's t quantiles from the tables
    for p, df, want in ((0.95, 3, 2.3534), (0.95, 7, 1.8946), (0.975, 10, 2.2281), (0.99, 1, 31.8205)):
        assert student_t_quantile(p, df) == pytest.approx(want, abs=1e-3)
    rng = np.random.default_rng(0)
    base = rng.exponential(3.0, 4096)
    patched = base + rng.normal(0.01, 0.3, 4096)
    point = math.expm1(float((patched - base).mean()))
    b90, b99 = delta_ppl_upper(patched, base, 0.9), delta_ppl_upper(patched, base, 0.99)
    assert point < b90 < b99 < point + 0.05
    assert delta_ppl_upper(patched[:200], base[:200], 0.9) == math.inf  # one block of 128: nothing to bound
    same = delta_ppl_upper(base, base, 0.95)
    assert same == 0.0


def test_nothing_passing_gives_a_config_without_exits(tiny_dir, text_file):
    r = calibrate(tiny_dir / "llama", text_file, max_risk=0.0, tokens=512, max_length=128,
                  grid=Grid(taus=(0.5,), ks=(1,), min_layers=(0,), protect=(0,), scopes=("cascade",)),
                  budget=2, log=lambda m: None)
    assert r["tau"] > 1 and r["status"] == BUDGET_NOT_MET and r["evidence"]["chosen"] is None


def test_candidates_skip_more_first_and_are_distinct():
    import sedac_core

    rows = [{"rule": sedac_core.MonitorRule(t, 1, 0, 0, m), "skipped_mlp": s, "estimated_risk": e, "exit_rate": s}
            for t, m, s, e in [(0.9, "cascade", 0.3, 0.5), (0.95, "cascade", 0.2, 0.05), (0.96, "cascade", 0.2, 0.05),
                               (0.97, "per_layer", 0.1, 0.15), (0.99, "cascade", 0.0, 0.0)]]
    out = candidate_list(rows, 0.1)
    assert [(r["rule"].tau, r["rule"].scope) for r in out] == [(0.95, "cascade"), (0.97, "per_layer")]


def test_clopper_pearson_known_values():
    # zero errors: 1 - (1 - c)^(1/n)
    assert clopper_pearson_upper(0, 100, 0.95) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-6)
    # definition: P(Binomial(n, u) <= errors) = 1 - confidence, summed exactly here
    for errors, n, conf in ((5, 100, 0.95), (3, 40, 0.9), (20, 500, 0.99)):
        u = clopper_pearson_upper(errors, n, conf)
        cdf = sum(math.comb(n, i) * u ** i * (1 - u) ** (n - i) for i in range(errors + 1))
        assert cdf == pytest.approx(1 - conf, rel=1e-6)
    assert clopper_pearson_upper(5, 100, 0.95) == pytest.approx(0.1023, abs=1e-4)
    assert clopper_pearson_upper(10, 10, 0.9) == 1.0
    u = [clopper_pearson_upper(e, 1000, 0.95) for e in (0, 10, 50)]
    assert u == sorted(u) and all(e / 1000 < b for e, b in zip((0, 10, 50), u))
    with pytest.raises(ValueError, match="confidence must be in"):
        clopper_pearson_upper(1, 10, 1.0)
    with pytest.raises(ValueError, match="errors <= n"):
        clopper_pearson_upper(11, 10, 0.9)


def test_cli_round_trip_and_errors(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "cfg.json"
    assert main(["calibrate", "--model", str(tiny_dir / "qwen2"), "--text", str(text_file), "--tokens", "512",
                 "--max-length", "128", "--max-risk", "0.3", "--budget", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "expected speed-up on this machine" in printed
    cfg = load_config(out, 6)
    assert cfg["model"]["architecture"] == "Qwen2ForCausalLM"
    res = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(tiny_dir / "qwen2"), "--config", str(out), "--text", str(text_file),
                 "--tokens", "256", "--max-length", "128", "--json", str(res)]) == 0
    assert set(json.loads(res.read_text())) == {"text", "config", "original_defaults"}
    assert main(["calibrate", "--model", str(tmp_path / "missing"), "--text", str(text_file)]) == 2
    assert "model folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", "m", "--text", "t", "--max-risk", "1.5"])
    assert "--max-risk must be in [0.0, 0.999]" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tiny_dir / "qwen2"), "--config", str(tmp_path / "no.json"),
                 "--text", str(text_file)]) == 2
    assert "SEDAC monitor config not found" in capsys.readouterr().err


def test_config_validation(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_config(bad)
    bad.write_text(json.dumps({"tau": 0.9}))
    with pytest.raises(InputError, match="missing consecutive_k, min_layer, protect_last, scope"):
        load_config(bad)
    good = {"tau": 0.9, "consecutive_k": 2, "min_layer": 0, "protect_last": 0, "scope": "cascade",
            "model": {"num_layers": 30}}
    with pytest.raises(ValueError, match="calibrated for a model with 30 layers, but this model has 6"):
        load_config(good, 6)
    with pytest.raises(ValueError, match="consecutive_k must be in"):
        load_config({**good, "model": {}, "consecutive_k": 0}, 6)
    assert math.isfinite(load_config({**good, "model": {}}, 6)["tau"])
    # a file that names the scope `mode` is refused, naming the key it should use
    old = {k: v for k, v in good.items() if k != "scope"}
    with pytest.raises(InputError, match="names the exit scope 'mode'; the key is 'scope'"):
        load_config({**old, "mode": "per_layer", "model": {}}, 6)


def test_there_is_one_spelling_of_each_option(tiny_dir, text_file, tmp_path, capsys):
    """No pre-release aliases: --mode is not an option of calibrate, mode= not an argument of the accelerator."""
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", str(tiny_dir / "llama"), "--text", str(text_file), "--mode", "aggressive"])
    assert "unrecognized arguments: --mode" in capsys.readouterr().err
    from sedac_monitor import create_universal_accelerator
    from sedac_monitor.testing import tiny_model

    with pytest.raises(TypeError, match="mode"):
        create_universal_accelerator(tiny_model("llama"), tau=0.9, mode="per_layer")
    acc = create_universal_accelerator(tiny_model("llama"), tau=0.9, scope="per_layer")
    assert acc.rule.scope == "per_layer"



def test_measured_search_returns_the_most_aggressive_passing_candidate_or_none():
    from sedac_monitor.calibrate import measured_search

    calls = []

    def passes_from(first_ok):
        def passes(i):
            calls.append(i)
            return i >= first_ok
        return passes

    assert measured_search(16, passes_from(5), budget=8) == 5
    assert measured_search(16, passes_from(99), budget=8) is None  # nothing passes: nothing to use
    calls.clear()
    assert measured_search(16, passes_from(5), budget=2) in (None, 7, 11, 15)  # the budget bounds the runs
    assert len(calls) == 2
    with pytest.raises(ValueError, match="budget must be >= 1"):
        measured_search(3, passes_from(0), budget=0)


def test_labels_for_several_protect_values_share_work_and_equal_full_forced_passes(tiny):
    """The shared-suffix labels equal one value at a time, and each label is what a whole forward with the
    forced exit attached says (an independent path: every layer recomputed)."""
    from sedac_monitor.api import (
        ForcedExitDecider,
        cascade_labels,
        cascade_labels_for,
        find_layout,
        teacher_forced,
    )

    model = tiny
    layout = find_layout(model)
    L = layout.num_layers
    torch.manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (3, 24))
    base, shared = cascade_labels_for(layout, windows, range(L), (2, 0), batch_size=2)
    assert sorted(shared) == [0, 2]
    for q in (0, 2):
        alone_base, alone = cascade_labels(layout, windows, range(L), q, batch_size=2)
        assert torch.equal(alone_base.top1, base.top1)
        assert torch.equal(alone, shared[q])
        for p in range(L):
            forced = teacher_forced(layout, windows, ForcedExitDecider(L, p, q), batch_size=2)
            assert torch.equal(shared[q][:, p], (forced.top1 == base.top1).to(torch.uint8)), (q, p)
    # on random weights some exits must change a top-1, or the comparison above proves little
    assert int(shared[0].sum()) < shared[0].numel()
    with pytest.raises(ValueError, match="protect_last"):
        cascade_labels_for(layout, windows, range(L), (-1,))


def test_a_perplexity_blow_up_reads_as_a_factor():
    from sedac_monitor.calibrate import measured_text, ppl_text

    assert ppl_text(0.0081) == "+0.81%"
    assert ppl_text(-0.001) == "-0.10%"
    assert ppl_text(462500.0166) == "×4.63e+05"  # not "+46250001.66%"
    m = {"measured_risk": 0.0386, "risk_upper_bound": 0.0493, "delta_ppl": 0.0, "delta_ppl_upper_bound": 0.0047}
    assert measured_text(m, True) == "3.86% (bound 4.93%), ΔPPL +0.00% (bound +0.47%)"
    assert measured_text(m, False) == "3.86%, ΔPPL +0.00%"
