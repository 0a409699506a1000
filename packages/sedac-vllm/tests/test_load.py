"""sedac_vllm.load without vLLM: a stand-in HTTP server that answers, refuses, errs and hangs up."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sedac_vllm import load


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body.get("prompt")
        if prompt == "hang up":
            self.connection.close()  # no response at all: a lost request
            return
        if prompt == "boom":
            self._reply(500, {"error": {"message": "engine died"}})
        elif not prompt:
            self._reply(400, {"error": {"message": "empty prompt"}})
        elif prompt == "bare":
            self._reply(422, "not json at all")
        else:
            self._reply(200, {"choices": [{"text": prompt.upper()}], "usage": {"prompt_tokens": 1}})

    def _reply(self, code, body):
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def base():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_replies_are_classified_and_keep_their_order(base):
    requests = [("good", {"prompt": "a"}), ("empty", {"prompt": ""}), ("good", {"prompt": "b"}),
                ("crash", {"prompt": "boom"}), ("cut", {"prompt": "hang up"}), ("bare", {"prompt": "bare"})]
    seen = []
    replies = load.fire(base, requests, 3, timeout=10, progress=lambda done, total: seen.append((done, total)))
    assert [r.kind for r in replies] == [k for k, _ in requests]
    assert [r.outcome for r in replies] == ["answered", "4xx", "answered", "5xx", "lost", "4xx"]
    assert [r.text() for r in replies[:3]] == ["A", None, "B"]
    assert replies[1].message() == "empty prompt" and replies[3].message() == "engine died"
    assert replies[5].message() is None  # a 4xx without a JSON message is told apart
    assert replies[4].status is None and replies[4].body  # why it was lost
    assert sorted(seen) == [(i, 6) for i in range(1, 7)]
    s = load.summarize(replies)
    assert s["requests"] == 6 and s["lost"] == 1 and s["good_answered"] == 2
    assert s["by_kind"] == {"good": {"answered": 2}, "empty": {"4xx": 1}, "crash": {"5xx": 1}, "cut": {"lost": 1},
                            "bare": {"4xx": 1}}
    assert 0 < s["latency_s"]["p50"] <= s["latency_s"]["p99"] <= s["latency_s"]["max"]


def test_a_refused_connection_is_a_lost_request():
    from sedac_vllm.server import free_port

    reply = load.send(f"http://127.0.0.1:{free_port()}", "good", {"prompt": "a"}, timeout=5)
    assert reply.outcome == "lost" and "refused" in reply.body.lower()


def test_interleave_spreads_the_malformed_among_the_good():
    good = [{"i": i} for i in range(10)]
    mixed = load.interleave(good, [("x", {}), ("y", {})])
    assert [b for k, b in mixed if k == "good"] == good  # the good ones keep their order
    positions = [i for i, (k, _) in enumerate(mixed) if k != "good"]
    assert len(positions) == 2 and positions[0] > 0 and positions[1] < len(mixed) - 1
    assert load.interleave([], [("x", {})]) == [("x", {})]


def test_parse_metrics_sums_label_sets_and_skips_comments():
    text = """# HELP vllm:request_success_total Count
# TYPE vllm:request_success_total counter
vllm:request_success_total{finished_reason="length",model_name="m"} 30.0
vllm:request_success_total{finished_reason="stop",model_name="m"} 2.0
sedac_tokens_total 9281.0
sedac_layer_skip_rate{layer="0"} 0.5
sedac_layer_skip_rate{layer="1"} 0.25
weird_line_without_value
"""
    m = load.parse_metrics(text)
    assert m == {"vllm:request_success_total": 32.0, "sedac_tokens_total": 9281.0, "sedac_layer_skip_rate": 0.75}


def test_every_malformed_request_names_the_served_model_or_is_meant_not_to():
    reqs = load.malformed_requests("tiny", 64)
    assert len({what for what, _ in reqs}) == len(reqs) == 8
    for what, body in reqs:
        if isinstance(body, bytes):
            with pytest.raises(UnicodeDecodeError):
                body.decode()
        else:
            assert (body["model"] == "tiny") != (what == "unknown model")
    long = dict(reqs)["prompt longer than the context"]
    assert len(long["prompt"].split()) > 64


def test_sigterm_under_load_names_a_port_nobody_listens_on():
    import socket

    with socket.socket() as s:  # a port just freed: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match=f"listens on port {port}"):
        load.sigterm_under_load(f"http://127.0.0.1:{port}", [], 1)
