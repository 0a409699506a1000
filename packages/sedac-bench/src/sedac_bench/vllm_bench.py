"""vLLM offline throughput, SEDAC configurations against vanilla, interleaved.

    python -m sedac_bench.vllm_bench SPEC.json OUT.json

SPEC: {"model": DIR, "groups": [{"name", "llm": {...}, "configs": [{"name", "env"}]}],
       "workloads": [{"name", "prompt_sets": [[[ids...]...] per round], "max_tokens", "batch"}],
       "rounds": R, "llm": {...}}

All engines of a group are alive side by side (each started with its configuration's environment;
the SEDAC plugin reads it when vLLM spawns the engine). Then, round after round, every workload runs
on every engine in turn, in a snake order (A B C, then C B A for the next workload or round), so slow
drift of the machine lands on every configuration alike. Every round feeds new prompts (the same
prompts to every engine within a round), so vLLM's prefix cache never serves a prompt it has seen.
Before a timed run on another engine than the last, the previous engine's worker is given time to
stop spinning (vLLM's workers busy-wait for about a second after their last step).

Progress lines go to stdout (one per timed run); vLLM's own logs go to stderr.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any, Dict, List

IDLE_S = 1.1  # vLLM's shared-memory readers spin for 1 s after their last read, then sleep


def _stats(path: str) -> Dict[str, Any]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _wait_stats(path: str, previous_steps: int, timeout: float = 3.0) -> Dict[str, Any]:
    deadline = time.time() + timeout
    s = _stats(path)
    while time.time() < deadline and s.get("steps", 0) <= previous_steps:
        time.sleep(0.05)
        s = _stats(path)
    return s


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def progress(msg: str) -> None:
    print(msg, flush=True)


def start_engines(spec: Dict[str, Any], group: Dict[str, Any], work: str) -> Dict[str, Any]:
    from vllm import LLM, SamplingParams, TokensPrompt

    base_env = dict(os.environ)
    engines = {}
    for cfg in group["configs"]:
        name = cfg["name"]
        metrics = os.path.join(work, f"vllm-metrics-{group['name']}-{len(engines)}.json")
        if os.path.exists(metrics):
            os.remove(metrics)
        os.environ.clear()
        os.environ.update(base_env)
        os.environ.update({"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                           "SEDAC_METRICS_FILE": metrics, "SEDAC_LOG_EVERY": "0", **cfg.get("env", {})})
        kwargs = dict(model=spec["model"], dtype="float32", max_model_len=2048, seed=0, max_num_seqs=128,
                      max_num_batched_tokens=4096)
        if _cuda():  # engines side by side share the GPU's memory
            kwargs["gpu_memory_utilization"] = 0.8 / len(group["configs"])
        kwargs.update(spec.get("llm", {}))
        kwargs.update(group.get("llm", {}))
        t0 = time.perf_counter()
        progress(f"[{group['name']}] starting engine: {name}")
        llm = LLM(**kwargs)
        warm = spec["workloads"][0]["prompt_sets"][0][:4]
        llm.generate([TokensPrompt(prompt_token_ids=list(reversed(p))) for p in warm],
                     SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
        engines[name] = {"llm": llm, "metrics": metrics, "startup_s": time.perf_counter() - t0}
        progress(f"[{group['name']}] {name}: engine up in {engines[name]['startup_s']:.0f} s")
    os.environ.clear()
    os.environ.update(base_env)
    return engines


def timed_run(engine: Dict[str, Any], prompts: List[List[int]], max_tokens: int, batch: int,
              switched: bool = True) -> Dict[str, Any]:
    from vllm import SamplingParams, TokensPrompt

    llm = engine["llm"]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    before = _wait_stats(engine["metrics"], -1, 0.3)
    if switched:  # another engine ran last: let its worker stop spinning
        time.sleep(IDLE_S)
    t = time.perf_counter()
    generated = 0
    for i in range(0, len(prompts), batch):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[i:i + batch]], params,
                            use_tqdm=False)
        generated += sum(len(o.outputs[0].token_ids) for o in outs)
    elapsed = time.perf_counter() - t
    after = _wait_stats(engine["metrics"], before.get("steps", 0)) if before or os.path.exists(engine["metrics"]) \
        else {}
    tokens = after.get("tokens", 0) - before.get("tokens", 0)
    skipped = after.get("skipped_mlp_blocks", 0.0) - before.get("skipped_mlp_blocks", 0.0)
    layers = after.get("num_layers") or 1
    return {"seconds": elapsed, "generated_tokens": generated, "sedac_tokens": tokens,
            "skipped_mlp_fraction": skipped / (tokens * layers) if tokens else 0.0}


def prompt_top1(engine: Dict[str, Any], prompts: List[List[int]]) -> List[List[int]]:
    """The engine's top-1 prediction at every prompt position (teacher-forced, from prompt logprobs)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    outs = engine["llm"].generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    top1 = []
    for o in outs:
        row = []
        for pos in (o.prompt_logprobs or [])[1:]:  # position 0 has no prediction
            row.append(next(t for t, lp in pos.items() if lp.rank == 1))
        top1.append(row)
    return top1


def top1_check(engines: Dict[str, Any], prompts: List[List[int]], names: List[str]) -> Dict[str, Any]:
    """Held-out top-1 risk of every engine against vanilla on the same prompts, and each engine's SEDAC
    statistics afterwards (online calibration state included)."""
    time.sleep(IDLE_S)
    ref = prompt_top1(engines["vanilla"], prompts)
    out: Dict[str, Any] = {}
    for name in names[1:]:
        time.sleep(IDLE_S)
        got = prompt_top1(engines[name], prompts)
        pairs = [(a, b) for ra, rb in zip(ref, got) for a, b in zip(ra, rb)]
        risk = sum(a != b for a, b in pairs) / max(1, len(pairs))
        stats = _wait_stats(engines[name]["metrics"], -1, 1.0)
        out[name] = {"measured_risk": risk, "positions": len(pairs), "online": stats.get("online"),
                     "skipped_mlp_fraction": stats.get("skipped_mlp_fraction")}
        progress(f"[top-1 check] {name}: held-out top-1 risk {risk:.2%} over {len(pairs)} positions")
    return out


def run_group(spec: Dict[str, Any], group: Dict[str, Any], work: str) -> Dict[str, Any]:
    engines = start_engines(spec, group, work)
    names = [c["name"] for c in group["configs"]]
    rounds = spec.get("rounds", 3)
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {n: {w["name"]: [] for w in spec["workloads"]} for n in names}
    total = rounds * len(spec["workloads"]) * len(names)
    done, last = 0, None
    for r in range(rounds):
        for j, w in enumerate(spec["workloads"]):
            # a snake: each workload's order reverses the previous one's, and every round reverses the last,
            # so every configuration takes each position equally often and consecutive runs share an engine
            order = names if (r + j) % 2 == 0 else list(reversed(names))
            prompts = w["prompt_sets"][r]
            for name in order:
                res = timed_run(engines[name], prompts, w["max_tokens"], w["batch"], switched=name != last)
                last = name
                res["round"] = r
                runs[name][w["name"]].append(res)
                done += 1
                progress(f"[{group['name']}] {done}/{total} round {r + 1}/{rounds} {w['name']}: {name} "
                         f"{res['seconds']:.2f} s, skipped MLP {res['skipped_mlp_fraction']:.1%}")
    out = {"configs": names, "rounds": rounds, "order": "snake: reversed for every workload and every round",
           "startup_s": {n: engines[n]["startup_s"] for n in names}, "runs": runs}
    check = group.get("top1_check")
    if check:
        out["top1_check"] = top1_check(engines, check["prompts"], names)
    for name in names:
        del engines[name]["llm"]
    engines.clear()
    gc.collect()
    return out


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    work = os.path.dirname(os.path.abspath(out_path))
    results: Dict[str, Any] = {}
    for group in spec["groups"]:
        results[group["name"]] = run_group(spec, group, work)
        json.dump(results, open(out_path, "w"), indent=1)
    json.dump(results, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
