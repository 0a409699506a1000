"""Run an OpenAI-API server process on localhost for the length of a ``with`` block.

Used by ``sedac-bench suite`` (latency under load, SEDAC vs vanilla) and by the
server test; the command itself comes from the caller (``sedac-vllm serve ...``
or :func:`sedac_vllm.cli.serve_command`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Sequence


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(cmd: Sequence[str], env: Dict[str, str], port: int, log_path: Path,
                   startup_timeout: float = 300) -> Iterator[str]:
    """Start ``cmd`` (serving on 127.0.0.1:``port``, output to ``log_path``), wait until ``/health`` answers
    200 and yield the base URL; on leaving, stop its process group (SIGINT, then SIGKILL after 60 s).

    A server that exits or does not come up within ``startup_timeout`` seconds raises RuntimeError with
    the end of its log.
    """
    log_path = Path(log_path)

    def fail(why: str) -> RuntimeError:
        return RuntimeError(f"{why}; {log_path} ends:\n{log_path.read_text()[-5000:]}")

    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + startup_timeout
            while True:
                if proc.poll() is not None:
                    raise fail(f"the server exited with status {proc.returncode}")
                try:
                    with urllib.request.urlopen(base + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise fail(f"the server did not answer /health within {startup_timeout:.0f} s")
                time.sleep(1)
            yield base
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
