"""The per-model runtime without an engine: adaptive thresholds, statistics file, trace."""

import json

import torch

from sedac_probes import LREProbe, ProbeBank, save
from sedac_vllm import SedacConfig
from sedac_vllm.runtime import VllmSedac

HF = {"hidden_size": 16, "num_hidden_layers": 4, "intermediate_size": 32, "vocab_size": 50}


def make_probes(tmp_path):
    torch.manual_seed(0)
    bank = ProbeBank.from_probes({1: LREProbe(16, 4), 2: LREProbe(16, 4)})
    save(tmp_path / "probes", bank, {"model": {**HF, "num_layers": 4}, "protect_last": 0, "thresholds": None,
                                     "exit_rates": None})
    return tmp_path / "probes"


def forward(sedac, rows=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    stream = torch.randn(rows, 16, generator=g)
    sedac.begin(stream, torch.arange(rows) + 1, torch.arange(rows))
    for layer in range(4):
        sedac.runtime.mlp(layer, stream, lambda x: x)
        sedac.after_layer(layer, stream + 0.1 * layer if sedac.wants_stream(layer) else None)


def test_adaptive_thresholds_move_after_the_warm_up_at_a_bounded_rate(tmp_path):
    cfg = SedacConfig.from_env({"SEDAC_ENABLED": "1", "SEDAC_PROBE_DIR": str(make_probes(tmp_path)),
                                "SEDAC_CALIBRATION_STEPS": "2", "SEDAC_ALPHA": "0.5",
                                "SEDAC_METRICS_FILE": str(tmp_path / "m.json"), "SEDAC_TRACE": str(tmp_path / "t")})
    sedac = VllmSedac(cfg, HF, 4, 16, torch.device("cpu"))
    assert cfg.adaptive  # uncalibrated probes: adaptive by default, starting from the seeds' thresholds
    start = sedac.decider.cascade.thresholds.clone()
    forward(sedac, seed=0)
    forward(sedac, seed=1)
    assert torch.equal(sedac.decider.cascade.thresholds, start)  # warm-up
    forward(sedac, seed=2)
    moved = sedac.decider.cascade.thresholds
    assert not torch.equal(moved, start)
    assert torch.equal(moved, torch.as_tensor(sedac.controller.thresholds))
    sedac.write_stats()
    stats = json.loads((tmp_path / "m.json").read_text())
    assert stats["mode"] == "probe" and stats["steps"] == 3 and stats["tokens"] == 3 * 32
    assert stats["thresholds"] == [float(t) for t in moved.tolist()]
    trace = [json.loads(line) for line in open(tmp_path / "t")]
    assert len(trace) == 3 and trace[0]["tok"] == list(range(32)) and len(trace[0]["first_skip"]) == 32


def test_calibrated_probes_are_fixed_by_default(tmp_path):
    d = make_probes(tmp_path)
    meta = json.loads((d / "sedac_probes.json").read_text())
    meta["thresholds"], meta["exit_rates"] = [0.5, 0.6], [0.1, 0.2]
    (d / "sedac_probes.json").write_text(json.dumps(meta))
    cfg = SedacConfig.from_env({"SEDAC_ENABLED": "1", "SEDAC_PROBE_DIR": str(d)})
    sedac = VllmSedac(cfg, HF, 4, 16, torch.device("cpu"))
    assert sedac.controller is None and sedac.decider.cascade.thresholds.tolist() == [0.5, 0.6000000238418579]
