"""Two arms on localhost: a real `interbert serve` process loses no acknowledged event when it is killed
(SIGKILL) mid-traffic, says so at start when it takes unsigned user ids, and an experiment runs end to end
(simulated users with signed ids, then the report)."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import threading
import time

import httpx
import pytest

from conftest import single_torch_thread
from abtest_world import build_world, serve_in_thread
from serve_process import start_serve
from interbert.cli import main as interbert_main
from interbert.errors import UsageError
from interbert.serve.experiment import create_experiment_app
from interbert.serve.report import build_report
from interbert.serve.abtest import ArmSpec
from interbert.serve.identity import sign_user_id
from interbert.serve.simulate import parse_topic, read_scenes, simulate

SECRET = b"process-test-secret-" * 3


def secret_file(folder) -> str:
    path = folder / "user.secret"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def start_server(world, events, *flags: str) -> tuple[subprocess.Popen, str]:
    server, port = start_serve(*world.arm_flags(), "--split", "50/50", "--experiment", "crash", "--events", str(events),
                               *flags)
    return server, f"http://127.0.0.1:{port}"


def test_a_killed_server_loses_no_acknowledged_event(world, tmp_path):
    events = tmp_path / "events.sqlite"
    server, url = start_server(world, events, "--user-secret-file", secret_file(tmp_path))
    acknowledged_requests: set[str] = set()
    acknowledged_clicks: set[tuple[str, str]] = set()
    lock, stop = threading.Lock(), threading.Event()

    def traffic(n: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            topics = client.get("/topics").json()
            i = 0
            while not stop.is_set():
                try:
                    user = {"X-User-Id": sign_user_id(f"u{n}-{i}", SECRET)}
                    feed = client.get(f"/topics/{topics[i % len(topics)]['topic_id']}", headers=user)
                    if feed.status_code != 200:
                        continue
                    body = feed.json()
                    with lock:
                        acknowledged_requests.add(body["request_id"])
                    for item in body["results"][:2]:
                        click = client.post("/events/click", headers=user,
                                            json={"request_id": body["request_id"], "image_id": item["image_id"]})
                        if click.status_code == 200:  # acknowledged: it must survive the kill
                            with lock:
                                acknowledged_clicks.add((body["request_id"], item["image_id"]))
                except httpx.HTTPError:
                    return  # the server is gone: what was in flight was never acknowledged
                i += 1

    threads = [threading.Thread(target=traffic, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acknowledged_clicks) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.send_signal(signal.SIGKILL)  # mid-traffic: the threads are still sending
    server.wait(30)
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acknowledged_clicks) >= 60, "too little traffic before the kill to test anything"
    with sqlite3.connect(events) as db:  # opening it replays the WAL, as the next server start would
        stored_requests = {r for (r,) in db.execute("SELECT request_id FROM impressions")}
        stored_clicks = set(db.execute("SELECT request_id, image_id FROM clicks"))
    assert acknowledged_requests <= stored_requests
    assert acknowledged_clicks <= stored_clicks


def test_a_server_taking_unsigned_ids_says_so_at_start(world, tmp_path):
    server, url = start_server(world, tmp_path / "events.sqlite", "--insecure-user-ids")
    try:
        health = httpx.get(f"{url}/health", timeout=10).json()
        topic_id = httpx.get(f"{url}/topics", timeout=10).json()[0]["topic_id"]
        plain = httpx.get(f"{url}/topics/{topic_id}", params={"user": "plain"}, timeout=10)
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert health["user_ids"].startswith("insecure") and plain.status_code == 200
    warnings = [line for line in err.decode().splitlines() if line.startswith("WARNING")]
    assert any("--insecure-user-ids" in line and "UNSIGNED" in line for line in warnings), err.decode()
    assert any("will not survive a restart" in line for line in warnings)  # no --user-secret-file


def test_behind_a_tls_proxy_the_user_cookie_is_secure(world, tmp_path):
    """The public set-up of docs/security.md: a reverse proxy on this machine terminates TLS and says so with
    X-Forwarded-Proto; uvicorn believes it from 127.0.0.1, so the signed cookie is marked Secure (and only then:
    over plain http a Secure cookie would never come back)."""
    secret = tmp_path / "user.secret"
    secret.write_text("s" * 64)
    secret.chmod(0o600)
    server, url = start_server(world, tmp_path / "events.sqlite", "--user-secret-file", str(secret))
    try:
        proxied = httpx.get(f"{url}/", headers={"X-Forwarded-Proto": "https"}, timeout=10)
        direct = httpx.get(f"{url}/", timeout=10)
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert proxied.status_code == direct.status_code == 200
    assert "secure" in proxied.headers["set-cookie"].lower().split("; ")
    assert "secure" not in direct.headers["set-cookie"].lower().split("; ")
    assert "httponly" in direct.headers["set-cookie"].lower().split("; ")


def oracle_feed(world, path):
    """The treatment's feed re-ranked by the ground truth: every image whose scene holds the topic's
    attributes first. Against it the experiment has a real effect to find."""
    shutil.copyfile(world.feeds[1], path)
    scenes = read_scenes(world.data)
    with sqlite3.connect(path) as db:
        for topic_id, title in db.execute("SELECT topic_id, title FROM topics").fetchall():
            want = parse_topic(title)
            shown = [i for (i,) in db.execute("SELECT image_id FROM feed_items WHERE topic_id = ? ORDER BY rank",
                                              (topic_id,))]
            matching = sorted(i for i, objects in scenes.items() if any(want.matches(o) for o in objects))
            ranked = (matching + [i for i in shown if i not in matching])[: len(shown)]
            db.execute("DELETE FROM feed_items WHERE topic_id = ?", (topic_id,))
            db.executemany("INSERT INTO feed_items VALUES (?, ?, ?, 0, 0)",
                           [(topic_id, rank, image_id) for rank, image_id in enumerate(ranked, 1)])


def test_an_experiment_end_to_end(world, tmp_path, capsys):
    # The server runs in a thread of this process (the SIGKILL test above covers the `interbert serve`
    # command itself); the simulator and the report run as a user would run them. The treatment ranks
    # by the truth, so the whole chain (feeds, assignment, clicks, log, statistics) must find its lift.
    events = tmp_path / "events.sqlite"
    oracle_feed(world, tmp_path / "oracle.sqlite")
    arms = [world.arms()[0], ArmSpec("treatment", world.indexes[1], tmp_path / "oracle.sqlite")]
    app = create_experiment_app(arms, (0.5, 0.5), "e2e", events, user_secret=SECRET)
    with single_torch_thread(), serve_in_thread(app) as url:
        with pytest.raises(UsageError, match="only sends traffic to this machine"):
            simulate("http://example.com:80", 5, world.data)
        result = simulate(url, users=60, data=world.data, max_requests=240, max_seconds=60, seed=3, k=8,
                          user_secret=SECRET)
        assert interbert_main(["abtest", "simulate", "--url", url, "--users", "5", "--data", str(world.data),
                               "--max-requests", "10", "--seed", "4", "--user-secret-file", secret_file(tmp_path)]) == 0
        assert "10 requests from 5 users" in capsys.readouterr().out
        # Without the secret the simulated users' plain ids are refused, in one line that says why.
        assert interbert_main(["abtest", "simulate", "--url", url, "--users", "2", "--data", str(world.data),
                               "--max-requests", "2"]) == 1
        assert "HTTP 401" in capsys.readouterr().err
    assert result.requests == 240 and set(result.by_arm) == {"control", "treatment"}
    assert result.clicks > 0 and result.rate_limited == 0
    out = tmp_path / "report.md"
    assert interbert_main(["abtest", "report", str(events), "--out", str(out)]) == 0
    report = out.read_text()
    assert "# A/B test report: e2e" in report and "| treatment | control |" in report
    assert "no mismatch" in report  # 65 users split by the hash fit 50/50
    built = build_report(events)
    arms = {arm.name: arm for arm in built.arms}
    lift = built.comparisons[0]
    assert lift.low > 0 and lift.p_value < 0.001, lift  # the truth-ranked arm wins, significantly
    first = {name: a.ctr_by_position[1][1] / a.ctr_by_position[1][0] for name, a in arms.items()}
    assert first["treatment"] > first["control"]
    assert arms["control"].users + arms["treatment"].users == 65  # 60 + 5 simulated users
    assert arms["control"].requests + arms["treatment"].requests == 250
    for arm, counts in result.by_arm.items():
        assert arms[arm].requests >= counts["requests"]
        assert arms[arm].clicks >= counts["clicks"]  # every acknowledged click of the first run is reported
        assert f"| {arm} | 50% | {arms[arm].users} | {arms[arm].requests} |" in report
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
