"""A real `interbert serve` process on a free localhost port, for the tests that need the whole server
(uvicorn's protocol, signals, several processes) rather than FastAPI's test client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

STARTUP_TIMEOUT_S = 120  # a fresh interpreter loading torch and a model on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(*flags: str, health: str = "/health") -> tuple[subprocess.Popen, int]:
    """Start `interbert serve FLAGS --port P --log-level warning` and wait until ``health`` answers 200;
    returns the process (stderr piped) and its port. A server that exits first fails with its stderr."""
    port = free_port()
    command = [sys.executable, "-m", "interbert.cli", "serve", *flags, "--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=1).status_code == 200:
                return server, port
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise AssertionError(f"the server did not answer {health} in time")


def answering_pids(url: str, want: int, seconds: float = STARTUP_TIMEOUT_S) -> set[int]:
    """The pids /health names, asked on new connections until ``want`` different processes have answered:
    the workers of `serve --workers N` (each starts in turn) all serving."""
    seen: set[int] = set()
    deadline = time.monotonic() + seconds
    while len(seen) < want and time.monotonic() < deadline:
        with httpx.Client(base_url=url, timeout=10) as client:  # a new connection: any worker may take it
            seen.add(client.get("/health").json()["pid"])
        time.sleep(0.05)
    return seen
