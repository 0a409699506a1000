"""The real SmolLM2-135M: train on Wikipedia text, evaluate and calibrate on held-out news text.

Needs the assets `nox -s tests` builds (SEDAC_ASSETS); a missing asset fails, it is never skipped.
The figures are printed (run with -s, or read the nox log).
"""

import json

import pytest
import torch

from sedac_probes.cli import main

pytestmark = pytest.mark.slow  # minutes on 2 cores; the quick loop deselects it


@pytest.fixture(scope="module")
def real(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    model = str(assets / "models" / "smollm2-135m-llama")
    for name, text, samples in (("wiki", "enwiki.txt", 16), ("news", "lee_news.txt", 8)):
        assert main(["collect", "--model", model, "--text", str(assets / "text" / text), "--out",
                     str(root / name), "--layers", "7,14,21", "--samples", str(samples), "--max-length", "512"]) == 0
    for target in ("entropy", "safety"):
        assert main(["train", "--data", str(root / "wiki"), "--out", str(root / target), "--target", target]) == 0
    return root, model


def test_probes_generalise_to_held_out_text(real, capsys):
    root, model = real
    from sedac_probes.evaluate import evaluate

    report = {}
    for target in ("entropy", "safety"):
        metrics = evaluate(root / target, root / "news", log=lambda m: None)
        assert main(["calibrate", "--probes", str(root / target), "--data", str(root / "news"),
                     "--max-risk", "0.05"]) == 0
        cal = json.loads((root / target / "sedac_probes.json").read_text())["calibration"]
        report[target] = {"heldout": metrics, "at_max_risk_0.05": cal["v6_0"]}
        assert cal["v6_0"]["disagreement"] <= 0.05
    from sedac_probes.bench import bench

    cost = bench(model, root / "safety", tokens=2048)
    report["cost"] = {k: cost[k] for k in ("probe_vs_layer", "bank_vs_layer", "probe_ms", "layer_ms", "tokens")}
    capsys.readouterr()
    with capsys.disabled():
        print("\nSmolLM2-135M probes, trained on enwiki, evaluated on lee_news:\n" + json.dumps(report, indent=1))
    # trained probes carry signal on text they never saw
    assert report["safety"]["heldout"]["21"]["auroc_unsafe"] > 0.6
    assert report["entropy"]["heldout"]["21"]["spearman"] > 0.3
    assert 0 < cost["probe_vs_layer"] < 0.05
    assert torch.get_num_threads() >= 1
