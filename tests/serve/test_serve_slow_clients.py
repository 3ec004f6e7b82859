"""Slow clients against a real `interbert serve` on localhost (both modes): a connection that sends nothing,
half a request head, or a body that trickles in is answered 408 and closed once --header-timeout or
--body-timeout has passed, while other clients are answered as usual."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import httpx
import pytest

from conftest import minilm_vocab
from serve_process import start_serve
from interbert.serve.index import build_index
from interbert.serve.synthetic_gallery import save_tiny_model
from fixture_writers import write_gallery

FEATURE_DIM = 16
TIMEOUT_S = 1.0  # --header-timeout and --body-timeout of the servers under test
SLACK_S = 4.0  # a busy shared machine may run the server's timer late; never by this much


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slow")
    write_gallery(folder, num_images=4, feature_dim=FEATURE_DIM, seed=2, images=False)
    model = save_tiny_model(folder / "model", minilm_vocab(), FEATURE_DIM, architecture="retrieval")
    build_index(model, folder / "features", folder / "index", progress=False)
    return folder


def start(mode_flags: list[str]):
    return start_serve(*mode_flags, "--header-timeout", str(TIMEOUT_S), "--body-timeout", str(TIMEOUT_S))


@pytest.fixture(scope="module", params=["index", "arms"])
def server(request, index, tmp_path_factory):
    if request.param == "index":
        flags = ["--index", str(index / "index")]
    else:
        events = tmp_path_factory.mktemp("events") / "events.sqlite"
        flags = ["--arm", f"a={index / 'index'}", "--arm", f"b={index / 'index'}", "--experiment", "slow",
                 "--events", str(events)]
    process, port = start(flags)
    yield port
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)


def closed_after(sock: socket.socket, trickle: bytes = b"") -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` (sending ``trickle`` one byte every 0.2 s meanwhile: a
    slowloris keeps its connection busy), and what it answered."""
    start, answer = time.monotonic(), b""
    sock.settimeout(0.2)
    sent = 0
    while time.monotonic() - start < TIMEOUT_S + SLACK_S:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            if sent < len(trickle):
                try:
                    sock.sendall(trickle[sent : sent + 1])
                except OSError:  # the server closed it while we were sending
                    return time.monotonic() - start, answer
                sent += 1
            continue
        except ConnectionResetError:
            return time.monotonic() - start, answer
        if not chunk:
            return time.monotonic() - start, answer
        answer += chunk
    raise AssertionError(f"still open after {TIMEOUT_S + SLACK_S} s; answered so far: {answer!r}")


def connect(port: int, sent: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if sent:
        sock.sendall(sent)
    return sock


HALF_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def test_many_half_requests_are_answered_408_and_closed_while_others_are_served(server):
    socks = [connect(server, HALF_HEAD) for _ in range(20)]
    results: list[tuple[float, bytes]] = []
    threads = [threading.Thread(target=lambda s=s: results.append(closed_after(s, b"abcdefghijklmnopqrstuvwxyz")))
               for s in socks]
    for t in threads:
        t.start()
    # Meanwhile the server answers everyone else.
    assert httpx.get(f"http://127.0.0.1:{server}/health", timeout=5).status_code == 200
    for t in threads:
        t.join(TIMEOUT_S + SLACK_S + 5)
    for s in socks:
        s.close()
    assert len(results) == 20
    for elapsed, answer in results:
        assert TIMEOUT_S * 0.8 <= elapsed <= TIMEOUT_S + SLACK_S
        assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_connection_that_sends_nothing_is_closed(server):
    with connect(server) as sock:
        elapsed, answer = closed_after(sock)
    assert TIMEOUT_S * 0.8 <= elapsed <= TIMEOUT_S + SLACK_S and answer.startswith(b"HTTP/1.1 408 ")


def test_a_body_that_trickles_in_is_answered_408_and_closed(server):
    body = b'{"query": "a dog on the beach", "k": 2}'
    head = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    with connect(server, head + body[:3]) as sock:
        elapsed, answer = closed_after(sock, body[3:])  # 0.2 s a byte: ~7 s for the whole body
    assert TIMEOUT_S * 0.8 <= elapsed <= TIMEOUT_S + SLACK_S and answer.startswith(b"HTTP/1.1 408 ")
    # The same request sent at once is answered: the bound is on time, not on the request.
    response = httpx.post(f"http://127.0.0.1:{server}/search", content=body,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 200


def test_the_next_request_on_a_kept_alive_connection_has_the_same_deadline(server):
    with connect(server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") as sock:
        sock.settimeout(10)
        first = b""
        while b'"status"' not in first:
            first += sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200 ")
        sock.sendall(HALF_HEAD)
        elapsed, answer = closed_after(sock, b"abcdefghijklmnopqrstuvwxyz")
    assert elapsed <= TIMEOUT_S + SLACK_S and answer.startswith(b"HTTP/1.1 408 ")
