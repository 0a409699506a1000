"""sedac_vllm.drain without vLLM's server: the front door's count, the 503 once draining, the wrapped
shutdown that drains before it stops the engine."""

import asyncio
import json
import threading
import time

from sedac_vllm.drain import SHUTTING_DOWN, DrainMiddleware, FrontDoor, is_work, wrap_shutdown


def test_drain_refuses_new_requests_and_waits_for_those_in_flight():
    door = FrontDoor()
    assert door.enter() and door.enter()
    threading.Timer(0.3, door.leave).start()
    threading.Timer(0.6, door.leave).start()
    t = time.monotonic()
    left = door.drain(5.0)
    waited = time.monotonic() - t
    assert 0.5 < waited < 2.0 and door.in_flight == 0
    assert 5.0 - waited - 0.1 < left <= 5.0 - waited + 0.1
    assert not door.enter() and door.refused == 1 and door.in_flight == 0


def test_drain_gives_up_at_the_timeout():
    door = FrontDoor()
    door.enter()  # never leaves
    t = time.monotonic()
    assert door.drain(0.4) == 0.0
    assert 0.35 < time.monotonic() - t < 1.5 and door.in_flight == 1


def test_only_work_routes_count():
    assert is_work({"type": "http", "method": "POST", "path": "/v1/completions"})
    assert is_work({"type": "http", "method": "POST", "path": "/v1/chat/completions"})
    assert not is_work({"type": "http", "method": "GET", "path": "/v1/models"})
    assert not is_work({"type": "http", "method": "GET", "path": "/metrics"})
    assert not is_work({"type": "http", "method": "POST", "path": "/health"})
    assert not is_work({"type": "lifespan"})


def test_the_middleware_counts_work_and_answers_503_once_draining(monkeypatch):
    import sedac_vllm.drain as drain

    door = FrontDoor()
    monkeypatch.setattr(drain, "DOOR", door)
    monkeypatch.setattr(drain, "install", lambda: True)
    seen = []

    async def app(scope, receive, send):
        seen.append(door.in_flight)
        await send({"type": "http.response.start", "status": 200, "headers": []})

    mw = DrainMiddleware(app)
    sent = []

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions"}
    asyncio.run(mw(scope, None, send))
    assert seen == [1] and door.in_flight == 0 and sent[0]["status"] == 200
    door.drain(0.01)
    sent.clear()
    asyncio.run(mw(scope, None, send))
    assert seen == [1], "a request was started while draining"
    assert sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["error"]["message"] == SHUTTING_DOWN
    asyncio.run(mw({"type": "http", "method": "GET", "path": "/health"}, None, send))
    assert seen == [1, 0]  # health still answers, uncounted


def test_the_wrapped_shutdown_drains_then_passes_on_the_time_left():
    calls = []

    class Engine:
        def shutdown(self, timeout=None):
            calls.append(timeout)

    door = FrontDoor()
    door.enter()
    threading.Timer(0.3, door.leave).start()
    wrap_shutdown(Engine, door)
    Engine().shutdown(timeout=10)
    assert door.draining and len(calls) == 1 and 9.0 < calls[0] < 9.8
    Engine().shutdown(timeout=0)  # abort mode stays abort, no wait
    assert calls[-1] == 0


def test_requests_still_in_flight_when_the_time_is_up_get_a_503():
    from vllm.exceptions import GracefulHTTPError

    from sedac_vllm.drain import CUT_OFF

    door = FrontDoor()
    door.enter()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    door.loop = loop
    got, calls = [], []

    class Processor:
        def propagate_error(self, e):  # on the loop, as vLLM's output handler calls it
            assert asyncio.get_running_loop() is loop
            got.append(e)
            door.leave()  # the request's handler answers and leaves

    class Engine:
        output_processor = Processor()

        def shutdown(self, timeout=None):
            calls.append(timeout)

    wrap_shutdown(Engine, door)
    t = time.monotonic()
    Engine().shutdown(timeout=0.3)  # the request never finishes on its own
    assert 0.25 < time.monotonic() - t < 5 and calls == [0.0] and door.in_flight == 0
    assert len(got) == 1 and isinstance(got[0], GracefulHTTPError)
    assert got[0].http_status == 503 and got[0].message == CUT_OFF
    loop.call_soon_threadsafe(loop.stop)
