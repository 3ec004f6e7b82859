"""`interbert serve --workers N` (issue 24): worker processes sharing one port and one SQLite event log.
The replica test of tests/abtest/test_abtest_replicas.py, on one machine: `abtest simulate` and clients drive two
workers, one is SIGKILLed mid-traffic and replaced, and nothing acknowledged is lost or counted twice."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from abtest_world import build_world, independent_counts
from conftest import single_torch_thread
from interbert.serve.identity import sign_user_id
from interbert.serve.report import build_report
from interbert.serve.simulate import simulate
from serve_process import answering_pids
from test_abtest_process import SECRET, secret_file, start_server


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def workers_of(parent: int) -> set[int]:
    """The worker processes of a `serve --workers` parent (multiprocessing's spawned children)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    found = set()
    for pid in map(int, children):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except FileNotFoundError:
            continue  # ended meanwhile
    return found


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql).fetchall()


def counter(url: str, name: str) -> dict[str, float]:
    """``name``'s samples in /metrics by their `kind` label, read with prometheus-client's own parser."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {sample.labels.get("kind", ""): sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name}


# not slow: issue 24's Done-when (2 workers, one SQLite log, one killed mid-traffic) runs in CI; ~50 s busy
def test_two_workers_share_one_sqlite_log_and_a_killed_one_loses_nothing(world, tmp_path):
    events = tmp_path / "events.sqlite"
    server, url = start_server(world, events, "--user-secret-file", secret_file(tmp_path), "--workers", "2",
                               "--header-timeout", "2")
    try:
        assert len(answering_pids(url, 2)) == 2 and len(workers_of(server.pid)) == 2
        # Every worker keeps serve's head deadline: silent connections are answered 408 and closed.
        silent = [socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) for _ in range(4)]
        for connection in silent:
            connection.settimeout(15)
            assert connection.recv(100).startswith(b"HTTP/1.1 408")
            connection.close()
        with single_torch_thread():
            result = simulate(url, users=12, data=world.data, max_requests=36, max_seconds=60, seed=9, k=6,
                              user_secret=SECRET)
        assert result.requests == 36
        acknowledged_requests, acknowledged_clicks, arms_seen, killed = _traffic_with_a_killed_worker(server, url)
        # uvicorn's supervisor replaces the killed worker: two workers again, the new one answering
        deadline = time.monotonic() + 120
        while (killed in workers_of(server.pid) or len(workers_of(server.pid)) < 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = workers_of(server.pid)
        assert killed not in survivors and len(survivors) == 2
        assert answering_pids(url, 2) == survivors
        written = counter(url, "interbert_events_written_total")
    finally:
        server.send_signal(signal.SIGTERM)  # the parent stops every worker, each after its requests in flight
        _, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr.decode()[-2000:]
    assert not any(Path(f"/proc/{pid}").exists() for pid in survivors)

    stored_requests = {r for (r,) in rows(events, "SELECT request_id FROM impressions")}
    stored_clicks = set(rows(events, "SELECT request_id, image_id FROM clicks"))
    assert acknowledged_requests <= stored_requests  # no acknowledged event lost
    assert set(acknowledged_clicks) <= stored_clicks
    # No click counted twice: at most one acknowledgement of each said "counted" (none, where the counting one
    # was the killed worker's, stored but cut off before its answer: the retry then saw a duplicate).
    assert max(acknowledged_clicks.values()) == 1 and sum(acknowledged_clicks.values()) >= len(acknowledged_clicks) - 4
    assert rows(events, "SELECT COUNT(*), COUNT(DISTINCT request_id || ' ' || image_id) FROM clicks")[0] == \
        (len(stored_clicks),) * 2
    # every user in one arm, whichever worker served it
    assert all(len(arms) == 1 for arms in arms_seen.values())
    assert rows(events, "SELECT user_id FROM impressions GROUP BY user_id HAVING COUNT(DISTINCT arm) > 1") == []
    assert rows(events, "SELECT COUNT(DISTINCT user_id) FROM impressions WHERE user_id LIKE 'sim9-%'") == [(12,)]
    report = build_report(events)
    assert {a.name: (a.users, a.requests, a.impressions, a.clicks) for a in report.arms} == independent_counts(
        lambda sql: rows(events, sql))
    # /metrics sums both workers' counters, the killed one's included (it may have died between a commit
    # and its count: a few events stored but not counted)
    assert len(stored_requests) - 4 <= written["impression"] <= len(stored_requests)
    assert len(stored_clicks) - 4 <= written["click"] <= len(stored_clicks)


def _traffic_with_a_killed_worker(server, url: str):
    """Clients showing feeds and clicking each item twice (a duplicate, maybe on the other worker) until
    40 clicks are acknowledged, then one worker SIGKILLed, then 20 more clicks served by the other."""
    acknowledged_requests: set[str] = set()
    acknowledged_clicks: Counter = Counter()  # (request, image) -> acknowledgements saying "counted"
    arms_seen: dict[str, set[str]] = defaultdict(set)
    lock, stop = threading.Lock(), threading.Event()

    def traffic(n: int) -> None:
        with httpx.Client(base_url=url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            topics = client.get("/topics").json()
            i = 0
            while not stop.is_set():
                user_id = f"worker-user{n}-{i % 5}"
                user = {"X-User-Id": sign_user_id(user_id, SECRET)}
                i += 1
                try:
                    feed = client.get(f"/topics/{topics[i % len(topics)]['topic_id']}", headers=user)
                except httpx.HTTPError:
                    continue  # the killed worker's connection: nothing acknowledged
                if feed.status_code != 200:
                    continue
                body = feed.json()
                with lock:
                    acknowledged_requests.add(body["request_id"])
                    arms_seen[user_id].add(body["arm"])
                item = {"request_id": body["request_id"], "image_id": body["results"][0]["image_id"]}
                for _ in range(2):
                    try:
                        click = client.post("/events/click", headers=user, json=item)
                    except httpx.HTTPError:
                        continue
                    if click.status_code == 200:
                        with lock:
                            acknowledged_clicks[(item["request_id"], item["image_id"])] += click.json()["counted"]

    threads = [threading.Thread(target=traffic, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 90
    while len(acknowledged_clicks) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = min(workers_of(server.pid))
    os.kill(killed, signal.SIGKILL)  # mid-traffic: the threads are still sending to it
    before = len(acknowledged_clicks)
    while len(acknowledged_clicks) < before + 20 and time.monotonic() < deadline:
        time.sleep(0.05)  # the other worker keeps serving
    stop.set()
    for t in threads:
        t.join(30)
    assert before >= 40 and len(acknowledged_clicks) >= before + 20, "too little traffic around the kill to test anything"
    return acknowledged_requests, acknowledged_clicks, arms_seen, killed


def test_a_worker_that_cannot_start_is_one_error_line_and_the_service_exits(world, tmp_path):
    not_a_log = tmp_path / "events.sqlite"
    not_a_log.write_text("not a database\n")
    done = subprocess.run([sys.executable, "-m", "interbert.cli", "serve", *world.arm_flags(), "--events",
                           str(not_a_log), "--workers", "2", "--port", "0", "--log-level", "warning"],
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and str(not_a_log) in errors[0], done.stderr
    assert "Traceback" not in done.stderr
