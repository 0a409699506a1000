"""Drain at the front door on SIGTERM: every request the server accepted finishes before the engine stops.

vLLM's own drain (``--shutdown-timeout N``) waits for the requests already inside the engine, but stops
the API server's tokenizer first: a request accepted and still being tokenized when the signal comes
gets a 500 (``cannot schedule new futures after shutdown``), and one that arrives during the drain is
cut off. Under load that is most of them (256 requests in flight on 2 cores: 62 answered, 192 got 500).

``sedac-vllm serve`` adds :class:`DrainMiddleware` to the API server (vLLM's ``--middleware``). It counts
the requests in flight on the work routes (every POST but health and metrics); when vLLM stops its engine
client after SIGTERM or SIGINT, the server first refuses new work with a 503 naming the shutdown (clients
and load balancers retry elsewhere), waits until the requests in flight have been answered or the shutdown
timeout has passed, and then lets vLLM stop the engine with what remains of the timeout. Requests still in
flight when the time is up get a 503 naming the shutdown (vLLM alone would leave them waiting on outputs that
never come, and the server waiting on their connections).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any, Awaitable, Callable, Dict, Optional

logger = logging.getLogger("sedac_vllm")

SHUTTING_DOWN = "the server is shutting down (SIGTERM); the request was not started: retry it on another instance"


CUT_OFF = ("the server shut down before this request finished: it was still running when the shutdown timeout "
           "after SIGTERM ran out; retry it on another instance")


class FrontDoor:
    """Requests in flight, and whether the server still takes new ones (thread-safe). ``loop`` is the API
    server's event loop (the middleware notes it), where the requests' output queues live."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self.in_flight = 0
        self.draining = False
        self.refused = 0
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def wait_empty(self, timeout: float) -> int:
        """Wait up to ``timeout`` s until nothing is in flight; returns how many still are."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.in_flight > 0 and time.monotonic() < deadline:
                self._lock.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            return self.in_flight

    def enter(self) -> bool:
        """Count a new request in; False (not counted) once draining."""
        with self._lock:
            if self.draining:
                self.refused += 1
                return False
            self.in_flight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self._lock.notify_all()

    def drain(self, timeout: float) -> float:
        """Refuse new requests, wait up to ``timeout`` s for those in flight; returns the seconds left."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self.draining = True
            waiting = self.in_flight
            while self.in_flight > 0 and time.monotonic() < deadline:
                self._lock.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            left = self.in_flight
        logger.info("SEDAC drain: %d requests were in flight at shutdown, %d still are; %d new ones refused",
                    waiting, left, self.refused)
        return max(0.0, deadline - time.monotonic())


DOOR = FrontDoor()

Scope = Dict[str, Any]
Receive = Callable[[], Awaitable[Dict[str, Any]]]
Send = Callable[[Dict[str, Any]], Awaitable[None]]


def is_work(scope: Scope) -> bool:
    return (scope.get("type") == "http" and scope.get("method") == "POST"
            and not str(scope.get("path", "")).startswith(("/health", "/metrics", "/ping")))


class DrainMiddleware:
    """ASGI middleware: counts work in flight through :data:`DOOR`; a 503 with a message once draining."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        install()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_work(scope):
            await self.app(scope, receive, send)
            return
        DOOR.loop = asyncio.get_running_loop()
        if not DOOR.enter():
            body = json.dumps({"error": {"message": SHUTTING_DOWN, "type": "ServiceUnavailableError",
                                         "code": 503}}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        try:
            await self.app(scope, receive, send)
        finally:
            DOOR.leave()


_installed: Optional[Callable[..., Any]] = None


def install() -> bool:
    """Make vLLM's engine client drain :data:`DOOR` before it stops the engine (once per process).

    False, with a warning, where this vLLM has no ``AsyncLLM.shutdown(timeout)`` to wrap: vLLM's own
    drain then applies as it is.
    """
    global _installed
    if _installed is not None:
        return True
    try:
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        logger.warning("SEDAC drain not installed (%s): vLLM's own shutdown applies", exc)
        return False
    _installed = wrap_shutdown(AsyncLLM, DOOR)
    return True


def cut_off(engine: Any, door: FrontDoor, grace: float = 10.0) -> None:
    """Requests still in flight once the drain's time is up get an error response now (HTTP 503, naming the
    shutdown): vLLM's abort stops the engine, and their handlers would wait on outputs that never come (the
    server then waits on their connections without end). The error goes into every open request's output
    queue on the server's event loop; this waits up to ``grace`` s for the responses to go out."""
    processor = getattr(engine, "output_processor", None)
    if door.in_flight == 0 or door.loop is None or processor is None:
        return
    try:
        from http import HTTPStatus

        from vllm.exceptions import GracefulHTTPError

        error: Exception = GracefulHTTPError(CUT_OFF, HTTPStatus.SERVICE_UNAVAILABLE)
    except ImportError:  # a vLLM without it: a 500 naming the cause
        error = RuntimeError(CUT_OFF)
    try:
        door.loop.call_soon_threadsafe(processor.propagate_error, error)
    except RuntimeError:  # the loop is closed: nothing left to answer
        return
    left = door.wait_empty(grace)
    logger.warning("SEDAC drain: the shutdown timeout ran out; requests still in flight were answered with a 503"
                   + (f" ({left} still open)" if left else ""))


def wrap_shutdown(cls: Any, door: FrontDoor) -> Callable[..., Any]:
    """Replace ``cls.shutdown(self, timeout)`` by one that drains ``door`` first and passes on the time left;
    returns the original."""
    original = cls.shutdown

    def shutdown(self: Any, timeout: Optional[float] = None) -> None:
        if timeout:  # drain mode; 0 or None: vLLM aborts at once, and so do we
            timeout = door.drain(timeout)
            cut_off(self, door)
        original(self, timeout=timeout)

    cls.shutdown = shutdown
    return original
