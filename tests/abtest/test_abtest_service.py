"""Topic feeds and the experiment service through FastAPI's test client: assignment, feeds, clicks, signed
user ids, click limits, and arms bound to their hashes."""

from __future__ import annotations

import json
import sqlite3

import pytest
from fastapi.testclient import TestClient

from conftest import single_torch_thread
from abtest_world import TOP_N, build_world
from interbert.cli import main as interbert_main
from interbert.errors import UsageError
from interbert.serve.abtest import ArmSpec, assign_arm, index_sha256
from interbert.serve.events import EventLog, ExperimentConfig, read_arm_hashes
from interbert.serve.experiment import USER_COOKIE, create_experiment_app
from interbert.serve.identity import read_secret_file, sign_user_id, verify_user_token
from interbert.serve.service import MAX_BODY_BYTES, create_app
from interbert.serve.topics import Feed, read_topics
from interbert.utils.files import file_sha256

ARMS = ("control", "treatment")
SECRET = b"s" * 40


def signed(user: str, secret: bytes = SECRET) -> str:
    return sign_user_id(user, secret)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def served(world, tmp_path_factory):
    events = tmp_path_factory.mktemp("events") / "events.sqlite"
    app = create_experiment_app(world.arms(), (0.5, 0.5), "exp", events, user_secret=SECRET)
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
                body = client.get(f"/topics/{topic['topic_id']}", params={"user": signed(user)}).json()
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
    header_wins = client.get(f"/topics/{topic_id}", params={"user": signed(treatment)},
                             headers={"X-User-Id": signed(control)})
    assert header_wins.json()["arm"] == "control"
    fresh = TestClient(client.app)  # a new browser (not entered: the app's lifespan belongs to `client`)
    first = fresh.get(f"/topics/{topic_id}")  # no id at all: one is made and set as a cookie
    cookie = first.cookies.get(USER_COOKIE)
    user = verify_user_token(cookie, SECRET)  # the cookie is the id signed with the server's secret
    assert user and first.json()["arm"] == assign_arm(user, "exp", ARMS, (0.5, 0.5))
    assert all(fresh.get(f"/topics/{topic_id}").json()["arm"] == first.json()["arm"] for _ in range(3))
    assert USER_COOKIE not in fresh.get("/").cookies  # the page keeps the id the browser has
    assert USER_COOKIE in TestClient(client.app).get("/").cookies  # and gives a new browser one
    assert client.get(f"/topics/{topic_id}", headers={"X-User-Id": signed("x" * 129)}).status_code == 422


def test_search_goes_through_the_assignment_and_is_logged(served):
    client, _, events = served
    for arm, users in users_of_each_arm(2).items():
        for user in users:
            body = client.post("/search", params={"user": signed(user)}, json={"query": "a red ball", "k": 4}).json()
            assert body["arm"] == arm and len(body["request_id"]) == 32 and len(body["results"]) == 4
    with sqlite3.connect(events) as db:
        row = db.execute("SELECT kind, query, arm FROM impressions WHERE request_id = ?", (body["request_id"],)).fetchone()
        shown = db.execute("SELECT COUNT(*) FROM impression_items WHERE request_id = ?", (body["request_id"],)).fetchone()
    assert row == ("search", "a red ball", "treatment") and shown == (4,)


def test_clicks_are_checked_against_what_the_request_showed(served):
    client, _, events = served
    topic_id = client.get("/topics").json()[0]["topic_id"]
    clicker = {"X-User-Id": signed("clicker")}
    body = client.get(f"/topics/{topic_id}", params={"k": 3}, headers=clicker).json()
    request_id, shown = body["request_id"], [r["image_id"] for r in body["results"]]
    assert len(shown) == 3
    not_shown = next(i.image_id for i in Feed(client.app.state.arms[body["arm"]].feed.path).items[topic_id][3:])

    def click(**payload):
        return client.post("/events/click", json=payload, headers=clicker)

    assert click(request_id="0" * 32, image_id=shown[0]).status_code == 404
    assert click(request_id=request_id, image_id=not_shown).status_code == 422  # shown only below k
    assert click(request_id="not-an-id", image_id=shown[0]).status_code == 422
    assert click(request_id=request_id, image_id=shown[0], extra=1).status_code == 422
    assert click(request_id=request_id, image_id="x" * 513).status_code == 422
    big = client.post("/events/click", content=b'{"request_id": "' + b"0" * MAX_BODY_BYTES + b'"}',
                      headers={"content-type": "application/json", **clicker})
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
    assert client.get("/topics/no-such-topic", params={"user": signed("u")}).status_code == 404


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


def count_rows(events, sql: str, *args) -> int:
    with sqlite3.connect(events) as db:
        return db.execute(sql, args).fetchone()[0]


def test_a_click_from_another_user_is_refused_and_not_counted(served):
    client, _, events = served
    topic_id = client.get("/topics").json()[0]["topic_id"]
    served_to_a = client.get(f"/topics/{topic_id}", params={"k": 3}, headers={"X-User-Id": signed("user-a")}).json()
    request_id, image_id = served_to_a["request_id"], served_to_a["results"][0]["image_id"]
    payload = {"request_id": request_id, "image_id": image_id}
    forged = client.post("/events/click", json=payload, headers={"X-User-Id": signed("user-b")})
    assert forged.status_code == 403 and "another user" in forged.json()["detail"]
    browser = TestClient(client.app)  # a browser with its own cookie user, not user-a
    browser.get("/")
    assert browser.post("/events/click", json=payload).status_code == 403
    nobody = client.post("/events/click", json=payload, headers={"X-User-Id": ""})
    assert nobody.status_code in (401, 422)
    assert TestClient(client.app).post("/events/click", json=payload).status_code == 401  # no id at all
    assert count_rows(events, "SELECT COUNT(*) FROM clicks WHERE request_id = ?", request_id) == 0
    own = client.post("/events/click", json=payload, headers={"X-User-Id": signed("user-a")})
    assert own.status_code == 200 and own.json()["counted"] is True
    with sqlite3.connect(events) as db:
        assert db.execute("SELECT i.user_id FROM clicks c JOIN impressions i USING (request_id) "
                          "WHERE c.request_id = ?", (request_id,)).fetchall() == [("user-a",)]


def test_unsigned_or_forged_user_ids_are_refused(served):
    client, _, events = served
    topic_id = client.get("/topics").json()[0]["topic_id"]
    before = count_rows(events, "SELECT COUNT(*) FROM impressions")
    plain_header = client.get(f"/topics/{topic_id}", headers={"X-User-Id": "user-a"})
    assert plain_header.status_code == 401 and "--insecure-user-ids" in plain_header.json()["detail"]
    assert client.get(f"/topics/{topic_id}", params={"user": "user-a"}).status_code == 401
    assert client.post("/search", params={"user": "user-a"}, json={"query": "a red ball"}).status_code == 401
    other_secret = client.get(f"/topics/{topic_id}", headers={"X-User-Id": signed("user-a", b"t" * 40)})
    assert other_secret.status_code == 403 and "signature" in other_secret.json()["detail"]
    good = signed("user-a")
    moved = "user-b." + good.rpartition(".")[2]  # user-a's signature under another id
    assert client.get(f"/topics/{topic_id}", headers={"X-User-Id": moved}).status_code == 403
    assert client.get(f"/topics/{topic_id}", params={"user": moved}).status_code == 403
    assert client.get("/", params={"user": "user-a"}).status_code == 401
    assert count_rows(events, "SELECT COUNT(*) FROM impressions") == before  # nothing was logged for them
    assert client.get("/health").json()["user_ids"] == "signed"


def test_a_signed_cookie_round_trip(served):
    client, _, events = served
    topic_id = client.get("/topics").json()[0]["topic_id"]
    browser = TestClient(client.app)
    page = browser.get("/")
    set_cookie = page.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "samesite=lax" in set_cookie.lower()
    user = verify_user_token(page.cookies[USER_COOKIE], SECRET)
    assert user is not None
    feed = browser.get(f"/topics/{topic_id}", params={"k": 2}).json()
    assert feed["arm"] == assign_arm(user, "exp", ARMS, (0.5, 0.5))
    assert count_rows(events, "SELECT COUNT(*) FROM impressions WHERE request_id = ? AND user_id = ?",
                      feed["request_id"], user) == 1
    clicked = browser.post("/events/click", json={"request_id": feed["request_id"],
                                                  "image_id": feed["results"][1]["image_id"]})
    assert clicked.status_code == 200 and clicked.json()["counted"] is True
    # A cookie the server did not sign (a forged one, or one from before a restart with a new per-process
    # secret) is not believed: the browser is a new user with a fresh signed id.
    forged = TestClient(client.app, cookies={USER_COOKIE: "victim." + "0" * 64})
    answer = forged.get(f"/topics/{topic_id}", params={"k": 1})
    fresh = verify_user_token(answer.cookies[USER_COOKIE], SECRET)
    assert answer.status_code == 200 and fresh not in (None, "victim")
    assert count_rows(events, "SELECT COUNT(*) FROM impressions WHERE user_id = 'victim'") == 0
    assert count_rows(events, "SELECT COUNT(*) FROM impressions WHERE request_id = ? AND user_id = ?",
                      answer.json()["request_id"], fresh) == 1


def test_insecure_user_ids_accept_plain_ids_and_say_so(world, tmp_path, caplog):
    events = tmp_path / "events.sqlite"
    with caplog.at_level("WARNING"):
        app = create_experiment_app(world.arms(), (0.5, 0.5), "exp", events, insecure_user_ids=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("--insecure-user-ids" in w and "UNSIGNED" in w for w in warnings)
    assert any("will not survive a restart" in w for w in warnings)  # no secret given: a per-process one
    with single_torch_thread(), TestClient(app) as client:
        health = client.get("/health").json()
        assert health["user_ids"].startswith("insecure") and health["user_secret"].startswith("per-process")
        topic_id = client.get("/topics").json()[0]["topic_id"]
        body = client.get(f"/topics/{topic_id}", params={"user": "plain", "k": 2}).json()
        assert body["arm"] == assign_arm("plain", "exp", ARMS, (0.5, 0.5))
        payload = {"request_id": body["request_id"], "image_id": body["results"][0]["image_id"]}
        assert client.post("/events/click", json=payload, headers={"X-User-Id": "other"}).status_code == 403
        assert client.post("/events/click", json=payload, headers={"X-User-Id": "plain"}).json()["counted"] is True


def test_clicks_are_rate_limited_per_user_and_per_request(world, tmp_path):
    events = tmp_path / "events.sqlite"
    app = create_experiment_app(world.arms(), (0.5, 0.5), "exp", events, user_secret=SECRET,
                                user_clicks_per_minute=4, request_clicks_per_minute=2)
    with single_torch_thread(), TestClient(app) as client:
        topic_id = client.get("/topics").json()[0]["topic_id"]

        def feed(user, k):
            return client.get(f"/topics/{topic_id}", params={"k": k}, headers={"X-User-Id": signed(user)}).json()

        def click(user, body, position):
            return client.post("/events/click", headers={"X-User-Id": signed(user)},
                               json={"request_id": body["request_id"], "image_id": body["results"][position]["image_id"]})

        one = feed("reader", 3)  # one request: its third click within the minute is over the per-request limit
        assert [click("reader", one, p).status_code for p in range(3)] == [200, 200, 429]
        limited = click("reader", one, 2)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert "this request" in limited.json()["detail"]
        # Another user, one click per request: the fifth click in the minute is over the per-user limit.
        codes = [click("fast", feed("fast", 1), 0).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 200, 429]
        assert "this user" in click("fast", feed("fast", 1), 0).json()["detail"]
        assert client.get("/health").json()["clicks_per_minute"] == {"user": 4, "request": 2}
    assert count_rows(events, "SELECT COUNT(*) FROM clicks WHERE request_id = ?", one["request_id"]) == 2
    assert count_rows(events, "SELECT COUNT(*) FROM clicks") == 6  # 2 + 4: no refused click was stored


def log_state(path) -> tuple[bytes, list]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = [db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                for t in ("experiment", "impressions", "impression_items", "clicks")]
    finally:
        db.close()
    return path.read_bytes(), rows


def test_swapped_arms_on_an_existing_log_are_refused_in_one_line(world, tmp_path, capsys):
    events = tmp_path / "events.sqlite"
    app = create_experiment_app(world.arms(), (0.5, 0.5), "bound", events, user_secret=SECRET)
    with single_torch_thread(), TestClient(app) as client:
        topic_id = client.get("/topics").json()[0]["topic_id"]
        for user in ("u1", "u2", "u3"):
            body = client.get(f"/topics/{topic_id}", headers={"X-User-Id": signed(user)}).json()
            client.post("/events/click", headers={"X-User-Id": signed(user)},
                        json={"request_id": body["request_id"], "image_id": body["results"][0]["image_id"]})
    before = log_state(events)
    weights = [json.loads((index / "index.json").read_text())["weights_sha256"] for index in world.indexes]
    swapped = [f"--arm=control={world.indexes[1]},{world.feeds[1]}", f"--arm=treatment={world.indexes[0]},{world.feeds[0]}"]
    capsys.readouterr()
    with single_torch_thread():
        code = interbert_main(["serve", *swapped, "--experiment", "bound", "--events", str(events)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = err.strip().splitlines()  # refused from the files' hashes, before any model loads: nothing else
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert "arm 'control'" in errors[0] and weights[0] in errors[0] and weights[1] in errors[0]
    assert log_state(events) == before  # the main file's bytes and every row
    # The report names what each arm was bound to.
    assert interbert_main(["abtest", "report", str(events), "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    for n, arm in enumerate(ARMS):
        assert f"| {arm} | {world.models[n].resolve()} | {weights[n]} | {index_sha256(world.indexes[n])} | " \
               f"{file_sha256(world.feeds[n])} |" in out


def test_a_log_from_before_arm_hashes_is_upgraded_with_a_log_line(world, tmp_path, caplog):
    events = tmp_path / "events.sqlite"
    EventLog(events, ExperimentConfig("old", "old", ARMS, (0.5, 0.5))).close()  # no hashes, as before
    with caplog.at_level("WARNING"):
        create_experiment_app(world.arms(), (0.5, 0.5), "old", events, user_secret=SECRET)
    assert any("recorded the arms' weights, index and feed hashes" in r.getMessage() for r in caplog.records)
    with sqlite3.connect(events) as db:
        assert set(read_arm_hashes(db)) == set(ARMS)


def test_the_user_secret_file_is_checked(world, tmp_path, capsys):
    good = tmp_path / "secret"
    good.write_text("k" * 40 + "\n")
    good.chmod(0o600)
    assert read_secret_file(good) == b"k" * 40
    short = tmp_path / "short"
    short.write_text("tooshort")
    short.chmod(0o600)
    readable = tmp_path / "readable"
    readable.write_text("k" * 40)
    readable.chmod(0o644)
    for path, message in ((short, "at least 32"), (readable, "chmod 600"), (tmp_path / "none", "cannot read"),
                          (tmp_path, "not a regular file")):
        with pytest.raises(UsageError, match=message):
            read_secret_file(path)
        capsys.readouterr()
        code = interbert_main(["serve", *world.arm_flags(), "--events", str(tmp_path / "e.sqlite"),
                               "--user-secret-file", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0]
    assert not (tmp_path / "e.sqlite").exists()
