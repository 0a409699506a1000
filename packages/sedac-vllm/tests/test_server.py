"""`sedac-vllm serve` on localhost: 32 concurrent OpenAI-API requests, then /metrics shows SEDAC's counters."""

import json
import os
import shutil
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sedac_monitor.testing import tiny_model
from sedac_vllm.server import free_port, running_server

pytestmark = pytest.mark.engine  # starts the real vLLM engine


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def post(url, body, timeout=300):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module", params=["compiled", "eager"])
def server(request, tmp_path_factory):
    """`sedac-vllm serve` as a user starts it (vLLM compiles the model by default), and with --enforce-eager."""
    tmp = tmp_path_factory.mktemp(f"serve-{request.param}")
    tiny_model("qwen2", tmp / "model")
    config = tmp / "sedac_config.json"
    config.write_text(json.dumps({"tau": 0.9, "consecutive_k": 1, "min_layer": 1, "protect_last": 0,
                                  "scope": "cascade", "model": {"num_layers": 6}}))
    port = free_port()
    exe = shutil.which("sedac-vllm") or str(Path(sys.executable).with_name("sedac-vllm"))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "SEDAC_METRICS_FILE": str(tmp / "metrics.json")}
    cmd = [exe, "serve", str(tmp / "model"), "--sedac-config", str(config), "--port", str(port), "--host",
           "127.0.0.1", "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "32",
           "--served-model-name", "tiny"]
    if request.param == "eager":
        cmd.append("--enforce-eager")
    with running_server(cmd, env, port, tmp / "server.log") as base:
        yield base, tmp


def test_32_concurrent_requests_complete_and_metrics_show_sedac(server):
    base, tmp = server

    def complete(i):
        return post(base + "/v1/completions", {"model": "tiny", "prompt": f"Request {i}: the river and the mill",
                                               "max_tokens": 16, "temperature": 0})

    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(complete, range(32)))
    assert len(replies) == 32
    assert all(r["choices"][0]["finish_reason"] in ("length", "stop") for r in replies)
    assert all(r["usage"]["completion_tokens"] >= 1 for r in replies)
    deadline = time.time() + 10
    while True:  # the engine writes its statistics at most every half second
        _, text = get(base + "/metrics")
        if "sedac_tokens_total" in text:
            break
        assert time.time() < deadline, "no SEDAC counters on /metrics"
        time.sleep(0.5)
    tokens = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("sedac_tokens_total")]
    assert tokens and tokens[0] >= 32 * 8
    for name in ("sedac_skipped_mlp_blocks_total", "sedac_skipped_mlp_fraction", 'sedac_layer_skip_rate{layer="5"}',
                 "sedac_exits_total", "sedac_forward_steps_total"):
        assert name in text, name
    fraction = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("sedac_skipped_mlp_fraction")]
    assert 0 < fraction[0] < 1
    assert "vllm:" in text  # vLLM's own metrics are still there
