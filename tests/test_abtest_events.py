"""The event log: durable settings, clicks only on shown items by the user who was served, duplicates counted
once, safe across threads; arms bound to their hashes, a refused start writes nothing."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from interbert.errors import UsageError
from interbert.serve.events import (
    ArmHashes, EventLog, ExperimentConfig, NotShown, NotYours, UnknownRequest, read_arm_hashes,
)

CONFIG = ExperimentConfig("exp", "exp", ("control", "treatment"), (0.5, 0.5))


@pytest.fixture
def log(tmp_path):
    log = EventLog(tmp_path / "events.sqlite", CONFIG)
    yield log
    log.close()


def count(path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_the_log_is_wal_with_full_synchronous_commits(log):
    assert log._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert log._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: fsync on every commit


def test_an_impression_stores_its_items_with_positions(log):
    request_id = log.log_impression("u1", "control", "topic", ["a", "b", "c"], topic_id="t1")
    with sqlite3.connect(log.path) as db:
        items = db.execute("SELECT position, image_id FROM impression_items WHERE request_id = ? ORDER BY position",
                           (request_id,)).fetchall()
        row = db.execute("SELECT user_id, arm, kind, topic_id, query FROM impressions").fetchone()
    assert items == [(1, "a"), (2, "b"), (3, "c")]
    assert row == ("u1", "control", "topic", "t1", None)


def test_clicks_on_unknown_requests_or_items_not_shown_are_refused(log):
    request_id = log.log_impression("u1", "control", "search", ["a", "b"], query="dog")
    with pytest.raises(UnknownRequest):
        log.log_click("f" * 32, "a")
    with pytest.raises(NotShown):
        log.log_click(request_id, "z")
    assert count(log.path, "clicks") == 0
    assert log.log_click(request_id, "b") == (True, 2)


def test_a_duplicate_click_counts_once(log):
    request_id = log.log_impression("u1", "treatment", "topic", ["a", "b"], topic_id="t")
    assert log.log_click(request_id, "a") == (True, 1)
    assert log.log_click(request_id, "a") == (False, 1)
    assert count(log.path, "clicks") == 1
    other = log.log_impression("u1", "treatment", "topic", ["a", "b"], topic_id="t")
    assert log.log_click(other, "a") == (True, 1)  # the same item in another request is another click


def test_concurrent_impressions_and_clicks_are_all_stored_once(log):
    threads, per_thread = 8, 40
    start = threading.Barrier(threads)

    def traffic(n: int) -> list[bool]:
        start.wait()
        counted = []
        for i in range(per_thread):
            request_id = log.log_impression(f"user{n}", "control", "topic", ["a", "b", "c"], topic_id="t")
            counted.append(log.log_click(request_id, "b")[0])
            counted.append(log.log_click(request_id, "b")[0])  # the duplicate
        return counted

    with ThreadPoolExecutor(threads) as pool:
        results = [c for counted in pool.map(traffic, range(threads)) for c in counted]
    assert results.count(True) == results.count(False) == threads * per_thread
    assert count(log.path, "impressions") == threads * per_thread
    assert count(log.path, "clicks") == threads * per_thread


def test_concurrent_duplicates_of_one_click_count_once(log):
    request_id = log.log_impression("u", "control", "topic", ["a"], topic_id="t")
    start = threading.Barrier(16)

    def click(_):
        start.wait()
        return log.log_click(request_id, "a")[0]

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(click, range(16))) == 1


def test_a_log_of_another_experiment_is_refused(tmp_path, log):
    log.log_impression("u", "control", "topic", ["a"], topic_id="t")
    for other in (ExperimentConfig("exp2", "exp2", CONFIG.arms, CONFIG.split),
                  ExperimentConfig("exp", "exp", CONFIG.arms, (0.9, 0.1)),
                  ExperimentConfig("exp", "exp", ("control", "b"), CONFIG.split)):
        with pytest.raises(UsageError, match="another --events file"):
            EventLog(log.path, other)
    EventLog(log.path, CONFIG).close()  # the same experiment reopens its log (a server restart)
    assert count(log.path, "impressions") == 1


_WORKER = r"""
import json, sys, time
from pathlib import Path
from interbert.serve.events import EventLog, ExperimentConfig
path, start, phase, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
while not start.exists():  # every process opens the log at the same moment
    time.sleep(0.001)
log = EventLog(path, ExperimentConfig("exp", "exp", ("control", "treatment"), (0.5, 0.5)))
if phase == "show":
    ids = [log.log_impression(f"{name}-u{i}", "control", "topic", ["a", "b"], topic_id="t") for i in range(25)]
    print(json.dumps(ids))
else:  # click every request given on stdin, each item once
    counted = [log.log_click(r, image)[0] for r in json.loads(sys.stdin.read()) for image in ("a", "b")]
    print(json.dumps(sum(counted)))
log.close()
"""


def test_several_server_processes_share_one_log(tmp_path):
    """Uvicorn with --workers N (or two `serve` processes on one --events file) write one SQLite log from
    several processes: every impression is kept, and a click two processes record at once counts once."""
    import json
    import os
    import sqlite3
    import subprocess
    import sys
    import time

    from conftest import REPO

    db, env = tmp_path / "events.sqlite", {**os.environ, "PYTHONPATH": str(REPO / "src")}

    def run_phase(phase: str, inputs: list[str] | None = None) -> list[str]:
        start = tmp_path / f"start-{phase}"
        procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(db), str(start), phase, f"p{k}"], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k in range(4)]
        time.sleep(0.5)
        start.touch()
        outs = []
        for k, p in enumerate(procs):
            out, err = p.communicate(inputs[k] if inputs else "", timeout=120)
            assert p.returncode == 0, err
            outs.append(out)
        return outs

    shown = [json.loads(out) for out in run_phase("show")]
    every = [r for ids in shown for r in ids]
    assert len(every) == len(set(every)) == 100
    # each request is clicked by two processes at once; the second click on an item must not count
    pairs = [json.dumps(shown[k] + shown[(k + 1) % 4]) for k in range(4)]
    counted = sum(json.loads(out) for out in run_phase("click", pairs))
    db_rows = sqlite3.connect(db)
    assert db_rows.execute("SELECT COUNT(*) FROM impressions").fetchone()[0] == 100
    assert db_rows.execute("SELECT COUNT(*) FROM impression_items").fetchone()[0] == 200
    clicks = db_rows.execute("SELECT COUNT(*) FROM clicks").fetchone()[0]
    assert counted == clicks == 200  # 100 requests x 2 items, each clicked by two processes, counted once


def test_servers_opening_a_new_log_at_once_all_start(tmp_path):
    """Several servers (or workers) started together on one new --events file: switching the file to WAL
    can be answered "database is locked" at once, whatever the timeout (SQLite will not wait on a lock it
    could deadlock on). Every opener must still start. 8 connections at a time on 100 new files: before
    the retry, 1-2% of the opens failed."""
    failures = []
    for round_ in range(100):
        path, barrier = tmp_path / f"events{round_}.sqlite", threading.Barrier(8)

        def open_log():
            barrier.wait()
            try:
                EventLog(path, CONFIG).close()
            except Exception as e:  # noqa: BLE001 - the test reports every failure
                failures.append(repr(e))

        threads = [threading.Thread(target=open_log) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []


def test_a_click_from_another_user_is_refused_and_not_counted(log):
    request_id = log.log_impression("user-a", "control", "topic", ["a", "b"], topic_id="t")
    with pytest.raises(NotYours, match="served to another user"):
        log.log_click(request_id, "a", "user-b")
    assert count(log.path, "clicks") == 0
    assert log.log_click(request_id, "a", "user-a") == (True, 1)


def hashes(weights="w" * 64, index="i" * 64, feed="f" * 64, model="/models/a") -> ArmHashes:
    return ArmHashes(model=model, weights_sha256=weights, index_sha256=index, feed_sha256=feed)


ARMS = {"control": hashes(), "treatment": hashes(weights="v" * 64, model="/models/b")}


def log_state(path) -> tuple[bytes, list]:
    """The main file's bytes and every row (read through a read-only connection, which replays a WAL)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = [db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
                for table in ("experiment", "impressions", "impression_items", "clicks")]
    finally:
        db.close()
    return path.read_bytes(), rows


@pytest.mark.parametrize("changed, named", [
    ({"weights": "x" * 64}, "weights sha256"),
    ({"index": "x" * 64}, "index sha256"),
    ({"feed": "x" * 64}, "feed sha256"),
])
def test_an_arm_whose_hashes_differ_from_the_logs_is_refused_writing_nothing(tmp_path, changed, named):
    path = tmp_path / "events.sqlite"
    first = EventLog(path, CONFIG, ARMS)
    assert not first.upgraded
    request_id = first.log_impression("u", "treatment", "topic", ["a"], topic_id="t")
    first.log_click(request_id, "a", "u")
    first.close()
    before = log_state(path)
    other = {**ARMS, "treatment": hashes(**{"weights": "v" * 64, "model": "/models/c", **changed})}
    with pytest.raises(UsageError) as refused:
        EventLog(path, CONFIG, other)
    message = str(refused.value)
    recorded = getattr(ARMS["treatment"], named.replace(" ", "_"))
    assert "'treatment'" in message and named in message and recorded in message and "x" * 64 in message
    assert "\n" not in message
    assert log_state(path) == before
    EventLog(path, CONFIG, dict(ARMS)).close()  # the same arms (a restart) are welcome
    moved = {**ARMS, "control": hashes(model="/elsewhere/a")}  # a moved folder with the same weights is the same arm
    EventLog(path, CONFIG, moved).close()


def test_a_log_from_before_arm_hashes_is_upgraded_not_refused(tmp_path):
    path = tmp_path / "events.sqlite"
    old = EventLog(path, CONFIG)  # as written before arms were bound: no hashes
    old.log_impression("u", "control", "topic", ["a"], topic_id="t")
    old.close()
    upgraded = EventLog(path, CONFIG, ARMS)
    assert upgraded.upgraded
    upgraded.close()
    with sqlite3.connect(path) as db:
        assert read_arm_hashes(db) == ARMS
        assert db.execute("SELECT COUNT(*) FROM impressions").fetchone() == (1,)
    again = EventLog(path, CONFIG, ARMS)
    assert not again.upgraded  # recorded once
    again.close()


def test_another_experiment_on_a_log_is_refused_before_any_write(tmp_path, log):
    log.log_impression("u", "control", "topic", ["a"], topic_id="t")
    log.close()
    before = log_state(log.path)
    with pytest.raises(UsageError, match="another --events file"):
        EventLog(log.path, ExperimentConfig("exp2", "exp2", CONFIG.arms, CONFIG.split), ARMS)
    assert log_state(log.path) == before


def test_a_file_that_is_not_a_log_is_refused_as_events(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 200)
    with pytest.raises(UsageError, match="is not an event log"):
        EventLog(junk, CONFIG, ARMS)
    assert junk.read_bytes() == b"not a database" * 200


def test_a_refused_start_leaves_a_running_servers_wal_alone(tmp_path):
    """A server still runs (or was killed) with events in its WAL: a refused start beside it must neither
    checkpoint them into the main file nor change a row."""
    path = tmp_path / "events.sqlite"
    running = EventLog(path, CONFIG, ARMS)
    try:
        for n in range(5):
            running.log_impression(f"u{n}", "control", "topic", ["a", "b"], topic_id="t")
        wal = path.with_name(path.name + "-wal")
        before, wal_before = log_state(path), wal.read_bytes()
        assert len(wal_before) > 0  # the events are in the WAL, not yet in the main file
        with pytest.raises(UsageError, match="'control'"):
            EventLog(path, CONFIG, {**ARMS, "control": hashes(weights="x" * 64)})
        assert log_state(path) == before and wal.read_bytes() == wal_before
    finally:
        running.close()
