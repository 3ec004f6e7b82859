"""Topic feeds and the experiment service through FastAPI's test client: assignment, feeds, clicks."""

from __future__ import annotations

import json
import sqlite3

import pytest
from fastapi.testclient import TestClient

from conftest import single_torch_thread
from abtest_world import TOP_N, build_world
from interbert.cli import main as interbert_main
from interbert.errors import UsageError
from interbert.serve.abtest import ArmSpec, assign_arm
from interbert.serve.experiment import USER_COOKIE, create_experiment_app
from interbert.serve.service import MAX_BODY_BYTES, create_app
from interbert.serve.topics import Feed, read_topics

ARMS = ("control", "treatment")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def served(world, tmp_path_factory):
    events = tmp_path_factory.mktemp("events") / "events.sqlite"
    app = create_experiment_app(world.arms(), (0.5, 0.5), "exp", events)
    with single_torch_thread(), TestClient(app) as client:
        yield client, app, events


def users_of_each_arm(count=3):
    found = {arm: [] for arm in ARMS}
    n = 0
    while min(len(v) for v in found.values()) < count:
        user = f"user{n}"
        found[assign_arm(user, "exp", ARMS, (0.5, 0.5))].append(user)
        n += 1
    return found


def test_topics_lists_every_topic_of_the_file(served, world):
    client, _, _ = served
    expected = [{"topic_id": t.topic_id, "title": t.title} for t in read_topics(world.topics)]
    assert client.get("/topics").json() == expected


def test_a_topic_feed_is_the_users_arms_itm_ranking(served, world):
    client, app, _ = served
    topic = client.get("/topics").json()[0]
    for arm, users in users_of_each_arm().items():
        feed = Feed(world.feeds[ARMS.index(arm)])
        service = app.state.arms[arm].service
        # Offline feed = the online two-stage search (FAISS candidates, ITM re-rank) for the title.
        online = [hit.image_id for hit in service.search(topic["title"], TOP_N, rerank=True).results]
        for user in users:
            for _ in range(2):  # sticky: the same arm and items every time
                body = client.get(f"/topics/{topic['topic_id']}", params={"user": user}).json()
                assert body["arm"] == arm and body["title"] == topic["title"]
                assert [r["image_id"] for r in body["results"]] == [i.image_id for i in feed.items[topic["topic_id"]]]
                assert [r["image_id"] for r in body["results"]] == online
                assert [r["position"] for r in body["results"]] == list(range(1, TOP_N + 1))
    # The two arms' models differ, so their feeds do too: the experiment compares different rankings.
    feeds = [Feed(path).items[topic["topic_id"]] for path in world.feeds]
    assert [i.image_id for i in feeds[0]] != [i.image_id for i in feeds[1]]


def test_the_user_comes_from_the_header_then_the_query_then_the_cookie(served):
    client, _, _ = served
    users = users_of_each_arm(1)
    topic_id = client.get("/topics").json()[0]["topic_id"]
    control, treatment = users["control"][0], users["treatment"][0]
    header_wins = client.get(f"/topics/{topic_id}", params={"user": treatment}, headers={"X-User-Id": control})
    assert header_wins.json()["arm"] == "control"
    fresh = TestClient(client.app)  # a new browser (not entered: the app's lifespan belongs to `client`)
    first = fresh.get(f"/topics/{topic_id}")  # no id at all: one is made and set as a cookie
    cookie = first.cookies.get(USER_COOKIE)
    assert cookie and first.json()["arm"] == assign_arm(cookie, "exp", ARMS, (0.5, 0.5))
    assert all(fresh.get(f"/topics/{topic_id}").json()["arm"] == first.json()["arm"] for _ in range(3))
    assert USER_COOKIE not in fresh.get("/").cookies  # the page keeps the id the browser has
    assert USER_COOKIE in TestClient(client.app).get("/").cookies  # and gives a new browser one
    assert client.get(f"/topics/{topic_id}", headers={"X-User-Id": "x" * 129}).status_code == 422


def test_search_goes_through_the_assignment_and_is_logged(served):
    client, _, events = served
    for arm, users in users_of_each_arm(2).items():
        for user in users:
            body = client.post("/search", params={"user": user}, json={"query": "a red ball", "k": 4}).json()
            assert body["arm"] == arm and len(body["request_id"]) == 32 and len(body["results"]) == 4
    with sqlite3.connect(events) as db:
        row = db.execute("SELECT kind, query, arm FROM impressions WHERE request_id = ?", (body["request_id"],)).fetchone()
        shown = db.execute("SELECT COUNT(*) FROM impression_items WHERE request_id = ?", (body["request_id"],)).fetchone()
    assert row == ("search", "a red ball", "treatment") and shown == (4,)


def test_clicks_are_checked_against_what_the_request_showed(served):
    client, _, events = served
    topic_id = client.get("/topics").json()[0]["topic_id"]
    body = client.get(f"/topics/{topic_id}", params={"user": "clicker", "k": 3}).json()
    request_id, shown = body["request_id"], [r["image_id"] for r in body["results"]]
    assert len(shown) == 3
    not_shown = next(i.image_id for i in Feed(client.app.state.arms[body["arm"]].feed.path).items[topic_id][3:])

    def click(**payload):
        return client.post("/events/click", json=payload)

    assert click(request_id="0" * 32, image_id=shown[0]).status_code == 404
    assert click(request_id=request_id, image_id=not_shown).status_code == 422  # shown only below k
    assert click(request_id="not-an-id", image_id=shown[0]).status_code == 422
    assert click(request_id=request_id, image_id=shown[0], extra=1).status_code == 422
    assert click(request_id=request_id, image_id="x" * 513).status_code == 422
    big = client.post("/events/click", content=b'{"request_id": "' + b"0" * MAX_BODY_BYTES + b'"}',
                      headers={"content-type": "application/json"})
    assert big.status_code == 413
    first = click(request_id=request_id, image_id=shown[1])
    assert first.status_code == 200 and first.json() == {"request_id": request_id, "image_id": shown[1],
                                                         "position": 2, "counted": True}
    again = click(request_id=request_id, image_id=shown[1])
    assert again.status_code == 200 and again.json()["counted"] is False
    with sqlite3.connect(events) as db:
        assert db.execute("SELECT COUNT(*) FROM clicks WHERE request_id = ?", (request_id,)).fetchone() == (1,)


def test_unknown_topics_are_404(served):
    client, _, _ = served
    assert client.get("/topics/no-such-topic", params={"user": "u"}).status_code == 404


def test_the_single_index_service_is_unchanged(world):
    client = TestClient(create_app(world.indexes[0]))
    assert client.get("/topics").status_code == 404
    body = client.post("/search", json={"query": "a red ball", "k": 2}).json()
    assert "request_id" not in body and len(body["results"]) == 2


def test_feeds_resume_and_belong_to_one_model(world, tmp_path):
    lines = world.topics.read_text().splitlines()
    partial = tmp_path / "partial.txt"
    partial.write_text("\n".join(lines[:2]) + "\n")
    feed = tmp_path / "feed.sqlite"
    base = ["topics", "build", "--index", str(world.indexes[0]), "--out", str(feed), "--top", "3", "--no-progress"]
    assert interbert_main(base + ["--topics", str(partial)]) == 0
    first = Feed(feed).items
    assert interbert_main(base + ["--topics", str(world.topics)]) == 0
    resumed = Feed(feed)
    assert [t.title for t in resumed.topics] == lines and {k: resumed.items[k] for k in first} == first
    # Another model's index into the same feed: refused (a second model gets a second feed).
    other = ["topics", "build", "--index", str(world.indexes[1]), "--out", str(feed), "--topics", str(world.topics),
             "--top", "3", "--no-progress"]
    assert interbert_main(other) == 2


def test_json_lines_topics_in_chinese(world, tmp_path, capsys):
    topics = tmp_path / "topics.jsonl"
    topics.write_text(json.dumps({"topic_id": "red-ball", "title": "红色的球"}, ensure_ascii=False) + "\n"
                      + json.dumps({"topic_id": "cube", "title": "a blue cube"}) + "\n", encoding="utf-8")
    feed = tmp_path / "zh.sqlite"
    assert interbert_main(["topics", "build", "--topics", str(topics), "--index", str(world.indexes[0]),
                           "--out", str(feed), "--top", "4", "--no-progress"]) == 0
    built = Feed(feed)
    assert [(t.topic_id, t.title) for t in built.topics] == [("red-ball", "红色的球"), ("cube", "a blue cube")]
    assert len(built.items["red-ball"]) == 4
    topics.write_text('{"topic_id": "bad id!", "title": "x"}\n')
    assert interbert_main(["topics", "build", "--topics", str(topics), "--index", str(world.indexes[0]),
                           "--out", str(tmp_path / "bad.sqlite"), "--no-progress"]) == 1
    assert f"{topics}:1: topic_id" in capsys.readouterr().err


def test_bad_experiments_are_refused(world, tmp_path, capsys):
    swapped = [ArmSpec("control", world.indexes[0], world.feeds[1]), ArmSpec("treatment", world.indexes[1], world.feeds[0])]
    with pytest.raises(UsageError, match="built with the model"):
        create_experiment_app(swapped, (0.5, 0.5), "exp", tmp_path / "e.sqlite")
    one_feed = [ArmSpec("control", world.indexes[0], world.feeds[0]), ArmSpec("treatment", world.indexes[1])]
    with pytest.raises(UsageError, match="every arm a feed"):
        create_experiment_app(one_feed, (0.5, 0.5), "exp", tmp_path / "e.sqlite")
    index = str(world.indexes[0])
    capsys.readouterr()
    for argv in (["serve", f"--arm=control={index}"],
                 ["serve", "--index", index, f"--arm=a={index}", f"--arm=b={index}"],
                 ["serve", f"--arm=a={index}", f"--arm=b={index}", "--split", "50/50/0"],
                 ["serve"]):
        assert interbert_main(argv) == 2, argv
    assert all(line.startswith("error: ") for line in capsys.readouterr().err.strip().splitlines())


def test_a_model_other_than_the_indexs_is_one_error_line(world, tmp_path, capsys):
    code = interbert_main(["topics", "build", "--topics", str(world.topics), "--index", str(world.indexes[0]),
                           "--model", str(world.models[1]), "--out", str(tmp_path / "f.sqlite"), "--no-progress"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "f.sqlite").exists()  # refused before anything was written
