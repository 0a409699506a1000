"""Runs the real vLLM engine for the e2e tests, one configuration after another, in one process.

    python vllm_runner.py SPEC.json OUT.json

SPEC: {"model": DIR, "prompts": [...], "max_tokens": N, "runs": [{"name", "env": {...},
       "llm": {LLM kwargs}, "phases": ["together", "separate", "repeat"]}]}
Each run sets its environment before creating `vllm.LLM` (the engine processes are spawned then
and read it), generates greedily, and records token ids, chosen-token logprobs, the SEDAC trace
(per-token decisions) per phase and the statistics file. An engine that fails to start records
the error text instead.
"""

import gc
import json
import os
import sys
import time
import traceback


def generate_together(llm, prompts, params):
    """All prompts in one batch from the first step on. ``llm.generate`` sends its requests to the engine
    process one by one, and that process may schedule a step before the last one arrives, so which prompts
    share the first forward would be a race; vLLM's own recipe is to pause scheduling while enqueueing."""
    llm.sleep(level=0)
    llm.enqueue(prompts, params, use_tqdm=False)
    llm.wake_up(tags=["scheduling"])
    return llm.wait_for_completion(use_tqdm=False)


def main(spec_path, out_path):
    spec = json.load(open(spec_path))
    base_env = dict(os.environ)
    results = {}
    work = os.path.dirname(os.path.abspath(out_path))
    for run in spec["runs"]:
        name = run["name"]
        trace = os.path.join(work, f"trace-{name}.jsonl")
        metrics = os.path.join(work, f"metrics-{name}.json")
        os.environ.clear()
        os.environ.update(base_env)
        os.environ.update({"VLLM_CPU_KVCACHE_SPACE": "1", "SEDAC_TRACE": trace, "SEDAC_METRICS_FILE": metrics,
                           **run.get("env", {})})
        for p in (trace, metrics):
            if os.path.exists(p):
                os.remove(p)
        from vllm import LLM, SamplingParams

        kwargs = dict(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                      max_num_seqs=64, enable_prefix_caching=False)
        kwargs.update(run.get("llm", {}))
        res = {}
        try:
            llm = LLM(**kwargs)
        except Exception as exc:  # noqa: BLE001 - the test inspects the message
            results[name] = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
            continue
        params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], logprobs=1, ignore_eos=True)
        prompts = spec["prompts"]
        for phase in run.get("phases", ["together"]):
            for path in [trace] + [f"{trace}.rank{r}" for r in range(1, 8)]:
                if os.path.exists(path):
                    os.remove(path)
            if phase == "together":
                outs = generate_together(llm, prompts, params)
            elif phase == "separate":
                outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
            elif phase == "repeat":  # the same prompts again: with prefix caching their prefixes are cached
                generate_together(llm, prompts, params)
                if os.path.exists(trace):
                    os.remove(trace)
                outs = generate_together(llm, prompts, params)
            else:
                raise ValueError(phase)
            rows = [json.loads(line) for line in open(trace)] if os.path.exists(trace) else []
            # tensor parallelism: ranks > 0 write their own trace (SEDAC_TRACE.rank<r>)
            rank_rows = {}
            for rank in range(1, 8):
                path = f"{trace}.rank{rank}"
                if os.path.exists(path):
                    rank_rows[rank] = [json.loads(line) for line in open(path)]
                    os.remove(path)
            res[phase] = {
                "prompt_ids": [list(o.prompt_token_ids) for o in outs],
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "logprobs": [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                             for o in outs],
                "trace": rows,
                "rank_traces": rank_rows,
            }
        time.sleep(0.6)  # the engine rewrites its statistics file at most every 0.2 s
        res["stats"] = json.load(open(metrics)) if os.path.exists(metrics) else None
        results[name] = res
        del llm
        gc.collect()
    json.dump(results, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
