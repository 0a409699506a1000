"""`sedac-vllm serve` on localhost: 32 concurrent OpenAI-API requests, then /metrics shows SEDAC's counters;
malformed requests get a 4xx with a message and the server answers afterwards; SIGTERM under load lets every
request in flight finish, then the server stops."""

import json
import os
import shutil
import signal
import sys
import time
import urllib.error
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
                 "sedac_exits_total", "sedac_forwards_total"):
        assert name in text, name
    fraction = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("sedac_skipped_mlp_fraction")]
    assert 0 < fraction[0] < 1
    assert "vllm:" in text  # vLLM's own metrics are still there


MALFORMED = [  # (what is wrong, the request body)
    ("prompt longer than the context", {"model": "tiny", "prompt": "the mill " * 200, "max_tokens": 4}),
    ("negative max_tokens", {"model": "tiny", "prompt": "the river", "max_tokens": -5}),
    ("absurd max_tokens", {"model": "tiny", "prompt": "the river", "max_tokens": 10 ** 9}),
    ("unknown model", {"model": "no-such-model", "prompt": "the river", "max_tokens": 4}),
    ("max_tokens of the wrong type", {"model": "tiny", "prompt": "the river", "max_tokens": "four"}),
    ("prompt of the wrong type", {"model": "tiny", "prompt": {"text": "the river"}, "max_tokens": 4}),
    ("empty prompt", {"model": "tiny", "prompt": "", "max_tokens": 4}),
    ("invalid UTF-8", b'{"model": "tiny", "prompt": "the \xff\xfe river", "max_tokens": 4}'),
]


def status_of(url, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def message_of(text):
    """The error message of an error response: vLLM's ``{"error": {"message"}}`` or FastAPI's ``{"detail"}``."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    err = body.get("error") if isinstance(body, dict) else None
    return (err.get("message") if isinstance(err, dict) else None) or (body.get("message") if isinstance(
        body, dict) else None) or (body.get("detail") if isinstance(body, dict) else None)


def test_malformed_requests_get_a_4xx_naming_the_problem_and_the_server_goes_on(server):
    base, _ = server
    got = {what: status_of(base + "/v1/completions", body) for what, body in MALFORMED}
    wrong = {what: code for what, (code, _) in got.items() if not 400 <= code < 500}
    assert not wrong, f"not a 4xx: {wrong}"
    without = {what: text[:300] for what, (_, text) in got.items() if not message_of(text)}
    assert not without, f"no error message: {without}"
    ok = post(base + "/v1/completions", {"model": "tiny", "prompt": "the river", "max_tokens": 4, "temperature": 0})
    assert ok["choices"][0]["finish_reason"] == "length"


def test_sigterm_under_load_lets_the_requests_in_flight_finish(server):
    """Runs last for its server: it stops it."""
    import psutil

    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    pid = next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
               and c.status == psutil.CONN_LISTEN)

    def complete(i):
        try:
            r = post(base + "/v1/completions", {"model": "tiny", "prompt": f"Request {i}: the river and the mill",
                                                "max_tokens": 48, "temperature": 0, "ignore_eos": True}, timeout=120)
            return "answered" if r["usage"]["completion_tokens"] == 48 else "short"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except OSError as exc:  # connection refused or cut: a lost request
            return f"lost ({type(exc).__name__})"

    with ThreadPoolExecutor(48) as pool:
        futures = [pool.submit(complete, i) for i in range(48)]
        time.sleep(1.5)  # every request sent, none finished
        stopped_at = time.time()
        os.kill(pid, signal.SIGTERM)
        outcomes = [f.result(timeout=150) for f in futures]  # none hangs
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.time() - stopped_at < 60, "the server did not stop within 60 s of SIGTERM"
        time.sleep(0.5)
    assert outcomes == ["answered"] * 48, {o: outcomes.count(o) for o in set(outcomes)}
