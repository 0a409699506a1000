"""vLLM offline throughput, SEDAC off vs on, measured in one process per configuration.

    python -m sedac_bench.vllm_bench SPEC.json OUT.json

SPEC: {"model": DIR, "configs": [{"name", "env"}], "workloads": [{"name", "prompts": [[ids...]...],
       "max_tokens", "batch"}], "repeats": 2, "llm": {...}}

Each configuration starts the engine once (its environment set first), warms up, then runs every
workload ``repeats`` times, each time feeding the prompts ``batch`` at a time, and keeps the
fastest run. SEDAC's statistics file is read before and after each workload, so every
workload reports the MLP work skipped in it.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any, Dict


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
        time.sleep(0.1)
        s = _stats(path)
    return s


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    base_env = dict(os.environ)
    results: Dict[str, Any] = {}
    work = os.path.dirname(os.path.abspath(out_path))
    for cfg in spec["configs"]:
        name = cfg["name"]
        metrics = os.path.join(work, f"vllm-metrics-{name}.json")
        if os.path.exists(metrics):
            os.remove(metrics)
        os.environ.clear()
        os.environ.update(base_env)
        os.environ.update({"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
                           "SEDAC_METRICS_FILE": metrics, "SEDAC_LOG_EVERY": "0", **cfg.get("env", {})})
        from vllm import LLM, SamplingParams, TokensPrompt

        kwargs = dict(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
                      max_num_seqs=128, max_num_batched_tokens=4096, enable_prefix_caching=False)
        kwargs.update(spec.get("llm", {}))
        t0 = time.perf_counter()
        llm = LLM(**kwargs)
        res: Dict[str, Any] = {"startup_s": time.perf_counter() - t0, "workloads": {}}
        warm = spec["workloads"][0]["prompts"][:4]
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in warm], SamplingParams(max_tokens=4, temperature=0),
                     use_tqdm=False)
        for w in spec["workloads"]:
            params = SamplingParams(temperature=0, max_tokens=w["max_tokens"], ignore_eos=True)
            prompts = [TokensPrompt(prompt_token_ids=p) for p in w["prompts"]]
            best, best_stats = None, None
            for _ in range(spec.get("repeats", 2)):
                before = _wait_stats(metrics, -1, 0.6)
                t = time.perf_counter()
                generated = 0
                for i in range(0, len(prompts), w["batch"]):
                    outs = llm.generate(prompts[i:i + w["batch"]], params, use_tqdm=False)
                    generated += sum(len(o.outputs[0].token_ids) for o in outs)
                elapsed = time.perf_counter() - t
                after = _wait_stats(metrics, before.get("steps", 0))
                if best is None or elapsed < best:
                    best = elapsed
                    tokens = after.get("tokens", 0) - before.get("tokens", 0)
                    skipped = after.get("skipped_mlp_blocks", 0.0) - before.get("skipped_mlp_blocks", 0.0)
                    layers = after.get("num_layers") or 1
                    best_stats = {"sedac_tokens": tokens,
                                  "skipped_mlp_fraction": skipped / (tokens * layers) if tokens else 0.0,
                                  "generated_tokens": generated}
            prompt_tokens = sum(len(p) for p in w["prompts"])
            res["workloads"][w["name"]] = {
                "seconds": best, "prompts": len(prompts), "batch": w["batch"], "prompt_tokens": prompt_tokens,
                "max_tokens": w["max_tokens"], "tokens_per_s": (prompt_tokens + best_stats["generated_tokens"]) / best,
                "requests_per_s": len(prompts) / best, **best_stats}
        results[name] = res
        del llm
        gc.collect()
        json.dump(results, open(out_path, "w"), indent=1)
    json.dump(results, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
