"""Load and faults against an OpenAI-API server (``sedac-vllm serve`` or ``vllm serve``).

Good completions and malformed requests are sent together from a thread pool; every reply is kept
with its HTTP status, its latency and its body, so a caller can check that each good request was
answered, that each malformed one got a 4xx with a message, and that nothing was lost (a connection
refused or cut without a response). :func:`scrape` reads Prometheus ``/metrics`` into numbers, so a
caller can check that the counters add up to the requests served. :func:`sigterm_under_load` stops the
server with SIGTERM while it serves, and keeps every reply.

Used by the server test (a bounded load in ``nox -s tests``) and by ``sedac-bench load`` (the larger
run whose figures go into its report).
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

Body = Union[Dict[str, Any], bytes]
"""A request body: a JSON object, or raw bytes sent as they are (for bodies JSON cannot express)."""


def malformed_requests(model: str, context: int) -> List[Tuple[str, Body]]:
    """(what is wrong, request body) for ``/v1/completions`` of a server serving ``model`` with a context of
    ``context`` tokens: each must get a 4xx with a message."""
    return [
        ("prompt longer than the context", {"model": model, "prompt": "the mill " * context, "max_tokens": 4}),
        ("negative max_tokens", {"model": model, "prompt": "the river", "max_tokens": -5}),
        ("absurd max_tokens", {"model": model, "prompt": "the river", "max_tokens": 10 ** 9}),
        ("unknown model", {"model": "no-such-model", "prompt": "the river", "max_tokens": 4}),
        ("max_tokens of the wrong type", {"model": model, "prompt": "the river", "max_tokens": "four"}),
        ("prompt of the wrong type", {"model": model, "prompt": {"text": "the river"}, "max_tokens": 4}),
        ("empty prompt", {"model": model, "prompt": "", "max_tokens": 4}),
        ("invalid UTF-8", b'{"model": "' + model.encode() + b'", "prompt": "the \xff\xfe river", "max_tokens": 4}'),
    ]


@dataclass(frozen=True)
class Reply:
    """One request's fate. ``status`` is None when no HTTP response came back (a lost request)."""

    kind: str  # "good", or what is wrong with a malformed request
    status: Optional[int]
    seconds: float
    body: str

    @property
    def outcome(self) -> str:
        if self.status is None:
            return "lost"
        return "answered" if self.status == 200 else f"{self.status // 100}xx"

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def text(self) -> Optional[str]:
        """The completion's text of an answered request."""
        body = self.json()
        try:
            return body["choices"][0]["text"]
        except (TypeError, KeyError, IndexError):
            return None

    def message(self) -> Optional[str]:
        """The error message of an error response: vLLM's ``{"error": {"message"}}``, or ``{"message"}`` or
        FastAPI's ``{"detail"}``."""
        body = self.json()
        if not isinstance(body, dict):
            return None
        err = body.get("error")
        msg = (err.get("message") if isinstance(err, dict) else None) or body.get("message") or body.get("detail")
        return str(msg) if msg else None


def send(base: str, kind: str, body: Body, timeout: float = 300) -> Reply:
    """POST ``body`` to ``base``/v1/completions; never raises for an HTTP error or a lost connection."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(kind, r.status, time.perf_counter() - t0, r.read().decode(errors="replace"))
    except urllib.error.HTTPError as exc:
        return Reply(kind, exc.code, time.perf_counter() - t0, exc.read().decode(errors="replace"))
    except (OSError, ValueError) as exc:  # refused, reset, cut mid-response, timed out: no answer came back
        return Reply(kind, None, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")


def fire(base: str, requests: Sequence[Tuple[str, Body]], concurrency: int, timeout: float = 300,
         progress: Optional[Callable[[int, int], None]] = None) -> List[Reply]:
    """Send ``requests`` ((kind, body), in this order) from ``concurrency`` threads; the replies in the same
    order. ``progress(done, total)`` is called as replies come back."""
    done = [0]

    def one(item: Tuple[str, Body]) -> Reply:
        reply = send(base, item[0], item[1], timeout)
        done[0] += 1
        if progress is not None:
            progress(done[0], len(requests))
        return reply

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(pool.map(one, requests))


def interleave(good: Sequence[Body], malformed: Sequence[Tuple[str, Body]]) -> List[Tuple[str, Body]]:
    """The good requests with the malformed ones spread evenly among them."""
    out: List[Tuple[str, Body]] = [("good", b) for b in good]
    step = max(1, len(out) // (len(malformed) + 1))
    for i, item in enumerate(malformed):
        out.insert(min(len(out), (i + 1) * step + i), item)
    return out


def parse_metrics(text: str) -> Dict[str, float]:
    """Prometheus text format → {metric name: value summed over its label sets}; comments skipped."""
    out: Dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0].strip()
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def scrape(base: str, timeout: float = 10) -> Dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=timeout) as r:
        return parse_metrics(r.read().decode())


def summarize(replies: Sequence[Reply]) -> Dict[str, Any]:
    """Counts by kind and outcome, and the good requests' latency percentiles (answered ones)."""
    by_kind: Dict[str, Dict[str, int]] = {}
    for r in replies:
        counts = by_kind.setdefault(r.kind, {})
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    good = [r.seconds for r in replies if r.kind == "good" and r.outcome == "answered"]
    lat = np.asarray(good, dtype=np.float64)
    return {"requests": len(replies), "by_kind": by_kind,
            "lost": sum(r.outcome == "lost" for r in replies),
            "good_answered": len(good),
            "latency_s": ({"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                           "max": float(lat.max())} if lat.size else None)}


@dataclass(frozen=True)
class Stopped:
    """What :func:`sigterm_under_load` saw."""

    replies: List[Reply]
    """every request's reply, in the order sent"""
    in_engine: float
    """requests running or waiting in the engine (vLLM's gauges) when the signal was sent"""
    seconds: float
    """from the signal until the server's process was gone (or until ``stop_within`` ran out)"""
    stopped: bool
    """whether the process was gone within ``stop_within`` seconds"""


def sigterm_under_load(base: str, requests: Sequence[Tuple[str, Body]], concurrency: int, in_engine: int = 48,
                       wait_s: float = 60, timeout: float = 300, stop_within: float = 120) -> Stopped:
    """Send ``requests`` from ``concurrency`` threads to the server at ``base`` (on this machine) and, once
    ``in_engine`` of them are running or waiting in its engine (or ``wait_s`` has passed), send SIGTERM to the
    process listening on its port; wait for every reply and for the process to go."""
    import psutil  # type: ignore[import-untyped]  # comes with vLLM

    port = int(base.rsplit(":", 1)[1].split("/", 1)[0])
    pid = next((c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                and c.status == psutil.CONN_LISTEN), None)
    if pid is None:
        raise RuntimeError(f"no process of this machine listens on port {port}")

    def gone() -> bool:
        return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fire, base, requests, concurrency, timeout)
        seen, deadline = 0.0, time.time() + wait_s
        while seen < in_engine and time.time() < deadline:
            time.sleep(0.2)
            m = scrape(base)
            seen = m.get("vllm:num_requests_running", 0.0) + m.get("vllm:num_requests_waiting", 0.0)
        signalled = time.time()
        os.kill(pid, signal.SIGTERM)
        replies = future.result()  # each request gives up after `timeout`: none hangs here
    while not gone() and time.time() - signalled < stop_within:
        time.sleep(0.2)
    return Stopped(replies, seen, time.time() - signalled, gone())
