"""Operating the A/B service (issue 24): GET /metrics per arm, events written and failed, clicks refused by
reason, the access log's arm and hashed user, and an event log that cannot store events: answered 503 with
Retry-After (never a 500, never a click acknowledged and not stored), readiness 503 naming it, and recovery."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import single_torch_thread
from abtest_world import build_world
from interbert.serve.abtest import assign_arm
from interbert.serve.experiment import create_experiment_app
from interbert.serve.identity import sign_user_id

ARMS = ("control", "treatment")
SECRET = b"o" * 40


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def scrape(client) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name: str, **labels) -> float:
    """The sum of ``name``'s samples that carry ``labels`` (0 when none does)."""
    return sum(v for (n, sample_labels), v in samples.items() if n == name and labels.items() <= dict(sample_labels).items())


def user_of(arm: str, prefix: str) -> str:
    n = 0
    while assign_arm(f"{prefix}{n}", "ops", ARMS, (0.5, 0.5)) != arm:
        n += 1
    return f"{prefix}{n}"


def as_user(user: str) -> dict[str, str]:
    return {"X-User-Id": sign_user_id(user, SECRET)}


def test_metrics_count_requests_per_arm_events_and_refused_clicks(world, tmp_path):
    lines: list[dict] = []
    app = create_experiment_app(world.arms(), (0.5, 0.5), "ops", tmp_path / "events.sqlite", user_secret=SECRET,
                                request_clicks_per_minute=3, access_log=lines.append)
    users = {arm: user_of(arm, "metrics-user") for arm in ARMS}
    with single_torch_thread(), TestClient(app) as client:
        topic_id = client.get("/topics").json()[0]["topic_id"]
        feeds = {}
        for arm, user in users.items():
            feeds[arm] = client.get(f"/topics/{topic_id}", headers=as_user(user)).json()
            assert feeds[arm]["arm"] == arm
            assert client.post("/search", json={"query": "a private query", "k": 3}, headers=as_user(user)).status_code == 200
        request_id = feeds["control"]["request_id"]
        shown = [item["image_id"] for item in feeds["control"]["results"]]

        def click(user_headers, image_id, request=request_id):
            return client.post("/events/click", json={"request_id": request, "image_id": image_id},
                               headers=user_headers).status_code

        control = as_user(users["control"])
        assert click(as_user(users["treatment"]), shown[0]) == 403  # another user's request
        assert click(control, shown[0]) == 200
        assert click(control, shown[0]) == 200  # a repeat: acknowledged, stored once
        assert click(control, shown[1]) == 429  # the fourth click on one request within a minute
        assert click({"X-User-Id": users["control"]}, shown[0]) == 401  # unsigned
        assert click(control, shown[0], request="0" * 32) == 404
        samples = scrape(client)

    for arm in ARMS:
        assert value(samples, "interbert_http_requests_total", route="/topics/{topic_id}", arm=arm, status="200") == 1
        assert value(samples, "interbert_http_requests_total", route="/search", arm=arm, status="200") == 1
    assert value(samples, "interbert_http_requests_total", route="/events/click", status="200") == 2
    assert value(samples, "interbert_http_requests_total", route="/topics", arm="") == 1
    assert value(samples, "interbert_events_written_total", kind="impression") == 4
    assert value(samples, "interbert_events_written_total", kind="click") == 1  # the repeat is not a new event
    assert value(samples, "interbert_events_failed_total") == 0
    refused = {dict(labels)["reason"]: v for (name, labels), v in samples.items()
               if name == "interbert_clicks_refused_total"}
    assert refused == {"request_rate_limit": 1, "not_yours": 1, "unsigned_user": 1, "unknown_request": 1}
    arms_info = {dict(labels)["arm"]: dict(labels) for (name, labels) in samples if name == "interbert_arm_info"}
    assert set(arms_info) == set(ARMS) and arms_info["control"]["share"] == "0.5"
    assert arms_info["control"]["weights_sha256"] != arms_info["treatment"]["weights_sha256"]
    (service,) = [dict(labels) for (name, labels) in samples if name == "interbert_service_info"]
    assert service["experiment"] == "ops" and service["arms"] == "control,treatment"

    # The access log: each arm's requests carry the arm and the user's hash; never the id, never the query.
    topic_lines = [line for line in lines if line["route"] == "/topics/{topic_id}"]
    assert {(line["arm"], line["user"]) for line in topic_lines} == {
        (arm, hashlib.sha256(user.encode()).hexdigest()[:12]) for arm, user in users.items()}
    logged = json.dumps(lines)
    assert not any(user in logged for user in users.values()) and "private" not in logged


@pytest.fixture
def locked_store(world, tmp_path):
    """An app whose event log waits 0.2 s for a lock, and a switch that makes another connection hold the
    log's write lock (BEGIN EXCLUSIVE), as a second process stuck in a transaction would."""
    events = tmp_path / "events.sqlite"
    app = create_experiment_app(world.arms(), (0.5, 0.5), "ops", events, user_secret=SECRET, events_busy_wait=0.2)
    other = sqlite3.connect(events, isolation_level=None, timeout=0)
    with single_torch_thread(), TestClient(app) as client:
        yield client, events, other
    other.close()


def test_an_unavailable_event_store_answers_503_and_acknowledges_nothing(locked_store):
    client, events, other = locked_store
    user = as_user("stuck-user")
    topic_id = client.get("/topics").json()[0]["topic_id"]
    feed = client.get(f"/topics/{topic_id}", headers=user).json()
    image_id = feed["results"][0]["image_id"]
    assert client.get("/health/ready").status_code == 200

    other.execute("BEGIN EXCLUSIVE")
    try:
        clicked = client.post("/events/click", json={"request_id": feed["request_id"], "image_id": image_id},
                              headers=user)
        topic = client.get(f"/topics/{topic_id}", headers=user)
        search = client.post("/search", json={"query": "a red ball", "k": 2}, headers=user)
        ready = client.get("/health/ready")
        live = client.get("/health/live")
    finally:
        other.execute("ROLLBACK")

    for refused in (clicked, topic, search):
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert "event log" in refused.json()["detail"]
    assert ready.status_code == 503 and live.status_code == 200
    checks = ready.json()["checks"]
    assert "locked" in checks["events"] and checks["control.model"] == checks["treatment.index"] == "ok"
    with sqlite3.connect(events) as db:  # nothing of the refused requests was stored
        assert db.execute("SELECT COUNT(*) FROM clicks").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM impressions").fetchone() == (1,)
    samples = scrape(client)
    assert value(samples, "interbert_events_failed_total", kind="click") == 1
    assert value(samples, "interbert_events_failed_total", kind="impression") == 2
    assert value(samples, "interbert_http_requests_total", route="/events/click", status="503") == 1
    assert value(samples, "interbert_http_requests_total", status="500") == 0

    # The lock is gone: ready again, and the same click is stored and acknowledged.
    assert client.get("/health/ready").status_code == 200
    again = client.post("/events/click", json={"request_id": feed["request_id"], "image_id": image_id}, headers=user)
    assert again.status_code == 200 and again.json()["counted"] is True
    with sqlite3.connect(events) as db:
        assert db.execute("SELECT COUNT(*) FROM clicks").fetchone() == (1,)


def test_readiness_names_an_event_log_removed_while_serving(locked_store, tmp_path):
    client, events, _ = locked_store
    moved = tmp_path / "moved.sqlite"
    events.rename(moved)  # the connection still writes the moved file: events nobody would read at `events`
    try:
        ready = client.get("/health/ready")
    finally:
        moved.rename(events)
    assert ready.status_code == 503 and "not the file this server opened" in ready.json()["checks"]["events"]
    assert client.get("/health/ready").status_code == 200
