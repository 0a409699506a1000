"""collect -> train -> calibrate -> load on tiny random models; interruption safety; bad files."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sedac_probes
from sedac_monitor.api import (
    ForcedExitDecider,
    find_layout,
    load_model,
    model_identity,
    teacher_forced,
    token_windows,
)
from sedac_monitor.testing import tiny_model
from sedac_probes import ProbeFileError
from sedac_probes.calibrate import calibrate as calibrate_probes
from sedac_probes.cli import main
from sedac_probes.collect import collect, default_layers
from sedac_probes.metrics import auroc, r2, spearman

TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog while counting {i * 7} sheep, "
    f"and then writes {i} short sentences about rivers, stones and weather." for i in range(200))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def pipeline(tiny_dir, text_file, tmp_path_factory):
    """Data, entropy probes and safety probes for the tiny Llama, made through the CLI."""
    root = tmp_path_factory.mktemp("pipe")
    model = str(tiny_dir / "llama")
    assert main(["collect", "--model", model, "--text", str(text_file), "--out", str(root / "data"),
                 "--layers", "1,3,4", "--samples", "12", "--max-length", "64", "--shard-windows", "4"]) == 0
    for target in ("entropy", "safety"):
        assert main(["train", "--data", str(root / "data"), "--out", str(root / target), "--target", target,
                     "--epochs", "4", "--batch-size", "128", "--rank", "16"]) == 0
    return root


def test_default_layers_are_evenly_spaced():
    assert default_layers(30) == [7, 14, 21]
    assert default_layers(36) == [8, 17, 26]
    assert default_layers(6) == [1, 2, 3]


def test_collect_writes_what_training_needs(pipeline):
    meta = json.loads((pipeline / "data" / "collect.json").read_text())
    assert meta["complete"] and meta["layers"] == [1, 3, 4] and meta["shards"] == 3
    shard = load_file(str(pipeline / "data" / "shard-00000.safetensors"))
    n = 4 * 63
    assert shard["hidden.3"].dtype == torch.float16 and shard["hidden.3"].shape == (n, 128)
    assert shard["entropy.3"].shape == (n,) and (shard["entropy.3"] >= 0).all()
    assert (shard["entropy.3"] <= np.log(384) + 1e-4).all()
    assert set(shard["cascade_safe.1"].unique().tolist()) <= {0, 1}
    assert (shard["cascade_safe.1"][shard["position"] == 0] == 1).all()  # the first token never exits
    assert shard["top1"].shape == (n,) and shard["position"].max() == 62


def test_labels_match_full_forced_exit_passes(tiny_dir, pipeline):
    """Label (b) is computed from stored streams; it equals running the whole model with the exit forced."""
    model, tok = load_model(tiny_dir / "llama")
    layout = find_layout(model)
    windows = token_windows(tok, TEXT, 64, 4)
    base = teacher_forced(layout, windows, None, 2)
    shard = load_file(str(pipeline / "data" / "shard-00000.safetensors"))
    for layer in (1, 3):
        forced = teacher_forced(layout, windows, ForcedExitDecider(6, layer), 2)
        assert torch.equal((forced.top1 == base.top1).to(torch.uint8), shard[f"cascade_safe.{layer}"])
    assert torch.equal(base.top1, shard["top1"])
    # label (a): the logit lens at the last layer is the model itself
    assert 0 < shard["lens_match.1"].float().mean() < 1


def test_interrupted_collection_resumes_to_the_same_data(tiny_dir, text_file, pipeline, tmp_path):
    out = tmp_path / "data"
    args = dict(layers="1,3,4", samples=12, max_length=64, shard_windows=4)
    model = load_model(tiny_dir / "llama")
    collect(tiny_dir / "llama", text_file, out, model_and_tokenizer=model, stop_after_shards=1, log=lambda m: None,
            **args)
    meta = json.loads((out / "collect.json").read_text())
    assert not meta["complete"] and sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors"]
    (out / "shard-00001.safetensors.tmp").write_bytes(b"half a shard")  # a crash mid-write
    with pytest.raises(Exception, match="incomplete"):
        sedac_probes.collect.load_data(out)
    with pytest.raises(Exception, match="different settings"):
        collect(tiny_dir / "llama", text_file, out, model_and_tokenizer=model, log=lambda m: None,
                **{**args, "layers": "1,2"})
    logs = []
    collect(tiny_dir / "llama", text_file, out, model_and_tokenizer=model, log=logs.append, **args)
    assert any("resuming, 1 of 3 shards" in m for m in logs)
    assert not list(out.glob("*.tmp"))
    for i in range(3):
        a = load_file(str(out / f"shard-{i:05d}.safetensors"))
        b = load_file(str(pipeline / "data" / f"shard-{i:05d}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs.clear()
    collect(tiny_dir / "llama", text_file, out, model_and_tokenizer=model, log=logs.append, **args)
    assert logs and "already complete" in logs[0]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma", "gemma2"])
def test_collect_works_for_every_supported_family(family, text_file, tmp_path):
    tiny_model(family, tmp_path / family)
    out = collect(tmp_path / family, text_file, tmp_path / "data", layers=None, samples=2, max_length=32,
                  log=lambda m: None)
    meta = json.loads((out / "collect.json").read_text())
    assert meta["complete"] and meta["layers"] == [1, 2, 3] and meta["model"]["model_type"] == family


def test_training_reports_metrics_and_is_deterministic(pipeline, tmp_path):
    meta = json.loads((pipeline / "entropy" / "sedac_probes.json").read_text())
    per_layer = meta["training"]["per_layer"]
    assert set(per_layer) == {"1", "3", "4"}
    assert all({"r2", "spearman", "auroc_unsafe", "best_epoch"} <= set(v) for v in per_layer.values())
    safety = json.loads((pipeline / "safety" / "sedac_probes.json").read_text())["training"]["per_layer"]
    assert all("auroc_unsafe" in v and "r2" not in v for v in safety.values())
    assert main(["train", "--data", str(pipeline / "data"), "--out", str(tmp_path / "again"), "--epochs", "4",
                 "--batch-size", "128", "--rank", "16"]) == 0
    a = load_file(str(pipeline / "entropy" / "probes.safetensors"))
    b = load_file(str(tmp_path / "again" / "probes.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_that_diverges_says_so():
    """Non-finite data: no epoch's held-out loss is a number, so no state is ever best; the error says why
    instead of failing inside load_state_dict."""
    from sedac_monitor.api import InputError
    from sedac_probes.train import train_probe

    x = torch.randn(64, 16)
    x[3, 5] = float("nan")
    y = torch.rand(64)
    with pytest.raises(InputError, match=r"training layer 7 diverged: the held-out loss was nan after every epoch"):
        train_probe(x, y, x, y, "entropy", 4, 2, 16, 1e-3, 0, desc="layer 7")


def test_calibrate_writes_thresholds_and_evidence(pipeline, tmp_path):
    probes = tmp_path / "p"
    shutil.copytree(pipeline / "entropy", probes)
    assert main(["calibrate", "--probes", str(probes), "--data", str(pipeline / "data"),
                 "--exit-rates", "0.2,0.3,0.5"]) == 0
    meta = json.loads((probes / "sedac_probes.json").read_text())
    assert meta["exit_rates"] == pytest.approx([0.2, 0.3, 0.5], abs=0.01)
    ev = meta["calibration"]
    assert ev["tokens"] > 0 and 0 < ev["v6_0"]["exit_rate"] <= 1 and "disagreement" in ev["v6_1"]
    assert main(["calibrate", "--probes", str(probes), "--data", str(pipeline / "data"), "--max-risk", "0.05"]) == 0
    ev = json.loads((probes / "sedac_probes.json").read_text())["calibration"]
    assert ev["v6_0"]["disagreement"] <= 0.05
    assert main(["calibrate", "--probes", str(probes), "--data", str(pipeline / "data"),
                 "--strategy", "aggressive"]) == 0
    ev = json.loads((probes / "sedac_probes.json").read_text())["calibration"]
    assert ev["v6_0"]["exit_rate"] == pytest.approx(0.25, abs=0.03)
    loaded = sedac_probes.load(probes, model_config={"hidden_size": 128, "num_hidden_layers": 6,
                                                     "intermediate_size": 256, "vocab_size": 384})
    assert loaded.layers == [1, 3, 4] and len(loaded.thresholds) == 3


def test_calibrate_with_the_model_checks_measured_risk(pipeline, tiny_dir, tmp_path):
    probes = tmp_path / "p"
    shutil.copytree(pipeline / "safety", probes)
    assert main(["calibrate", "--probes", str(probes), "--data", str(pipeline / "data"), "--max-risk", "0.1",
                 "--model", str(tiny_dir / "llama"), "--budget", "4"]) == 0
    ev = json.loads((probes / "sedac_probes.json").read_text())["calibration"]
    assert ev["measured"]["risk"] <= 0.1 and ev["measured"]["tokens"] == 12 * 62
    assert ev["measured"]["delta_ppl"] <= 0.02 and ev["max_delta_ppl"] == 0.02  # the distribution budget too
    # the thresholds' expected speed-up on this machine, and whether SEDAC pays with them
    assert set(ev["expected_speedup"]) == {"prefill", "decode_b1", "decode_b4", "decode_b16", "decode_b64"}
    assert ev["recommendation"].startswith("expected speed-up on this machine")
    assert 1 <= len(ev["measured_candidates"]) <= 5
    meta = json.loads((probes / "sedac_probes.json").read_text())
    assert ev["measured"]["thresholds"] == pytest.approx(meta["thresholds"])
    other = tmp_path / "other"
    tiny_model("llama", other, seed=3)
    with pytest.raises(Exception, match="is not the model the data"):
        calibrate_probes(probes, pipeline / "data", max_risk=0.1, model=other, log=lambda m: None)


def test_calibrate_refuses_thresholds_that_move_the_distribution(pipeline, tiny_dir, tmp_path, monkeypatch):
    """Thresholds within the top-1 budget but over the ΔPPL budget are not chosen; a looser --max-delta-ppl
    admits them."""
    from sedac_monitor.calibrate import BUDGET_NOT_MET
    from sedac_probes import calibrate as cal

    probes = tmp_path / "p"
    shutil.copytree(pipeline / "safety", probes)
    real = cal._Measurer.measure

    def within_risk_but_not_ppl(self, thresholds):
        m = real(self, thresholds)  # the measurer's own record (its history), edited in place
        m.update(risk=0.0, delta_ppl=0.5)
        return m

    monkeypatch.setattr(cal._Measurer, "measure", within_risk_but_not_ppl)
    args = ["calibrate", "--probes", str(probes), "--data", str(pipeline / "data"), "--max-risk", "0.1",
            "--model", str(tiny_dir / "llama"), "--budget", "2"]
    assert main(args) == 0
    assert json.loads((probes / "sedac_probes.json").read_text())["status"] == BUDGET_NOT_MET
    assert main(args + ["--max-delta-ppl", "0.6"]) == 0
    meta = json.loads((probes / "sedac_probes.json").read_text())
    assert meta["status"] == "ok" and meta["calibration"]["max_delta_ppl"] == 0.6


def test_calibrate_that_meets_no_budget_writes_thresholds_that_never_exit(pipeline, tiny_dir, tmp_path, capsys,
                                                                           monkeypatch):
    """Every candidate fails when measured: the file must say so and hold a setting that never exits,
    not the last candidate tried."""
    import sedac_core
    from sedac_monitor.calibrate import BUDGET_NOT_MET
    from sedac_probes import calibrate as cal

    probes = tmp_path / "p"
    shutil.copytree(pipeline / "safety", probes)
    real = cal._Measurer.measure
    monkeypatch.setattr(cal._Measurer, "measure", lambda self, t: {**real(self, t), "risk": 1.0})
    assert main(["calibrate", "--probes", str(probes), "--data", str(pipeline / "data"), "--max-risk", "0.1",
                 "--model", str(tiny_dir / "llama"), "--budget", "3"]) == 0
    assert f"{BUDGET_NOT_MET} (max risk 0.1, max ΔPPL 0.02)" in capsys.readouterr().err
    meta = json.loads((probes / "sedac_probes.json").read_text())
    assert meta["status"] == BUDGET_NOT_MET and meta["exits_disabled"] is True
    assert meta["thresholds"] == [sedac_core.MIN_THRESHOLD] * 3
    loaded = sedac_probes.load(probes)
    assert loaded.exits_disabled and loaded.calibrated
    # a later calibration that succeeds clears the status
    monkeypatch.undo()
    assert main(["calibrate", "--probes", str(probes), "--data", str(pipeline / "data"), "--exit-rates",
                 "0.2,0.3,0.5"]) == 0
    meta = json.loads((probes / "sedac_probes.json").read_text())
    assert meta["status"] == "ok" and meta["exits_disabled"] is False


def test_calibrate_rejects_conflicting_choices(pipeline, capsys):
    args = ["calibrate", "--probes", str(pipeline / "entropy"), "--data", str(pipeline / "data")]
    assert main(args + ["--exit-rates", "0.1,0.2,0.3", "--max-risk", "0.1"]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert main(args + ["--exit-rates", "0.1,0.2"]) == 2
    assert "--exit-rates has 2 values but the probes have 3 layers" in capsys.readouterr().err
    assert main(args) == 2
    assert "give --exit-rates, --max-risk or --strategy" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad files


@pytest.fixture
def probe_dir(pipeline, tmp_path):
    d = tmp_path / "probes"
    shutil.copytree(pipeline / "safety", d)
    return d


def edit_meta(d, **changes):
    meta = json.loads((d / "sedac_probes.json").read_text())
    meta.update(changes)
    (d / "sedac_probes.json").write_text(json.dumps(meta))


CFG = {"hidden_size": 128, "num_hidden_layers": 6, "intermediate_size": 256, "vocab_size": 384}


def test_load_validates_against_the_model(probe_dir, tiny_dir):
    model, _ = load_model(tiny_dir / "llama")
    ok = sedac_probes.load(probe_dir, model_config=model.config, fingerprint=model_identity(model)["fingerprint"])
    assert ok.target == "safety" and ok.bank.rank == 16
    with pytest.raises(ProbeFileError, match="probe hidden size 128 does not match model hidden size 576"):
        sedac_probes.load(probe_dir, model_config={**CFG, "hidden_size": 576})
    with pytest.raises(ProbeFileError, match="probe layer 4 does not exist in a model with 4 layers"):
        sedac_probes.load(probe_dir, model_config={**CFG, "num_hidden_layers": 4})
    with pytest.raises(ProbeFileError, match="trained for a model with vocab_size 384, but this model has "
                                             "vocab_size 32000"):
        sedac_probes.load(probe_dir, model_config={**CFG, "vocab_size": 32000})
    other = tiny_model("llama", seed=5)
    with pytest.raises(ProbeFileError, match="trained on a different checkpoint"):
        sedac_probes.load(probe_dir, model_config=other.config, fingerprint=model_identity(other)["fingerprint"])


def test_missing_layer(probe_dir):
    edit_meta(probe_dir, layers=[1, 3, 4, 5])
    with pytest.raises(ProbeFileError, match=r"SEDAC probe missing for layer 5: .*probes.safetensors"):
        sedac_probes.load(probe_dir)


def test_truncated_safetensors(probe_dir):
    path = probe_dir / "probes.safetensors"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ProbeFileError, match=r"probe weights unreadable \(truncated or not safetensors\)"):
        sedac_probes.load(probe_dir)


def test_bad_json_and_missing_files(probe_dir, tmp_path):
    (probe_dir / "sedac_probes.json").write_text("{not json")
    with pytest.raises(ProbeFileError, match="metadata is not valid JSON"):
        sedac_probes.load(probe_dir)
    with pytest.raises(ProbeFileError, match="SEDAC probe directory not found"):
        sedac_probes.load(tmp_path / "nowhere")
    (probe_dir / "sedac_probes.json").unlink()
    with pytest.raises(ProbeFileError, match="SEDAC probe metadata missing"):
        sedac_probes.load(probe_dir)


def test_wrong_shapes_and_fields(probe_dir):
    edit_meta(probe_dir, rank=32)
    with pytest.raises(ProbeFileError, match=r"layer1.down.weight has shape \(16, 128\), expected \(32, 128\)"):
        sedac_probes.load(probe_dir)
    edit_meta(probe_dir, rank=16, format_version=9)
    with pytest.raises(ProbeFileError, match="format_version 9"):
        sedac_probes.load(probe_dir)
    edit_meta(probe_dir, format_version=1, layers=[3, 1])
    with pytest.raises(ProbeFileError, match="strictly increasing"):
        sedac_probes.load(probe_dir)
    edit_meta(probe_dir, layers=[1, 3, 4], thresholds=[0.1, "x", 0.3])
    with pytest.raises(ProbeFileError, match="'thresholds' must be a list of 3 finite numbers"):
        sedac_probes.load(probe_dir)
    edit_meta(probe_dir, thresholds=None, format="pickle")
    with pytest.raises(ProbeFileError, match="is not a SEDAC probe file"):
        sedac_probes.load(probe_dir)


def test_cli_errors_are_clear(tmp_path, capsys, text_file, tiny_dir):
    assert main(["collect", "--model", str(tmp_path / "none"), "--text", str(text_file), "--out",
                 str(tmp_path / "d")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["collect", "--model", str(tiny_dir / "llama"), "--text", str(tmp_path / "none.txt"), "--out",
                 str(tmp_path / "d")]) == 2
    assert "text file not found" in capsys.readouterr().err
    assert main(["collect", "--model", str(tiny_dir / "llama"), "--text", str(text_file), "--out",
                 str(tmp_path / "d"), "--layers", "1,9"]) == 2
    assert "--layers must lie in [0, 5]" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "p")]) == 2
    assert "collect.json missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", "x", "--out", "y", "--lr", "-1"])
    assert "--lr must be > 0.0" in capsys.readouterr().err


def test_metrics_on_known_cases():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert r2([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    assert r2([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0


def test_fused_gate_trains_loads_and_decides_in_the_model_as_on_collected_data(pipeline, tiny_dir, tmp_path, capsys):
    """The V6.1 roadmap's signal fusion: a gate over the safety probe, the similarity, its trend and the
    position; its risk inside a forward equals its risk on the collected data the gate was fitted on."""
    from sedac_probes.calibrate import probe_risk
    from sedac_probes.collect import load_data
    from sedac_probes.decide import ProbeDecider, TorchProbeRule
    from sedac_probes.fusion import evaluate_fusion

    shard = load_file(str(pipeline / "data" / "shard-00000.safetensors"))
    assert shard["similarity"].shape == (4 * 63, 6) and shard["lens_top1.3"].dtype == torch.int32
    out = tmp_path / "fused"
    assert main(["train", "--data", str(pipeline / "data"), "--out", str(out), "--target", "fusion",
                 "--probes", str(pipeline / "safety")]) == 0
    meta = json.loads((out / "sedac_probes.json").read_text())
    assert meta["target"] == "fusion" and meta["fusion"]["features"] == ["probe_logit", "similarity", "trend",
                                                                         "log_position"]
    aurocs = meta["fusion"]["per_layer"]["3"]["heldout_auroc"]
    assert 0 <= aurocs["fused gate"] <= 1 and "similarity S_l" in aurocs and "logit-lens top-1 = previous " \
        "checkpoint's" in aurocs
    assert main(["train", "--data", str(pipeline / "data"), "--out", str(tmp_path / "x"), "--target", "fusion"]) == 2
    assert "--probes DIR" in capsys.readouterr().err
    fused = sedac_probes.load(out)
    assert fused.bank.target == "fusion" and fused.bank.gate_std.shape == (3, 4)
    # risk in a real forward (HF hooks) vs risk computed from the collected data
    data = load_data(pipeline / "data")
    rows = torch.arange(63)  # the first window
    offline = probe_risk(fused.bank, data, rows)
    model, _ = load_model(tiny_dir / "llama")
    layout = find_layout(model)
    class LastRisk(ProbeDecider):
        def step(self, layer, stream, state):
            state = super().step(layer, stream, state)
            self.last_risk = self.risk_matrix(state)
            return state

    decider = LastRisk(fused.bank, TorchProbeRule([1e-6] * 3, "threshold"), 6)
    windows = data["token_id"].view(12, 63)[:1]
    teacher_forced(layout, windows, decider, 1)
    online = decider.last_risk.numpy()[:63]  # teacher_forced drops the last position; the decider saw 63 rows
    np.testing.assert_allclose(online, offline, rtol=0, atol=2e-2)  # float16 hidden states in the data
    assert set(evaluate_fusion(out, pipeline / "data", pipeline / "entropy", log=lambda m: None)["3"]) >= {
        "fused gate", "entropy probe", "safety probe"}
    # calibration works on fused risk like on any probe's
    assert main(["calibrate", "--probes", str(out), "--data", str(pipeline / "data"), "--exit-rates",
                 "0.1,0.2,0.3"]) == 0
    assert sedac_probes.load(out).thresholds is not None
