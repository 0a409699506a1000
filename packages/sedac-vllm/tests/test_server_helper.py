"""sedac_vllm.server without vLLM: a stand-in HTTP server, one that dies, one that never answers."""

import sys
import urllib.request

import pytest

from sedac_vllm.server import free_port, running_server


def test_yields_once_health_answers_and_stops_the_server_on_leaving(tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "health").write_text("ok")
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path / "www")]
    with running_server(cmd, {}, port, tmp_path / "log") as base:
        assert base == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            assert r.read() == b"ok"
    with pytest.raises(OSError):
        urllib.request.urlopen(base + "/health", timeout=2)


def test_a_server_that_exits_raises_with_its_log(tmp_path):
    cmd = [sys.executable, "-c", "print('bad flag --nope'); raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)exited with status 3.*bad flag --nope"):
        with running_server(cmd, {}, free_port(), tmp_path / "log"):
            pass


def test_a_server_that_never_answers_times_out(tmp_path):
    cmd = [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(60)"]
    with pytest.raises(RuntimeError, match=r"(?s)did not answer /health within 2 s.*loading"):
        with running_server(cmd, {}, free_port(), tmp_path / "log", startup_timeout=2):
            pass
