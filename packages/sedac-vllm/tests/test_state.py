"""The per-model runtime without an engine: adaptive thresholds, statistics file, trace."""

import json

import pytest
import torch

from sedac_probes import LREProbe, ProbeBank, save
from sedac_vllm import (
    ConfigError,
    SedacConfig,
    ops,  # noqa: F401 - registers the custom ops
)
from sedac_vllm.state import VllmSedac

HF = {"hidden_size": 16, "num_hidden_layers": 4, "intermediate_size": 32, "vocab_size": 50}


def with_settings(folder, env, **serving):
    """``env`` plus a SEDAC_CONFIG file in ``folder`` whose "serving" object holds ``serving``."""
    path = folder / f"settings-{len(list(folder.glob('settings-*.json')))}.json"
    path.write_text(json.dumps({"serving": serving}))
    return {**env, "SEDAC_CONFIG": str(path)}


def make_probes(tmp_path, target="entropy", name="probes"):
    torch.manual_seed(0)
    bank = ProbeBank.from_probes({1: LREProbe(16, 4, target), 2: LREProbe(16, 4, target)})
    save(tmp_path / name, bank, {"model": {**HF, "num_layers": 4}, "protect_last": 0, "thresholds": None,
                                 "exit_rates": None})
    return tmp_path / name


class Identity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = torch.nn.Linear(16, 32, bias=False)  # only its shape is read (intermediate size)

    def forward(self, x):
        return x


def attach(sedac):
    """Identity "MLPs" routed through the runtime, as the vLLM model classes route theirs."""
    from sedac_monitor.api import make_skippable
    from sedac_vllm.models import _SedacMLP

    mlps = [Identity() for _ in range(4)]
    for i, m in enumerate(mlps):
        make_skippable(m, sedac.runtime, i, mixin=_SedacMLP)
        m._sedac_owner = sedac
        sedac.mlps[i] = m
    return mlps


def forward(sedac, mlps, rows=32, seed=0):
    """What the patched decoder layers do, without vLLM: begin, per layer the MLP (plan, then the masked
    or the gather path) -> step, finish."""
    g = torch.Generator().manual_seed(seed)
    stream = torch.randn(rows, 16, generator=g)
    positions = torch.arange(rows) + 1
    sedac.pending_input_ids = torch.arange(rows)
    sedac.begin(stream, positions)
    for layer in range(4):
        out = mlps[layer](stream)
        sedac.after_layer(layer, out, stream + 0.1 * layer, positions)


def test_adaptive_thresholds_move_after_the_warm_up_at_a_bounded_rate(tmp_path):
    cfg = SedacConfig.from_env(with_settings(tmp_path, {
        "SEDAC_ENABLED": "1", "SEDAC_PROBE_DIR": str(make_probes(tmp_path)),
        "SEDAC_METRICS_FILE": str(tmp_path / "m.json"), "SEDAC_TRACE": str(tmp_path / "t")},
        warmup_observations=2, alpha=0.5, exit_rates=[0.3, 0.5]))
    sedac = VllmSedac(cfg, HF, 4, 16, torch.device("cpu"))
    assert sedac.adaptive  # uncalibrated probes with exit rates: thresholds learned from the traffic
    start = sedac.decider.probe_rule.thresholds.clone()
    assert start.tolist() == [pytest.approx(1e-6)] * 2  # nothing exits during the warm-up
    mlps = attach(sedac)
    forward(sedac, mlps, seed=0)
    forward(sedac, mlps, seed=1)
    assert torch.equal(sedac.decider.probe_rule.thresholds, start)  # warm-up
    forward(sedac, mlps, seed=2)
    moved = sedac.decider.probe_rule.thresholds
    assert not torch.equal(moved, start)
    assert torch.equal(moved, torch.as_tensor(sedac.controller.thresholds))
    sedac.write_stats()
    stats = json.loads((tmp_path / "m.json").read_text())
    assert stats["mode"] == "probe" and stats["forwards"] == 3 and stats["tokens"] == 3 * 32
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
    assert sedac.controller is None and sedac.decider.probe_rule.thresholds.tolist() == [0.5, 0.6000000238418579]


def test_warm_up_forwards_are_not_counted(tmp_path):
    cfg = SedacConfig.from_env({"SEDAC_ENABLED": "1", "SEDAC_TAU": "0.5", "SEDAC_CONSECUTIVE_K": "1",
                                "SEDAC_TRACE": str(tmp_path / "t")})
    sedac = VllmSedac(cfg, HF, 4, 16, torch.device("cpu"))
    mlps = attach(sedac)
    sedac.warming_up = True
    forward(sedac, mlps, rows=64)
    assert sedac.runtime.forwards == 1 and sedac.stats()["tokens"] == 0 and not (tmp_path / "t").exists()
    sedac.warming_up = False
    forward(sedac, mlps, rows=8)
    assert sedac.runtime.forwards == 2 and sedac.stats()["tokens"] == 8 and sedac.stats()["forwards"] == 1


class FakeBase(torch.nn.Module):
    """Stands in for vLLM's *ForCausalLM: ``reach`` says whether its forward reaches SEDAC's ops."""

    reach = True

    def __init__(self, *, vllm_config=None, prefix=""):
        super().__init__()

    def forward(self, input_ids, positions, *args, **kwargs):
        if self.reach:
            self._sedac.runtime.end_forward(positions.shape[0], positions.device, count=False)
        return positions


def test_a_forward_that_never_reaches_the_ops_stops_with_a_clear_error(monkeypatch):
    from sedac_vllm import models

    monkeypatch.setattr(models, "_is_dummy_run", lambda: True)
    cls = models.sedac_class(FakeBase)
    model = torch.nn.Module.__new__(cls)
    torch.nn.Module.__init__(model)
    cfg = SedacConfig.from_env({"SEDAC_ENABLED": "1"})
    model._sedac = VllmSedac(cfg, HF, 4, 16, torch.device("cpu"))
    model._sedac.cost = False  # no MLP to time in this stand-in (a real model's is timed before its first forward)
    model.forward(None, torch.arange(3))  # reaches the ops: fine
    model.reach = False
    with pytest.raises(RuntimeError, match="never reached its ops.*compile cache"):
        model.forward(None, torch.arange(3))


def test_host_sync_policy_is_read_from_the_environment():
    cfg = SedacConfig.from_env({"SEDAC_ENABLED": "1", "SEDAC_HOST_SYNC": "forward"})
    assert VllmSedac(cfg, HF, 4, 16, torch.device("cpu")).runtime.host_sync == "forward"
    with pytest.raises(ConfigError, match="SEDAC_HOST_SYNC='sometimes' is not valid"):
        SedacConfig.from_env({"SEDAC_ENABLED": "1", "SEDAC_HOST_SYNC": "sometimes"})


@pytest.mark.parametrize("target", ["entropy", "safety"])
def test_uncalibrated_probes_are_refused_without_thresholds_or_exit_rates(tmp_path, target):
    d = make_probes(tmp_path, target)
    cfg = SedacConfig.from_env({"SEDAC_ENABLED": "1", "SEDAC_PROBE_DIR": str(d)})
    with pytest.raises(ConfigError, match=f"not calibrated, so SEDAC has no thresholds for their {target} risk"):
        VllmSedac(cfg, HF, 4, 16, torch.device("cpu"))
    # fixed thresholds: served as given, not adaptive
    probe_env = {"SEDAC_ENABLED": "1", "SEDAC_PROBE_DIR": str(d)}
    cfg = SedacConfig.from_env(with_settings(tmp_path, probe_env, thresholds=[0.3, 0.4]))
    sedac = VllmSedac(cfg, HF, 4, 16, torch.device("cpu"))
    assert sedac.controller is None and sedac.decider.probe_rule.thresholds.tolist() == pytest.approx([0.3, 0.4])
    # exit rates: adaptive, and no token exits before the thresholds are learned
    cfg = SedacConfig.from_env(with_settings(tmp_path, probe_env, exit_rates=[0.5, 0.5], warmup_observations=5))
    sedac = VllmSedac(cfg, HF, 4, 16, torch.device("cpu"))
    mlps = attach(sedac)
    for seed in range(3):
        forward(sedac, mlps, seed=seed)
    assert sedac.stats()["exited_fraction"] == 0.0 and sedac.controller is not None
    with pytest.raises(ConfigError, match="not calibrated"):
        VllmSedac(SedacConfig.from_env(with_settings(tmp_path, probe_env, adaptive=False, exit_rates=[0.5, 0.5])),
                  HF, 4, 16, torch.device("cpu"))


def test_probes_whose_calibration_failed_serve_without_exits(tmp_path, caplog):
    d = make_probes(tmp_path, "safety")
    meta = json.loads((d / "sedac_probes.json").read_text())
    meta.update(thresholds=[1e-6, 1e-6], exit_rates=[0.0, 0.0], status="no setting met the risk budget",
                exits_disabled=True)
    (d / "sedac_probes.json").write_text(json.dumps(meta))
    cfg = SedacConfig.from_env({"SEDAC_ENABLED": "1", "SEDAC_PROBE_DIR": str(d)})
    sedac = VllmSedac(cfg, HF, 4, 16, torch.device("cpu"))
    assert "failed their calibration" in caplog.text and not sedac.decider.exits
    sedac.begin(torch.zeros(2, 16), torch.arange(2))
    assert sedac.plan(3) == (None, None) and sedac.stream_layers == set()


@pytest.mark.parametrize("scope", ["cascade", "per_layer"])
def test_masked_and_gather_paths_give_the_same_outputs_and_statistics(tmp_path, scope):
    """Which path a layer with skipped rows takes (SEDAC_GATHER) changes the cost, never the result: same
    MLP outputs (kept rows computed, skipped rows zero), same per-row results and statistics."""
    got = {}
    for gather in ("never", "always"):
        cfg = SedacConfig.from_env({"SEDAC_ENABLED": "1", "SEDAC_TAU": "0.6", "SEDAC_CONSECUTIVE_K": "1",
                                    "SEDAC_MIN_LAYER": "0", "SEDAC_SCOPE": scope, "SEDAC_GATHER": gather,
                                    "SEDAC_TRACE": str(tmp_path / f"trace-{scope}-{gather}")})
        sedac = VllmSedac(cfg, HF, 4, 16, torch.device("cpu"))
        mlps = attach(sedac)
        outs = []
        for m in mlps:
            m.register_forward_hook(lambda mod, args, out, outs=outs: outs.append(out.clone()))
        forward(sedac, mlps, rows=64, seed=3)
        got[gather] = (outs, sedac.stats(), open(tmp_path / f"trace-{scope}-{gather}").read())
    (never_outs, never_stats, never_trace), (always_outs, always_stats, always_trace) = got["never"], got["always"]
    assert len(never_outs) == len(always_outs) == 4
    for a, b in zip(never_outs, always_outs):
        assert torch.equal(a, b)
    assert never_trace == always_trace
    assert 0 < never_stats["skipped_mlp_fraction"] < 1
    for key in ("tokens", "skipped_mlp_fraction", "per_layer_skip_rate", "exit_layer_histogram"):
        assert never_stats[key] == always_stats[key], key
    assert never_stats["gathers"] == 0 and always_stats["gathers"] > 0


def test_a_probe_directory_is_read_once_per_process(tmp_path, monkeypatch):
    """Start-up validates the probe directory (configuration) and builds the decider from it (model): each of
    its two files is read from disk once; a rewritten file is read again."""
    import safetensors.torch

    from sedac_probes import io

    d = make_probes(tmp_path, name="once")
    reads = {"weights": 0, "meta": 0}
    load_file, read_meta = safetensors.torch.load_file, io._read_meta_file

    def count_weights(*a, **k):
        reads["weights"] += 1
        return load_file(*a, **k)

    def count_meta(*a, **k):
        reads["meta"] += 1
        return read_meta(*a, **k)

    monkeypatch.setattr(safetensors.torch, "load_file", count_weights)
    monkeypatch.setattr(io, "_read_meta_file", count_meta)
    env = with_settings(tmp_path, {"SEDAC_ENABLED": "1", "SEDAC_PROBE_DIR": str(d)}, thresholds=[0.3, 0.4])
    cfg = SedacConfig.from_env(env)
    VllmSedac(cfg, HF, 4, 16, torch.device("cpu"))
    VllmSedac(SedacConfig.from_env(env), HF, 4, 16, torch.device("cpu"))
    assert reads == {"weights": 1, "meta": 1}
    io.update_meta(d, note="rewritten")  # a changed file is read anew
    VllmSedac(SedacConfig.from_env(env), HF, 4, 16, torch.device("cpu"))
    assert reads["meta"] == 2 and reads["weights"] == 1


def test_exits_turn_off_and_on_again_without_another_graph(tmp_path):
    cfg = SedacConfig.from_env({"SEDAC_ENABLED": "1", "SEDAC_TAU": "0.5", "SEDAC_CONSECUTIVE_K": "1",
                                "SEDAC_PROTECT_FIRST": "0", "SEDAC_PROTECT_LAST": "0", "SEDAC_MIN_LAYER": "0"})
    sedac = VllmSedac(cfg, HF, 4, 16, torch.device("cpu"))
    mlps = attach(sedac)
    tau = sedac.decider.tau_t  # the tensor the compiled graph reads
    forward(sedac, mlps, rows=8)
    assert sedac.stats()["skipped_mlp_blocks"] > 0  # similar consecutive streams: tau 0.5 lets rows exit
    sedac.set_exits(False)
    assert sedac.decider.tau_t is tau and float(tau) > 1.0  # out of reach of any similarity, the same tensor
    before = sedac.stats()["skipped_mlp_blocks"]
    forward(sedac, mlps, rows=8, seed=1)
    assert sedac.stats()["skipped_mlp_blocks"] == before
    sedac.set_exits(True)
    assert float(tau) == sedac.decider.tau == 0.5
    forward(sedac, mlps, rows=8, seed=2)
    assert sedac.stats()["skipped_mlp_blocks"] > before


def test_exits_cannot_be_turned_off_where_the_threshold_is_not_ours_to_move(tmp_path):
    online = VllmSedac(SedacConfig.from_env({"SEDAC_ENABLED": "1", "SEDAC_ONLINE": "1"}), HF, 4, 16,
                       torch.device("cpu"))
    with pytest.raises(ValueError, match="online calibration"):
        online.set_exits(False)
    d = make_probes(tmp_path)
    meta = json.loads((d / "sedac_probes.json").read_text())
    meta["thresholds"] = [0.5, 0.6]
    (d / "sedac_probes.json").write_text(json.dumps(meta))
    probes = VllmSedac(SedacConfig.from_env({"SEDAC_ENABLED": "1", "SEDAC_PROBE_DIR": str(d)}), HF, 4, 16,
                       torch.device("cpu"))
    with pytest.raises(ValueError, match="V7 monitor"):
        probes.set_exits(False)


def test_the_monitor_forms_the_stream_only_where_a_plan_reads_it(tmp_path):
    env = {"SEDAC_ENABLED": "1", "SEDAC_TAU": "0.5", "SEDAC_CONSECUTIVE_K": "1", "SEDAC_MIN_LAYER": "1",
           "SEDAC_PROTECT_LAST": "1"}
    sedac = VllmSedac(SedacConfig.from_env(env), HF, 4, 16, torch.device("cpu"))
    # the one plan, at layer 2, reads S_1: the streams after layers 0 and 1
    assert [sedac.wants_stream(i) for i in range(4)] == [True, True, False, False]
    logged = VllmSedac(SedacConfig.from_env({**env, "SEDAC_DECISION_LOG": str(tmp_path / "d.jsonl")}), HF, 4, 16,
                       torch.device("cpu"))
    assert all(logged.wants_stream(i) for i in range(4))  # the decision log keeps every layer's signal
