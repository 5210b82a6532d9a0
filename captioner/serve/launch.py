"""Start ``captioner-serve`` as a child process and wait until it answers (tests, benchmarks,
scripts): ``with served(["--checkpoint", path]) as url: ...``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Served:
    url: str  # http://127.0.0.1:PORT
    pid: int  # the server's main process (its workers are its children)


@contextlib.contextmanager
def served(args: list[str], timeout: float = 600.0, log=None):
    """Run the server with ``args`` on a free loopback port; yields ``Served`` once
    ``/health`` answers 200. On exit: SIGTERM (the CLI turns it into LitServe's graceful
    shutdown), then SIGKILL to the server's process group if anything lingers. ``log``: a file
    for its output (default: dropped)."""
    port = free_port()
    cmd = [sys.executable, "-m", "captioner.cli.serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode} before answering")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not healthy after {timeout:.0f} s")
            time.sleep(0.2)
        yield Served(url, proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its worker processes, if any are left
        proc.wait()
