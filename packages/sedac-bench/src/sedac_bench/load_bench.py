"""``sedac-bench load``: `sedac-vllm serve` (compiled, the calibrated V7 config) on the bundled SmolLM2 under
a load of concurrent completions mixed with malformed requests, then SIGTERM under load.

Reported (``load.md`` / ``load.json``): requests by kind and outcome (answered, 4xx, 5xx, lost), latency
P50 / P99 of the good requests, whether /metrics' counters add up to the requests served (vLLM's request and
token counters, and SEDAC's tokens against them), how many of a sample of outputs equal the same request
served alone (greedy), and, with SIGTERM sent while requests are in flight, how many were answered, got an
error or were lost, and how long the server took to stop.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from . import assets as assets_mod

Log = Callable[[str], None]
CONTEXT = 1024


def prompts(root: Path, n: int) -> List[str]:
    """``n`` distinct prompts of 40–400 characters cut from the held-out texts (news, Python docs)."""
    from sedac_monitor.api import read_text

    text = " ".join(read_text(root / assets_mod.TEXTS[k]) for k in ("lee_news", "pydoc_topics")).split()
    out: List[str] = []
    i = 0
    while len(out) < n:
        words = 8 + (len(out) * 37) % 60  # varied lengths, deterministic
        if i + words > len(text):
            i = len(out) % 97  # wrap with another offset: still distinct
        out.append(" ".join(text[i:i + words]))
        i += words
    if len(set(out)) < n:
        raise ValueError(f"the held-out texts give {len(set(out))} distinct prompts, fewer than {n}")
    return out


def _counters_add_up(before: Dict[str, float], after: Dict[str, float], good: List[Any]) -> Dict[str, Any]:
    d = {k: v - before.get(k, 0.0) for k, v in after.items()}
    usage = [r.json()["usage"] for r in good]
    forwarded = (d.get("vllm:prompt_tokens_total", 0) - d.get("vllm:prompt_tokens_cached_total", 0)
                 + d.get("vllm:generation_tokens_total", 0) - len(good))
    checks = {
        "vllm requests succeeded = good requests answered": (d.get("vllm:request_success_total"), len(good)),
        "vllm prompt tokens = the replies' prompt tokens": (d.get("vllm:prompt_tokens_total"),
                                                            sum(u["prompt_tokens"] for u in usage)),
        "vllm generated tokens = the replies' completion tokens": (d.get("vllm:generation_tokens_total"),
                                                                   sum(u["completion_tokens"] for u in usage)),
        "SEDAC tokens = tokens forwarded (prompt uncached + generated - one per request)":
            (d.get("sedac_tokens_total"), forwarded),
    }
    return {k: {"metrics": a, "expected": b, "pass": a == b} for k, (a, b) in checks.items()}


def load_run(root: Optional[Path], out: Path, config: Optional[Path], requests: int = 1024, concurrency: int = 256,
             max_tokens: int = 32, alone: int = 32, log: Log = print, command: str = "sedac-bench load") -> Path:
    """The command: measure, write ``load.md`` and ``load.json`` under ``out``; returns load.md's path."""
    from .suite import calibrated_config

    if requests < 1 or concurrency < 1 or max_tokens < 1 or alone < 0:
        raise ValueError("--requests, --concurrency and --max-tokens must be at least 1, --alone at least 0")
    root = assets_mod.build(root, log=log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = calibrated_config(out / "load_sedac_config.json", root, log)
    results = measure(root, out, config, requests, concurrency, max_tokens, alone, log, command)
    path = out / "load.md"
    path.write_text("\n".join(report_lines(results)) + "\n")
    (out / "load.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    log(path.read_text())
    return path


def measure(root: Path, out: Path, config: Path, requests: int, concurrency: int, max_tokens: int, alone: int,
            log: Log, command: str) -> Dict[str, Any]:
    """Serve the bundled SmolLM2 Llama folder (under the assets folder ``root``) with ``config``, load it,
    then stop it with SIGTERM under load; the figures as a dict (see :func:`report_lines`)."""
    from sedac_vllm import load
    from sedac_vllm.server import free_port, running_server

    from .run import machine

    model_dir = root / assets_mod.LLAMA
    texts = prompts(root, requests)
    good: List[Dict[str, Any]] = [{"model": "m", "prompt": p, "max_tokens": max_tokens, "temperature": 0}
                                  for p in texts]
    malformed = load.malformed_requests("m", CONTEXT)
    # each malformed kind repeated so that about one request in sixteen is malformed
    bad = [m for _ in range(max(1, requests // (16 * len(malformed)))) for m in malformed]
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("sedac-vllm")), "serve", str(model_dir), "--sedac-config", str(config),
           "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", str(CONTEXT),
           "--served-model-name", "m"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "SEDAC_METRICS_FILE": str(out / "load_metrics.json")}
    results: Dict[str, Any] = {"command": command, "machine": machine(), "config": str(config),
                               "requests": requests, "malformed": len(bad), "concurrency": concurrency,
                               "max_tokens": max_tokens}
    t0 = time.time()
    with running_server(cmd, env, port, out / "server-load.log", startup_timeout=900) as base:
        results["startup_s"] = time.time() - t0
        log(f"server up in {results['startup_s']:.0f} s; warming up ...")
        load.send(base, "warm-up", {"model": "m", "prompt": "Warm-up.", "max_tokens": 4})
        time.sleep(1.0)  # the worker writes its statistics every 0.2 s: the warm-up's tokens are counted before
        before = load.scrape(base)

        def progress(done: int, total: int) -> None:
            if done % max(1, total // 8) == 0 or done == total:
                log(f"  {done}/{total} replies")

        log(f"{requests} completions of {max_tokens} tokens and {len(bad)} malformed requests, "
            f"{concurrency} at a time ...")
        t1 = time.time()
        replies = load.fire(base, load.interleave(good, bad), concurrency, timeout=900, progress=progress)
        results["load_wall_s"] = time.time() - t1
        results["load"] = load.summarize(replies)
        answered = [r for r in replies if r.kind == "good" and r.outcome == "answered"]
        results["malformed_without_message"] = sum(1 for r in replies if r.kind != "good" and not r.message())
        time.sleep(1.0)  # the worker writes its statistics every 0.2 s
        results["counters"] = _counters_add_up(before, load.scrape(base), answered)
        goods = [r for r in replies if r.kind == "good"]
        step = max(1, requests // alone) if alone else 0
        sample = list(range(0, requests, step))[:alone] if alone else []
        log(f"serving {len(sample)} of them alone ...")
        same = [load.send(base, "good", good[i]).text() == goods[i].text() for i in sample]
        results["alone"] = {"checked": len(same), "equal": sum(same)}
        # SIGTERM with requests in flight
        wave = [("good", {**g, "prompt": "Again: " + g["prompt"], "ignore_eos": True}) for g in good[:concurrency]]
        log(f"SIGTERM with {len(wave)} requests in flight ...")
        stop = load.sigterm_under_load(base, wave, concurrency, timeout=300)
        term = stop.replies
        from sedac_vllm.drain import CUT_OFF, SHUTTING_DOWN

        results["sigterm"] = {**load.summarize(term), "stopped_s": stop.seconds, "in_engine": stop.in_engine,
                              "refused": sum(r.status == 503 and r.message() == SHUTTING_DOWN for r in term),
                              "cut_off": sum(r.status == 503 and r.message() == CUT_OFF for r in term),
                              "short": sum(r.outcome == "answered" and r.json()["usage"]["completion_tokens"]
                                           < max_tokens for r in term),
                              "stopped": stop.stopped}
    return results


def report_lines(r: Dict[str, Any]) -> List[str]:
    """The markdown section of a load run's results (also in ``sedac-bench run``'s report when present)."""
    ld, term = r["load"], r["sigterm"]
    lat = ld["latency_s"] or {"p50": float("nan"), "p99": float("nan")}
    lines = ["## Serving under load and faults", "",
             f"Made by `{r['command']}`; `sedac-vllm serve` compiled with `{Path(r['config']).name}` on the bundled "
             f"SmolLM2 ({r['machine'].get('cpu_model', '')}, {r['machine']['cpu_count']} cores); server up in "
             f"{r['startup_s']:.0f} s.", "",
             f"- **Load**: {r['requests']} completions of {r['max_tokens']} tokens and {r['malformed']} malformed "
             f"requests, {r['concurrency']} at a time, in {r['load_wall_s']:.1f} s: {ld['good_answered']} of "
             f"{r['requests']} answered, latency P50 {lat['p50']:.2f} s, P99 {lat['p99']:.2f} s; "
             f"**lost {ld['lost']}**; malformed without an error message: {r['malformed_without_message']}.",
             "", "| request | answered | 4xx | 5xx | lost |", "|---|---|---|---|---|"]
    for kind, counts in ld["by_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(o, 0)) for o in ("answered", "4xx", "5xx", "lost"))
                     + " |")
    lines += ["", "| /metrics counter | on /metrics | expected | |", "|---|---|---|---|"]
    for name, c in r["counters"].items():
        lines.append(f"| {name} | {c['metrics']} | {c['expected']} | {'ok' if c['pass'] else 'DIFFERS'} |")
    tl = term["latency_s"]
    lines += ["", f"- **Served alone**: {r['alone']['equal']} of {r['alone']['checked']} sampled outputs equal the "
                  f"same request served alone (greedy).",
              f"- **SIGTERM** with {term['requests']} requests in flight"
              + (f" ({term['in_engine']:.0f} of them in the engine)" if "in_engine" in term else "") + ": "
              + ", ".join(f"{n} {o}" for o, n in
                          ((o, sum(c.get(o, 0) for c in term["by_kind"].values()))
                           for o in ("answered", "4xx", "5xx", "lost")) if n)
              + (f" (of the answered, {term['short']} cut short)" if term.get("short") else "")
              + (f" (of the 5xx, {term['refused']} refused with 503 before they started: the server was "
                 f"shutting down)" if term.get("refused") else "")
              + (f" (of the 5xx, {term['cut_off']} answered with 503 when the shutdown timeout ran out before "
                 f"they finished)" if term.get("cut_off") else "")
              + f"; the server {'stopped' if term['stopped'] else 'had NOT stopped'} {term['stopped_s']:.1f} s after "
              f"the signal" + (f" (latency of the answered: P99 {tl['p99']:.2f} s)" if tl else "") + "."]
    return lines
