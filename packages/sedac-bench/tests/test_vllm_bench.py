"""The interleaving of sedac_bench.vllm_bench, with stand-in engines (no vLLM): lockstep order, what is
summed, and that no engine ever takes two forwards in a row."""

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


def test_engines_run_vllm_in_process_and_set_no_malloc_variables():
    assert ENGINE_ENV["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    # MALLOC_* set after a process started do nothing, and would make sedac-vllm leave malloc alone
    assert not any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in ENGINE_ENV)


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
