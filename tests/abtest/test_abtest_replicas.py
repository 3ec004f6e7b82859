"""Replicas of the A/B service sharing one PostgreSQL event store (issue 24), on a real server
(tests/helpers/postgres_server.py): two `interbert serve` processes on localhost, one SIGKILLed mid-traffic, and the
database stopped, or hung (SIGSTOP), mid-traffic under a running service (503s in a bounded time, nothing
acknowledged lost, recovery)."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter, defaultdict

import httpx
import pytest

from abtest_world import build_world, independent_counts, serve_in_thread
from conftest import single_torch_thread
from interbert.serve.experiment import create_experiment_app
from interbert.serve.identity import sign_user_id
from interbert.serve.report import build_report
from interbert.serve.simulate import simulate
from test_abtest_process import SECRET, secret_file, start_server


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def query(uri: str, sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(uri) as db:
        return [tuple(row) for row in db.execute(sql).fetchall()]


def stored_events(uri: str) -> tuple[set[str], set[tuple[str, str]]]:
    return ({r for (r,) in query(uri, "SELECT request_id FROM impressions")},
            set(query(uri, "SELECT request_id, image_id FROM clicks")))


def test_two_replicas_share_one_postgres_store_and_a_killed_one_loses_nothing(world, tmp_path, postgres_uri):
    secret = secret_file(tmp_path)
    replicas = [start_server(world, postgres_uri, "--user-secret-file", secret) for _ in range(2)]
    (killed, killed_url), (survivor, survivor_url) = replicas
    try:
        # abtest simulate against both at once: the same simulated users (one seed) on both replicas
        with single_torch_thread():
            results = []
            runs = [threading.Thread(target=lambda url=url: results.append(simulate(
                url, users=12, data=world.data, max_requests=36, max_seconds=60, seed=9, k=6, user_secret=SECRET)))
                for url in (killed_url, survivor_url)]
            for run in runs:
                run.start()
            for run in runs:
                run.join(120)
        assert [r.requests for r in results] == [36, 36]

        # Then each user's feed from one replica, its click on the other and the click again on the first
        # (a duplicate across replicas), until one replica is killed mid-traffic.
        acknowledged_requests: set[str] = set()
        acknowledged_clicks: Counter = Counter()  # (request, image) -> acknowledgements saying "counted"
        arms_seen: dict[str, set[str]] = defaultdict(set)
        lock, stop = threading.Lock(), threading.Event()

        def traffic(n: int) -> None:
            clients = [httpx.Client(base_url=url, timeout=10) for url in (killed_url, survivor_url)]
            topics = clients[1].get("/topics").json()
            i = 0
            while not stop.is_set():
                user_id = f"replica-user{n}-{i % 5}"
                user = {"X-User-Id": sign_user_id(user_id, SECRET)}
                first, second = clients[i % 2], clients[(i + 1) % 2]
                i += 1
                try:
                    feed = first.get(f"/topics/{topics[i % len(topics)]['topic_id']}", headers=user)
                except httpx.HTTPError:
                    continue  # the killed replica: nothing acknowledged
                if feed.status_code != 200:
                    continue
                body = feed.json()
                with lock:
                    acknowledged_requests.add(body["request_id"])
                    arms_seen[user_id].add(body["arm"])
                item = {"request_id": body["request_id"], "image_id": body["results"][0]["image_id"]}
                for client in (second, first):
                    try:
                        click = client.post("/events/click", headers=user, json=item)
                    except httpx.HTTPError:
                        continue
                    if click.status_code == 200:
                        with lock:
                            acknowledged_clicks[(item["request_id"], item["image_id"])] += click.json()["counted"]
            for client in clients:
                client.close()

        threads = [threading.Thread(target=traffic, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acknowledged_clicks) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)  # mid-traffic: the threads are still sending to it
        killed.wait(30)
        before = len(acknowledged_clicks)
        while len(acknowledged_clicks) < before + 20 and time.monotonic() < deadline:
            time.sleep(0.05)  # the survivor keeps serving alone
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        for server, _ in replicas:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                server.communicate(timeout=30)
    assert before >= 40 and len(acknowledged_clicks) >= before + 20, "too little traffic around the kill to test anything"
    stored_requests, stored_clicks = stored_events(postgres_uri)
    assert acknowledged_requests <= stored_requests  # no acknowledged event lost
    assert set(acknowledged_clicks) <= stored_clicks
    # No click counted twice: at most one acknowledgement of each said "counted" (none, where the counting one
    # was the killed replica's, stored but cut off before its answer: the other replica then saw a duplicate).
    assert max(acknowledged_clicks.values()) == 1 and sum(acknowledged_clicks.values()) >= len(acknowledged_clicks) - 4
    assert query(postgres_uri, "SELECT COUNT(*), COUNT(DISTINCT (request_id, image_id)) FROM clicks")[0] == \
        (len(stored_clicks),) * 2
    # every user in one arm, whichever replica served it
    assert all(len(arms) == 1 for arms in arms_seen.values())
    assert query(postgres_uri, "SELECT user_id FROM impressions GROUP BY user_id HAVING COUNT(DISTINCT arm) > 1") == []
    simulated = query(postgres_uri, "SELECT COUNT(DISTINCT user_id) FROM impressions WHERE user_id LIKE 'sim9-%'")
    assert simulated == [(12,)]  # the same 12 users on both replicas
    # and the report equals the counts taken independently from the raw rows
    report = build_report(postgres_uri)
    assert {a.name: (a.users, a.requests, a.impressions, a.clicks) for a in report.arms} == independent_counts(
        lambda sql: query(postgres_uri, sql))


def test_postgres_stopped_mid_traffic_answers_503_loses_nothing_and_recovers(world, tmp_path):
    """Its own server (stopping the session's would disturb other tests)."""
    from postgres_server import PostgresServer

    database = PostgresServer()
    try:
        uri = database.create_database("outage")
        app = create_experiment_app(world.arms(), (0.5, 0.5), "outage", uri, user_secret=SECRET, events_busy_wait=2)
        acknowledged_requests: set[str] = set()
        acknowledged_clicks: set[tuple[str, str]] = set()
        statuses: list[tuple[float, float, str, int]] = []  # (sent, answered, route, status)
        lock, stop = threading.Lock(), threading.Event()

        def traffic(url: str, n: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                topics = client.get("/topics").json()
                i = 0
                while not stop.is_set():
                    user = {"X-User-Id": sign_user_id(f"outage{n}-{i % 7}", SECRET)}
                    i += 1
                    sent = time.monotonic()
                    feed = client.get(f"/topics/{topics[i % len(topics)]['topic_id']}", headers=user)
                    with lock:
                        statuses.append((sent, time.monotonic(), "feed", feed.status_code))
                    if feed.status_code != 200:
                        time.sleep(0.02)
                        continue
                    body = feed.json()
                    with lock:
                        acknowledged_requests.add(body["request_id"])
                    item = {"request_id": body["request_id"], "image_id": body["results"][1]["image_id"]}
                    sent = time.monotonic()
                    click = client.post("/events/click", headers=user, json=item)
                    with lock:
                        statuses.append((sent, time.monotonic(), "click", click.status_code))
                        if click.status_code == 200:
                            acknowledged_clicks.add((item["request_id"], item["image_id"]))

        with single_torch_thread(), serve_in_thread(app) as url:
            threads = [threading.Thread(target=traffic, args=(url, n)) for n in range(3)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            database.stop()  # fast shutdown: every session ended, transactions in flight rolled back
            stopped = time.monotonic()
            time.sleep(1.5)
            ready_while_down = httpx.get(f"{url}/health/ready", timeout=30)
            restarting = time.monotonic()  # the server answers before pg_ctl start returns
            database.start()
            restarted = time.monotonic()
            deadline = restarted + 30
            while time.monotonic() < deadline:
                with lock:
                    recovered = any(sent > restarted and kind == "click" and code == 200
                                    for sent, _, kind, code in statuses)
                if recovered:
                    break
                time.sleep(0.05)
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(60)
            ready_after = httpx.get(f"{url}/health/ready", timeout=30)
        codes = Counter(code for _, _, _, code in statuses)
        assert set(codes) <= {200, 503}, codes  # never a 500
        down = [code for sent, answered, _, code in statuses if stopped < sent and answered < restarting]
        assert down and set(down) == {503}, Counter(down)  # while the database is away: 503, nothing acknowledged
        assert recovered, "no click was stored after the database came back"
        assert ready_while_down.status_code == 503 and ready_while_down.json()["checks"]["events"] != "ok"
        assert ready_after.status_code == 200
        stored_requests, stored_clicks = stored_events(uri)
        assert acknowledged_requests <= stored_requests and acknowledged_clicks <= stored_clicks
        assert len(acknowledged_clicks) > 5
    finally:
        database.close()


HUNG_WAIT_S = 2  # the store's wait (--events-timeout): a hung database's 503 comes after about this
HUNG_BOUND_S = 10  # the wait, the client's grace, libpq's 2 s minimum connect timeout, and a busy machine


def test_a_hung_postgres_answers_503_within_a_bound_and_recovers_losing_nothing(world):
    """SIGSTOP, not a shutdown: the server's sockets stay open and its kernel acknowledges every byte, so only
    the client's own deadline can end a request. Its own server (pausing the session's would hang other tests)."""
    from postgres_server import PostgresServer

    database = PostgresServer()
    try:
        uri = database.create_database("hung")
        app = create_experiment_app(world.arms(), (0.5, 0.5), "hung", uri, user_secret=SECRET,
                                    events_busy_wait=HUNG_WAIT_S)
        acknowledged_requests: set[str] = set()
        acknowledged_clicks: set[tuple[str, str]] = set()
        statuses: list[tuple[float, float, str, int]] = []  # (sent, answered, route, status)
        lock, stop = threading.Lock(), threading.Event()

        def traffic(url: str, n: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as client:
                topics = client.get("/topics").json()
                i = 0
                while not stop.is_set():
                    user = {"X-User-Id": sign_user_id(f"hung{n}-{i % 7}", SECRET)}
                    i += 1
                    sent = time.monotonic()
                    feed = client.get(f"/topics/{topics[i % len(topics)]['topic_id']}", headers=user)
                    with lock:
                        statuses.append((sent, time.monotonic(), "feed", feed.status_code))
                    if feed.status_code != 200:
                        continue
                    body = feed.json()
                    with lock:
                        acknowledged_requests.add(body["request_id"])
                    item = {"request_id": body["request_id"], "image_id": body["results"][1]["image_id"]}
                    sent = time.monotonic()
                    click = client.post("/events/click", headers=user, json=item)
                    with lock:
                        statuses.append((sent, time.monotonic(), "click", click.status_code))
                        if click.status_code == 200:
                            acknowledged_clicks.add((item["request_id"], item["image_id"]))

        with single_torch_thread(), serve_in_thread(app) as url:
            threads = [threading.Thread(target=traffic, args=(url, n)) for n in range(3)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            database.pause()
            paused = time.monotonic()
            time.sleep(HUNG_BOUND_S + 2)
            asked = time.monotonic()
            ready_while_hung = httpx.get(f"{url}/health/ready", timeout=60)
            ready_took = time.monotonic() - asked
            resumed = time.monotonic()
            database.resume()
            deadline = resumed + 30
            recovered = False
            while time.monotonic() < deadline and not recovered:
                time.sleep(0.05)
                with lock:
                    recovered = any(sent > resumed and kind == "click" and code == 200 for sent, _, kind, code in statuses)
            stop.set()
            for t in threads:
                t.join(60)
            ready_after = httpx.get(f"{url}/health/ready", timeout=30)
        codes = Counter(code for _, _, _, code in statuses)
        assert set(codes) <= {200, 503}, codes  # never a 500
        # Sent while the database hung (and answered before it came back): 503, each within the bound.
        hung = [(answered - sent, code) for sent, answered, _, code in statuses if paused < sent and answered < resumed]
        assert len(hung) >= 3 and {code for _, code in hung} == {503}, hung
        assert max(took for took, _ in hung) < HUNG_BOUND_S, hung
        # what was in flight when it hung was answered within the bound too (nothing hangs past it)
        assert all(answered - sent < HUNG_BOUND_S for sent, answered, _, _ in statuses), max(
            answered - sent for sent, answered, _, _ in statuses)
        assert ready_while_hung.status_code == 503 and ready_while_hung.json()["checks"]["events"] != "ok"
        assert ready_took < HUNG_BOUND_S
        assert recovered, "no click was stored after the database resumed"
        assert ready_after.status_code == 200
        stored_requests, stored_clicks = stored_events(uri)
        assert acknowledged_requests <= stored_requests and acknowledged_clicks <= stored_clicks
        assert len(acknowledged_clicks) > 5
    finally:
        database.close()
