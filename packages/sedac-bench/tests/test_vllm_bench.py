"""The interleaving of sedac_bench.vllm_bench, with stand-in engines (no vLLM): lockstep order, what is
summed, and that no engine ever takes two forwards in a row."""

import os
from typing import Any, Dict, List

import pytest

from sedac_bench.vllm_bench import ENGINE_ENV, lockstep_run


class FakeEngine:
    """Answers the engine protocol; every forward takes ``forward_s`` and a run of ``n`` prompts needs
    ``forwards`` forwards."""

    def __init__(self, name: str, log: List[str], forward_s: float, forwards: int, skipped: float = 0.0) -> None:
        self.name, self.log, self.forward_s, self.forwards, self.skipped = name, log, forward_s, forwards, skipped
        self.left = 0

    def ask(self, cmd: Dict[str, Any]) -> Dict[str, Any]:
        op = cmd["op"]
        self.log.append(f"{op}:{self.name}")
        if op == "begin":
            return {}
        if op == "add":
            self.left = self.forwards
            return {"seconds": 0.001 * len(cmd["prompts"])}
        if op == "forward":
            assert self.left > 0, f"{self.name} ran a forward after it was done"
            self.left -= 1
            return {"seconds": self.forward_s, "more": self.left > 0, "generated": 0 if self.left else 2}
        if op == "end":
            return {"sedac_tokens": 10, "skipped_mlp_fraction": self.skipped}
        raise AssertionError(op)

    def stop(self) -> None:
        self.log.append(f"stop:{self.name}")


def _engines(log, forwards=3):
    return {"vanilla": FakeEngine("vanilla", log, 0.010, forwards),
            "sedac": FakeEngine("sedac", log, 0.012, forwards, skipped=0.5),
            "other": FakeEngine("other", log, 0.020, forwards)}


def test_lockstep_sums_each_engines_own_calls():
    log: List[str] = []
    engines = _engines(log)
    prompts = [[1, 2, 3]] * 4
    res = lockstep_run(engines, ["vanilla", "sedac", "other"], prompts, max_tokens=3, batch=2)
    # two batches of 2 prompts, 3 forwards each; adding 2 prompts takes 2 ms
    assert res["vanilla"]["seconds"] == pytest.approx(2 * (0.002 + 3 * 0.010))
    assert res["sedac"]["seconds"] == pytest.approx(2 * (0.002 + 3 * 0.012))
    assert res["other"]["forwards"] == 6
    assert res["sedac"]["forward_seconds"] == pytest.approx([0.012] * 6)
    assert res["sedac"]["generated_tokens"] == 4
    assert res["sedac"]["skipped_mlp_fraction"] == 0.5 and res["vanilla"]["skipped_mlp_fraction"] == 0.0


def test_lockstep_runs_in_a_fixed_cycle_and_never_twice_in_a_row():
    log: List[str] = []
    lockstep_run(_engines(log, forwards=4), ["sedac", "other", "vanilla"], [[1]] * 3, max_tokens=4, batch=3)
    forwards = [e.split(":")[1] for e in log if e.startswith("forward:")]
    assert forwards == ["sedac", "other", "vanilla"] * 4
    assert all(a != b for a, b in zip(forwards, forwards[1:]))
    # every engine adds the same batch before anyone forwards, and begin/end bracket the run
    assert log[:3] == ["begin:sedac", "begin:other", "begin:vanilla"]
    assert log[3:6] == ["add:sedac", "add:other", "add:vanilla"]
    assert log[-3:] == ["end:sedac", "end:other", "end:vanilla"]


class TwinEngine(FakeEngine):
    """A FakeEngine whose exits can be turned off (``exits``): slower then, and every forward logs the state."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.exits = True

    def ask(self, cmd: Dict[str, Any]) -> Dict[str, Any]:
        if cmd["op"] == "exits":
            self.log.append(f"exits {'on' if cmd['on'] else 'off'}:{self.name}")
            self.exits = bool(cmd["on"])
            return {}
        if cmd["op"] == "add":
            self.log.append(f"prompts {len(cmd['prompts'])}:{self.name}")
        if cmd["op"] == "forward":
            self.forward_s = 0.012 if self.exits else 0.013
            self.log.append(f"forward exits {'on' if self.exits else 'off'}:{self.name}")
        return super().ask(cmd)


def test_a_twin_row_is_the_same_engine_with_exits_off_against_vanillas_same_process(monkeypatch):
    from sedac_bench import vllm_bench

    log: List[str] = []
    engines = {"vanilla": FakeEngine("vanilla", log, 0.010, 2), "sedac": TwinEngine("sedac", log, 0.012, 2),
               "other": FakeEngine("other", log, 0.020, 2)}
    for e in engines.values():
        e.startup_s, e.malloc, e.huge_pages_mib = 1.0, "", None
    monkeypatch.setattr(vllm_bench, "start_engines", lambda *a, **k: engines)
    workloads = [{"name": f"w{j}", "max_tokens": 2, "batch": 4, "prompt_sets": [[[1]] * 4, [[2]] * 4],
                  "twin_prompt_sets": [[[3]] * 2, [[4]] * 2]} for j in range(2)]
    group = {"name": "compiled", "configs": [{"name": "vanilla"}, {"name": "sedac", "twin": "sedac, exits off"},
                                             {"name": "other"}]}
    out = vllm_bench.run_group({"rounds": 2, "restart": False, "workloads": workloads}, group, "/nonexistent")
    assert out["configs"] == ["vanilla", "sedac", "sedac, exits off", "other"]
    assert out["twins"] == {"sedac, exits off": "sedac"}
    twin = out["runs"]["sedac, exits off"]["w0"]
    assert len(twin) == 2 and [r["round"] for r in twin] == [0, 1]
    # one batch of 2 twin prompts, 2 forwards: the engine with exits off, vanilla beside it in the same pass
    assert twin[0]["seconds"] == pytest.approx(0.002 + 2 * 0.013)
    assert twin[0]["vanilla_seconds"] == pytest.approx(0.002 + 2 * 0.010)
    assert twin[0]["vanilla_forward_seconds"] == pytest.approx([0.010] * 2)
    assert out["runs"]["sedac"]["w0"][0]["seconds"] == pytest.approx(0.004 + 2 * 0.012)
    # exits are off exactly for the twin passes, which only vanilla and the twin's engine run, on the twin prompts
    state, passes = "on", []
    for entry in log:
        what, name = entry.split(":")
        if what.startswith("exits "):
            state = what.split()[1]
            passes.append([])
        elif what.startswith("prompts ") and name == "sedac":
            assert (what == "prompts 2") == (state == "off")
        elif what.startswith("forward exits"):
            assert what.endswith(state)
        if state == "off" and what == "forward":
            passes[-1].append(name)
    assert state == "on" and len(passes) == 8 and all(set(p) == {"vanilla", "sedac"} for p in passes[::2])
    # which pass goes first alternates with workload and round
    firsts = []
    for entry in log:
        if entry.startswith("exits off") or entry.startswith("prompts 4:sedac"):
            firsts.append("twin" if entry.startswith("exits") else "main")
    assert firsts == ["main", "twin", "twin", "main", "twin", "main", "main", "twin"]


def test_engines_run_vllm_in_process_and_set_no_malloc_variables():
    assert ENGINE_ENV["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    # MALLOC_* set after a process started do nothing, and would make sedac-vllm leave malloc alone
    assert not any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in ENGINE_ENV)


def test_engines_start_with_huge_page_tunables_unless_the_user_chose_malloc_settings():
    from sedac_bench.vllm_bench import HUGE_PAGE_TUNABLES, engine_malloc_env

    assert engine_malloc_env({}) == {"GLIBC_TUNABLES": HUGE_PAGE_TUNABLES}
    assert "glibc.malloc.hugetlb=1" in HUGE_PAGE_TUNABLES and "glibc.malloc.mmap_max=0" in HUGE_PAGE_TUNABLES
    for user in ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {"MALLOC_MMAP_MAX_": "1"},
                 {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}):
        assert engine_malloc_env(user) == {}


def test_an_engine_process_starts_with_the_tunables_and_the_coordinator_keeps_its_environment(monkeypatch):
    import sedac_bench.vllm_bench as vb

    seen = {}

    class FakeProcess:
        def __init__(self, **kwargs):
            pass

        def start(self):
            seen["tunables"] = os.environ.get("GLIBC_TUNABLES")

    class FakeConn:
        def recv(self):
            return {"startup_s": 1.0, "malloc": "m", "huge_pages_mib": 12.0}

        def close(self):
            pass

    class FakeCtx:
        def Pipe(self):
            return FakeConn(), FakeConn()

        def Process(self, **kwargs):
            return FakeProcess(**kwargs)

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    from sedac_vllm.allocator import USER_CHOICE

    for k in (*USER_CHOICE, "LD_PRELOAD"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(vb.multiprocessing, "get_context", lambda method: FakeCtx())
    engine = vb.Engine("x", {}, {}, [])
    assert seen["tunables"] == vb.HUGE_PAGE_TUNABLES
    assert "GLIBC_TUNABLES" not in os.environ
    assert engine.huge_pages_mib == 12.0


def test_warm_up_fills_a_forward_and_the_largest_batch_with_prompts_no_timed_run_shares():
    from sedac_bench.vllm_bench import warm_up_batches

    decode = [[[1, 2, 3, 4]] * 4]
    prefill = [[list(range(100, 228))] * 2]  # one round: two prompts of 128 tokens
    spec = {"workloads": [{"batch": 4, "prompt_sets": decode}, {"batch": 16, "prompt_sets": prefill}]}
    long, wide = warm_up_batches(spec, budget=1000)
    assert len(long) == 8 and all(len(p) == 128 for p in long)  # 8 x 128 >= 1000 tokens: one full forward
    assert len(wide) == 16 and all(len(p) == 16 for p in wide)  # the largest batch
    timed = {tuple(p[:16]) for w in spec["workloads"] for p in w["prompt_sets"][0]}
    assert not any(tuple(p[:16]) in timed for p in long + wide)


def test_warm_up_without_prompt_tokens_is_a_clear_error():
    from sedac_bench.vllm_bench import warm_up_batches

    with pytest.raises(ValueError, match="no prompt tokens"):
        warm_up_batches({"workloads": [{"batch": 1, "prompt_sets": [[]]}]})


class Top1Engine:
    """Answers ``top1``: vanilla predicts each prompt's tokens; the other flips the first position of every
    prompt and reports online statistics that grow with each call."""

    def __init__(self, flips: bool) -> None:
        self.flips, self.calls = flips, 0

    def ask(self, cmd):
        assert cmd["op"] == "top1"
        self.calls += 1
        top1 = [list(p) for p in cmd["prompts"]]
        if self.flips:
            for row in top1:
                row[0] += 1
        n = sum(len(p) for p in cmd["prompts"]) * self.calls
        online = {"totals": {"rows": n, "exited_rows": n // 10, "checked_rows": n // 20, "changed_rows": n // 200},
                  "errors_per_exit": 0.5, "risk_estimate": 0.01, "tau": 0.99, "drift_kl": 0.02, "fallback": False,
                  "fallbacks": 0}
        return {"top1": top1, "stats": {"tokens": n, "skipped_mlp_blocks": n * 3, "num_layers": 30,
                                        "skipped_mlp_fraction": 0.1, "online": online}}


def test_top1_windows_measure_against_vanilla_and_difference_the_online_totals():
    from sedac_bench.report import online_windows_lines
    from sedac_bench.vllm_bench import top1_check
    from sedac_bench.vllm_compare import ONLINE

    engines = {"vanilla": Top1Engine(False), ONLINE: Top1Engine(True)}
    prompts = [list(range(10)), list(range(10, 20))]
    windows = [{"label": "news 1", "prompts": prompts}, {"label": "random tokens 1", "prompts": prompts[:1]}]
    out = top1_check(engines, prompts, ["vanilla", ONLINE], windows)[ONLINE]
    assert out["measured_risk"] == pytest.approx(2 / 20)
    w1, w2 = out["windows"]
    assert (w1["label"], w1["positions"], w1["measured_risk"]) == ("news 1", 20, pytest.approx(0.1))
    # second call's totals minus the first's: 20 rows, 2 exited, 1 checked, 0 changed
    assert w1["exited_fraction"] == pytest.approx(0.1) and w1["first_order"] == 0.0
    assert w1["estimate"] == pytest.approx(0.1 * 0.5)  # exits x errors per exit beats the shadow check's 0
    assert w1["skipped_mlp_fraction"] == pytest.approx(3 / 30)
    assert w2["positions"] == 10 and w2["measured_risk"] == pytest.approx(0.1)
    text = "\n".join(online_windows_lines({ONLINE: out}))
    assert "| news 1 | 20 | 10.00% | 5.00% | -5.00% | 0.00% (1) | 10.00% |" in text
    assert "Drift fallbacks began in: no window." in text


def test_traffic_windows_are_distinct_and_in_serving_order():
    import os
    from pathlib import Path

    from transformers import AutoTokenizer

    from sedac_bench import assets
    from sedac_bench.vllm_compare import traffic_windows

    root = Path(os.environ.get("SEDAC_ASSETS") or "")
    assert (root / "text").is_dir(), "SEDAC_ASSETS is not set to built assets: run the suite through `nox -s tests`"
    tok = AutoTokenizer.from_pretrained(root / assets.LLAMA)
    windows = traffic_windows(tok, {k: root / v for k, v in assets.TEXTS.items()}, 2, length=64, each=1)
    assert [w["label"] for w in windows] == ["news 1", "Python docs 1", "shuffled news 1", "random tokens 1",
                                             "news again 1"]
    assert all(len(w["prompts"]) == 2 and all(len(p) == 64 for p in w["prompts"]) for w in windows)
    news, shuffled = windows[0]["prompts"], windows[2]["prompts"]
    assert [sorted(p) for p in news] == [sorted(p) for p in shuffled] and news != shuffled
    assert windows[4]["prompts"] != news


def test_the_full_size_times_no_exits_as_the_calibrated_engines_twin_on_its_own_prompts(tmp_path):
    from sedac_bench.run import SIZES
    from sedac_bench.vllm_compare import CALIBRATED, NO_EXITS, VllmStages

    stages = VllmStages()
    stages.out, stages.results = tmp_path, {}
    stages.size = SIZES["full"]
    configs = {c["name"]: c for c in stages.vllm_configs()}
    assert NO_EXITS not in configs and configs[CALIBRATED]["twin"] == NO_EXITS  # no engine of its own
    stages.size = {**SIZES["full"], "vllm": {**SIZES["full"]["vllm"],
                                             "configs": tuple(c for c in SIZES["full"]["vllm"]["configs"]
                                                              if c != NO_EXITS)}}
    assert "twin" not in {c["name"]: c for c in stages.vllm_configs()}[CALIBRATED]


def test_rows_of_a_twin_are_against_vanilla_in_the_twin_pass(monkeypatch):
    import sedac_bench.vllm_compare as vc

    stages = vc.VllmStages()
    stages.shape, stages.L, stages.log = None, 30, lambda msg: None
    monkeypatch.setattr(vc, "compute_summary", lambda *a, **k: {"ideal_speedup": 1.0})
    run = {"skipped_mlp_fraction": 0.0}
    fwd = {"forward_seconds": [0.5, 0.5]}
    raw = {"configs": ["vanilla", vc.CALIBRATED, vc.NO_EXITS], "twins": {vc.NO_EXITS: vc.CALIBRATED},
           "runs": {"vanilla": {"w": [{**run, **fwd, "seconds": 1.0}, {**run, **fwd, "seconds": 2.0}]},
                    vc.CALIBRATED: {"w": [{**run, **fwd, "seconds": 1.0}, {**run, **fwd, "seconds": 2.0}]},
                    vc.NO_EXITS: {"w": [{**run, "seconds": 1.1, "vanilla_seconds": 1.2, "forward_seconds": [0.5, 0.5],
                                         "vanilla_forward_seconds": [0.6, 0.6]},
                                        {**run, "seconds": 2.2, "vanilla_seconds": 2.4, "forward_seconds": [1.0, 1.0],
                                         "vanilla_forward_seconds": [1.1, 1.1]}]}}}
    rows = stages._vllm_rows(raw, [{"name": "w", "kind": "decode", "batch": 1, "context": 40}], "llama", "compiled")
    by = {r["config"]: r for r in rows}
    assert by[vc.CALIBRATED]["speedup"] == pytest.approx(1.0) and by[vc.CALIBRATED]["vanilla_s"] == 1.5
    assert by[vc.NO_EXITS]["speedup"] == pytest.approx(1.2 / 1.1) and by[vc.NO_EXITS]["vanilla_s"] == pytest.approx(1.8)
    # forward by forward against the twin pass's vanilla too: ratios 1.2, 1.2 | 1.1, 1.1
    assert by[vc.CALIBRATED]["forward_speedup"] == pytest.approx(1.0)
    assert by[vc.NO_EXITS]["forward_speedup"] == pytest.approx(1.15)
    assert (by[vc.NO_EXITS]["forward_speedup_min"], by[vc.NO_EXITS]["forward_speedup_max"]) == pytest.approx((1.1, 1.2))
