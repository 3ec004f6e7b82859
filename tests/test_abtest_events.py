"""The event log: durable settings, clicks only on shown items, duplicates counted once, safe across threads."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from interbert.errors import UsageError
from interbert.serve.events import EventLog, ExperimentConfig, NotShown, UnknownRequest

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
