"""A real `interbert serve` on localhost (both modes) with `--access-log json --access-log-file`: SIGTERM while
a re-ranked search is in flight lets it finish (200, and in the A/B mode its impression stored), refuses new
connections, and exits 0; the access log holds one parsable JSON line per request with its X-Request-Id.

The search is held in flight deterministically by its body: all of it but the last byte is sent before the
SIGTERM, the last byte after. The app is then inside the request (reading the body), as a slow re-rank would
be, without depending on how fast this machine runs the model."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import time

import httpx
import pytest

from conftest import minilm_vocab
from serve_process import answering_pids, start_serve
from interbert.serve.index import build_index
from interbert.serve.synthetic_gallery import save_tiny_model
from fixture_writers import write_gallery

FEATURE_DIM = 16


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shutdown")
    write_gallery(folder, num_images=6, feature_dim=FEATURE_DIM, seed=3, images=False)
    model = save_tiny_model(folder / "model", minilm_vocab(), FEATURE_DIM, architecture="retrieval")
    build_index(model, folder / "features", folder / "index", progress=False)
    return folder / "index"


def start(flags: list[str]) -> tuple[subprocess.Popen, int]:
    return start_serve(*flags, health="/health/live")


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the one response on ``sock`` (the server closes it after: it is stopping)."""
    sock.settimeout(30)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("mode", ["index", "arms", pytest.param("arms-workers", marks=pytest.mark.slow)])
def test_sigterm_finishes_the_search_in_flight_and_exits_0(mode, index, tmp_path):
    """arms-workers: `serve --workers 2`, the SIGTERM to the parent, which stops both workers."""
    log = tmp_path / "access.jsonl"
    events = tmp_path / "events.sqlite"
    flags = (["--index", str(index)] if mode == "index" else
             ["--arm", f"a={index}", "--arm", f"b={index}", "--experiment", "stop", "--events", str(events)])
    if mode == "arms-workers":
        flags += ["--workers", "2"]
    server, port = start([*flags, "--access-log", "json", "--access-log-file", str(log), "--shutdown-timeout", "20"])
    try:
        if mode == "arms-workers":  # both serving (the second starts once the first is ready)
            assert len(answering_pids(f"http://127.0.0.1:{port}", 2)) == 2
        ready = httpx.get(f"http://127.0.0.1:{port}/health/ready", headers={"X-Request-Id": "ready-1"}, timeout=30)
        assert ready.status_code == 200 and ready.headers["x-request-id"] == "ready-1"

        body = json.dumps({"query": "a dog on the beach", "k": 3, "rerank": True}).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"X-Request-Id: in-flight-1\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:-1])
        time.sleep(0.5)  # the request is in the app, waiting for its last byte
        server.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert server.poll() is None, "the server exited with a request in flight"
        with pytest.raises(OSError):  # no new connections once stopping
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        sock.sendall(body[-1:])
        status, headers, answer = read_response(sock)
        sock.close()
        assert status == 200 and headers["x-request-id"] == "in-flight-1"
        found = json.loads(answer)
        assert found["rerank"] is True and len(found["results"]) == 3
        assert server.wait(30) == 0, server.stderr.read().decode()[-2000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)

    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    by_id = {line["request_id"]: line for line in lines}
    assert by_id["ready-1"]["route"] == "/health/ready" and by_id["ready-1"]["status"] == 200
    searched = by_id["in-flight-1"]
    assert (searched["method"], searched["route"], searched["status"]) == ("POST", "/search", 200)
    assert searched["latency_ms"] >= 1000  # it spanned the SIGTERM
    assert "dog" not in log.read_text(encoding="utf-8")
    if mode != "index":
        assert searched["arm"] == found["arm"] and len(searched["user"]) == 12
        with sqlite3.connect(events) as db:  # the answer's impression was committed before it was sent
            assert db.execute("SELECT arm FROM impressions WHERE request_id = ?",
                              (found["request_id"],)).fetchone() == (found["arm"],)
