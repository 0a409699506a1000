"""`sedac-vllm serve` on localhost, compiled, with one rank and with three (tensor parallelism):

* 256 concurrent completions mixed with malformed requests: every good request is answered, its output
  equals the same request served alone (greedy), every malformed one gets a 4xx with a message, the server
  answers afterwards, and the counters on /metrics add up to the requests served;
* SIGTERM with 256 requests in flight, 48 or more of them inside the engine: each is answered in full or,
  if the server had not yet read it, refused with a 503 saying it is shutting down, or (one rank, whose
  shutdown timeout is too short for its load) still running when the timeout runs out, answered with a 503
  saying so; none is lost, cut short or left hanging, and the server stops within 60 s.

A bounded version of ``sedac-bench load``, which runs the same checks on the bundled SmolLM2 at a larger
load and reports latency percentiles.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from sedac_monitor.testing import tiny_model
from sedac_vllm import load
from sedac_vllm.drain import CUT_OFF, SHUTTING_DOWN
from sedac_vllm.server import free_port, running_server

pytestmark = pytest.mark.engine  # starts the real vLLM engine

CONTEXT = 512
CONCURRENT = 256
STARTED = 48  # requests in the engine when SIGTERM comes (the engine runs 64 at a time)
SHORT_DRAIN = 5  # seconds, the one-rank server's shutdown timeout


@pytest.fixture(scope="module", params=[1, 3], ids=["tp1", "tp3"])
def server(request, tmp_path_factory):
    """`sedac-vllm serve` as a user starts it (vLLM compiles the model by default), with 1 and 3 ranks."""
    tp = request.param
    tmp = tmp_path_factory.mktemp(f"serve-tp{tp}")
    # head counts and sizes divisible by 3 (vLLM splits heads and the MLP across the ranks)
    tiny_model("qwen2", tmp / "model", hidden=192, intermediate=384, num_attention_heads=3, num_key_value_heads=3)
    config = tmp / "sedac_config.json"
    config.write_text(json.dumps({"tau": 0.9, "consecutive_k": 1, "min_layer": 1, "protect_last": 0,
                                  "scope": "cascade", "model": {"num_layers": 6}}))
    port = free_port()
    exe = shutil.which("sedac-vllm") or str(Path(sys.executable).with_name("sedac-vllm"))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "SEDAC_METRICS_FILE": str(tmp / "metrics.json")}
    if tp == 3:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1|0"
    # one rank: a short shutdown timeout, so SIGTERM under load runs it out (the 503 for what is left);
    # three ranks: serve's default (30 s), which lets the requests in flight finish
    drain = ["--shutdown-timeout", str(SHORT_DRAIN)] if tp == 1 else []
    cmd = [exe, "serve", str(tmp / "model"), "--sedac-config", str(config), "--port", str(port), "--host",
           "127.0.0.1", "--dtype", "float32", "--max-model-len", str(CONTEXT), "--max-num-seqs", "64",
           "--served-model-name", "tiny", "--tensor-parallel-size", str(tp), *drain]
    with running_server(cmd, env, port, tmp / "server.log", startup_timeout=600) as base:
        yield base, tp


def good_request(i, max_tokens=16, **extra):
    # under 16 tokens: no full KV block, so the prefix cache cannot serve a repeat from the first run
    return {"model": "tiny", "prompt": f"{i} the mill", "max_tokens": max_tokens, "temperature": 0, **extra}


def settled_metrics(base, key, expected, timeout=10.0):
    """/metrics once ``key`` reads ``expected`` (the worker writes its statistics every 0.2 s), or the last
    scrape after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while True:
        m = load.scrape(base)
        if m.get(key) == expected or time.time() > deadline:
            return m
        time.sleep(0.3)


def test_256_concurrent_with_malformed_all_answered_as_alone_and_metrics_add_up(server):
    base, tp = server
    before = load.scrape(base)
    good = [good_request(i) for i in range(CONCURRENT)]
    malformed = load.malformed_requests("tiny", CONTEXT)
    replies = load.fire(base, load.interleave(good, malformed), CONCURRENT + len(malformed))
    summary = load.summarize(replies)
    assert summary["lost"] == 0, summary
    goods = [r for r in replies if r.kind == "good"]
    assert [r.outcome for r in goods] == ["answered"] * CONCURRENT, summary
    bad = {r.kind: (r.status, r.body[:300]) for r in replies if r.kind != "good"}
    assert sorted(bad) == sorted(what for what, _ in malformed)
    assert not {k: v for k, v in bad.items() if not 400 <= (v[0] or 0) < 500}, f"not a 4xx: {bad}"
    assert all(r.message() for r in replies if r.kind != "good"), f"an error without a message: {bad}"
    usage = [r.json()["usage"] for r in goods]
    assert all(u["completion_tokens"] >= 1 for u in usage)

    # the counters add up: vLLM's, and SEDAC's against vLLM's (every token a forward ran through once:
    # the prompt's uncached tokens and each generated token but the last, which no forward reads)
    d_vllm = {k: v - before.get(k, 0.0) for k, v in load.scrape(base).items()}
    assert d_vllm["vllm:request_success_total"] == CONCURRENT
    assert d_vllm["vllm:prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usage)
    assert d_vllm["vllm:generation_tokens_total"] == sum(u["completion_tokens"] for u in usage)
    forwarded = (d_vllm["vllm:prompt_tokens_total"] - d_vllm["vllm:prompt_tokens_cached_total"]
                 + d_vllm["vllm:generation_tokens_total"] - CONCURRENT)
    after = settled_metrics(base, "sedac_tokens_total", before.get("sedac_tokens_total", 0.0) + forwarded)
    assert after["sedac_tokens_total"] - before.get("sedac_tokens_total", 0.0) == forwarded
    assert after["sedac_exits_total"] == after["sedac_tokens_total"]  # every token has one exit layer (or none)
    assert after["sedac_forwards_total"] > before.get("sedac_forwards_total", 0.0)
    assert 0 < after["sedac_skipped_mlp_fraction"] < 1  # SEDAC acted
    for name in ("sedac_skipped_mlp_blocks_total", "sedac_layer_skip_rate", "sedac_exited_fraction"):
        assert name in after, name

    # each output equals the same request served alone (all of them with one rank; every 8th with three,
    # where a request alone is slower)
    sample = range(0, CONCURRENT, 1 if tp == 1 else 8)
    cached_before = load.scrape(base)["vllm:prompt_tokens_cached_total"]
    alone = {i: load.send(base, "good", good[i]) for i in sample}
    assert load.scrape(base)["vllm:prompt_tokens_cached_total"] == cached_before, "served from the prefix cache"
    differ = {i: (goods[i].text(), a.text()) for i, a in alone.items() if a.text() != goods[i].text()}
    assert not differ, f"{len(differ)} of {len(alone)} differ from the request served alone: {list(differ.items())[:3]}"


def test_sigterm_under_load_answers_every_request_in_flight(server):
    """Runs last for its server: it stops it. Three ranks: each request is answered in full, or refused with
    a 503 if the server had not yet read it. One rank, with a shutdown timeout too short for its load: those
    still running when it runs out get a 503 naming the shutdown. None lost, none cut short, none hanging."""
    base, tp = server
    tokens = 400 if tp == 1 else 48  # one rank: 256 x 400 tokens, far more than 5 s of work
    requests = [("good", good_request(i, tokens, ignore_eos=True)) for i in range(CONCURRENT)]
    stop = load.sigterm_under_load(base, requests, CONCURRENT, in_engine=STARTED, timeout=150, stop_within=60)
    assert stop.in_engine >= STARTED, f"only {stop.in_engine:.0f} requests reached the engine within 60 s"
    assert stop.stopped, "the server did not stop within 60 s of SIGTERM"
    replies = stop.replies
    outcomes = ["answered" if r.outcome == "answered" and r.json()["usage"]["completion_tokens"] == tokens
                else "refused" if r.status == 503 and r.message() == SHUTTING_DOWN
                else "cut off" if r.status == 503 and r.message() == CUT_OFF
                else f"{r.outcome}: {r.body[:200]}" for r in replies]
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    if tp == 1:
        assert set(outcomes) <= {"answered", "refused", "cut off"}, counts
        assert counts.get("cut off", 0) >= 1, counts  # the timeout ran out with work left
        assert counts.get("answered", 0) + counts.get("cut off", 0) >= STARTED, counts
    else:
        assert set(outcomes) <= {"answered", "refused"}, counts
        assert counts.get("answered", 0) >= STARTED, counts  # those the engine had, at least
