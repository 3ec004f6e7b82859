"""The event log: durable settings, clicks only on shown items by the user who was served, duplicates counted
once, safe across threads; arms bound to their hashes, a refused start writes nothing; schema versions.

The tests of the interface run on both engines (``store``: an SQLite file, or a fresh database on a real
PostgreSQL server started by the test session, see tests/helpers/postgres_server.py)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from interbert.errors import UsageError
from interbert.serve.events import (
    SCHEMA, SCHEMA_VERSION, ArmHashes, EventLog, ExperimentConfig, NotShown, NotYours, UnknownRequest,
    open_event_store, read_arm_hashes,
)

CONFIG = ExperimentConfig("exp", "exp", ("control", "treatment"), (0.5, 0.5))


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """Where a new event store lives: an SQLite file's path, or a PostgreSQL URI of an empty database."""
    if request.param == "sqlite":
        return tmp_path / "events.sqlite"
    return request.getfixturevalue("postgres_uri")


@pytest.fixture
def log(store):
    log = open_event_store(store, CONFIG)
    yield log
    log.close()


def rows(store, sql: str) -> list[tuple]:
    """``sql``'s rows, read apart from the store under test (its own connection; SQLite's read-only, which
    replays the WAL without writing)."""
    if isinstance(store, Path):
        db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()
    import psycopg

    with psycopg.connect(store) as db:
        return [tuple(row) for row in db.execute(sql).fetchall()]


def execute(store, sql: str) -> None:
    """Change a store behind its engine's back (an old or a newer interbert's store)."""
    if isinstance(store, Path):
        with contextlib.closing(sqlite3.connect(store)) as db, db:
            db.executescript(sql)
        return
    import psycopg

    with psycopg.connect(store, autocommit=True) as db:
        for statement in sql.split(";"):
            if statement.strip():
                db.execute(statement)


def count(store, table: str) -> int:
    return rows(store, f"SELECT COUNT(*) FROM {table}")[0][0]


def test_the_log_is_wal_with_full_synchronous_commits(tmp_path):
    log = EventLog(tmp_path / "events.sqlite", CONFIG)
    try:
        assert log._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert log._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: fsync on every commit
    finally:
        log.close()


def test_postgres_commits_wait_for_the_wal_flush_even_on_a_server_configured_otherwise(postgres_uri):
    """synchronous_commit=off on the server (or the database) would acknowledge events a crash can lose:
    the store's own connections set it back on."""
    execute(postgres_uri, f"ALTER DATABASE {postgres_uri.rsplit('/', 1)[1]} SET synchronous_commit = off")
    log = open_event_store(postgres_uri, CONFIG)
    try:
        with log._connections.connection(5) as db:
            assert db.execute("SHOW synchronous_commit").fetchone()[0] == "on"
            assert db.autocommit  # every event is its own explicit transaction (BEGIN ... COMMIT)
    finally:
        log.close()


def test_an_impression_stores_its_items_with_positions(store, log):
    request_id = log.log_impression("u1", "control", "topic", ["a", "b", "c"], topic_id="t1")
    items = rows(store, f"SELECT position, image_id FROM impression_items WHERE request_id = '{request_id}' "
                        "ORDER BY position")
    assert items == [(1, "a"), (2, "b"), (3, "c")]
    assert rows(store, "SELECT user_id, arm, kind, topic_id, query FROM impressions") == [
        ("u1", "control", "topic", "t1", None)]


def test_clicks_on_unknown_requests_or_items_not_shown_are_refused(store, log):
    request_id = log.log_impression("u1", "control", "search", ["a", "b"], query="dog")
    with pytest.raises(UnknownRequest):
        log.log_click("f" * 32, "a")
    with pytest.raises(NotShown):
        log.log_click(request_id, "z")
    assert count(store, "clicks") == 0
    assert log.log_click(request_id, "b") == (True, 2)


def test_a_duplicate_click_counts_once(store, log):
    request_id = log.log_impression("u1", "treatment", "topic", ["a", "b"], topic_id="t")
    assert log.log_click(request_id, "a") == (True, 1)
    assert log.log_click(request_id, "a") == (False, 1)
    assert count(store, "clicks") == 1
    other = log.log_impression("u1", "treatment", "topic", ["a", "b"], topic_id="t")
    assert log.log_click(other, "a") == (True, 1)  # the same item in another request is another click


def test_concurrent_impressions_and_clicks_are_all_stored_once(store, log):
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
    assert count(store, "impressions") == threads * per_thread
    assert count(store, "clicks") == threads * per_thread


def test_concurrent_duplicates_of_one_click_count_once(log):
    request_id = log.log_impression("u", "control", "topic", ["a"], topic_id="t")
    start = threading.Barrier(16)

    def click(_):
        start.wait()
        return log.log_click(request_id, "a")[0]

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(click, range(16))) == 1


def test_a_log_of_another_experiment_is_refused(store, log):
    log.log_impression("u", "control", "topic", ["a"], topic_id="t")
    for other in (ExperimentConfig("exp2", "exp2", CONFIG.arms, CONFIG.split),
                  ExperimentConfig("exp", "exp", CONFIG.arms, (0.9, 0.1)),
                  ExperimentConfig("exp", "exp", ("control", "b"), CONFIG.split)):
        with pytest.raises(UsageError, match="another --events (file|store)"):
            open_event_store(store, other)
    open_event_store(store, CONFIG).close()  # the same experiment reopens its log (a server restart)
    assert count(store, "impressions") == 1


_WORKER = r"""
import json, sys, time
from pathlib import Path
from interbert.serve.events import ExperimentConfig, open_event_store
path, start, phase, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
while not start.exists():  # every process opens the log at the same moment
    time.sleep(0.001)
log = open_event_store(path, ExperimentConfig("exp", "exp", ("control", "treatment"), (0.5, 0.5)))
if phase == "show":
    ids = [log.log_impression(f"{name}-u{i}", "control", "topic", ["a", "b"], topic_id="t") for i in range(25)]
    print(json.dumps(ids))
else:  # click every request given on stdin, each item once
    counted = [log.log_click(r, image)[0] for r in json.loads(sys.stdin.read()) for image in ("a", "b")]
    print(json.dumps(sum(counted)))
log.close()
"""


def test_several_server_processes_share_one_log(tmp_path, store):
    """Uvicorn with --workers N (or two `serve` processes on one --events store) write one log from
    several processes: every impression is kept, and a click two processes record at once counts once."""
    import os
    import subprocess
    import sys
    import time

    from conftest import REPO

    db, env = store, {**os.environ, "PYTHONPATH": str(REPO / "src")}

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
    assert count(store, "impressions") == 100
    assert count(store, "impression_items") == 200
    clicks = count(store, "clicks")
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


def test_a_click_from_another_user_is_refused_and_not_counted(store, log):
    request_id = log.log_impression("user-a", "control", "topic", ["a", "b"], topic_id="t")
    with pytest.raises(NotYours, match="served to another user"):
        log.log_click(request_id, "a", "user-b")
    assert count(store, "clicks") == 0
    assert log.log_click(request_id, "a", "user-a") == (True, 1)


def hashes(weights="w" * 64, index="i" * 64, feed="f" * 64, model="/models/a") -> ArmHashes:
    return ArmHashes(model=model, weights_sha256=weights, index_sha256=index, feed_sha256=feed)


ARMS = {"control": hashes(), "treatment": hashes(weights="v" * 64, model="/models/b")}


def log_state(store) -> tuple[bytes | None, list]:
    """An SQLite file's bytes (None for PostgreSQL) and every row of the store (the time column of clicks is
    left out: PostgreSQL's identity column aside, the rows compare as they are)."""
    tables = ("experiment", "impressions", "impression_items", "clicks", "schema_version")
    every = [rows(store, f"SELECT * FROM {table} ORDER BY 1") for table in tables]
    return (store.read_bytes() if isinstance(store, Path) else None), every


@pytest.mark.parametrize("changed, named", [
    ({"weights": "x" * 64}, "weights sha256"),
    ({"index": "x" * 64}, "index sha256"),
    ({"feed": "x" * 64}, "feed sha256"),
])
def test_an_arm_whose_hashes_differ_from_the_logs_is_refused_writing_nothing(store, changed, named):
    path = store
    first = open_event_store(path, CONFIG, ARMS)
    assert not first.upgraded
    request_id = first.log_impression("u", "treatment", "topic", ["a"], topic_id="t")
    first.log_click(request_id, "a", "u")
    first.close()
    before = log_state(path)
    other = {**ARMS, "treatment": hashes(**{"weights": "v" * 64, "model": "/models/c", **changed})}
    with pytest.raises(UsageError) as refused:
        open_event_store(path, CONFIG, other)
    message = str(refused.value)
    recorded = getattr(ARMS["treatment"], named.replace(" ", "_"))
    assert "'treatment'" in message and named in message and recorded in message and "x" * 64 in message
    assert "\n" not in message
    assert log_state(path) == before
    open_event_store(path, CONFIG, dict(ARMS)).close()  # the same arms (a restart) are welcome
    moved = {**ARMS, "control": hashes(model="/elsewhere/a")}  # a moved folder with the same weights is the same arm
    open_event_store(path, CONFIG, moved).close()


def test_a_log_from_before_arm_hashes_is_upgraded_not_refused(store):
    path = store
    old = open_event_store(path, CONFIG)  # as written before arms were bound: no hashes
    old.log_impression("u", "control", "topic", ["a"], topic_id="t")
    old.close()
    upgraded = open_event_store(path, CONFIG, ARMS)
    assert upgraded.upgraded
    upgraded.close()
    (recorded,), = rows(path, "SELECT value FROM experiment WHERE key = 'arm_hashes'")
    assert {arm: ArmHashes(**fields) for arm, fields in json.loads(recorded).items()} == ARMS
    assert count(path, "impressions") == 1
    if isinstance(path, Path):
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert read_arm_hashes(db) == ARMS
    again = open_event_store(path, CONFIG, ARMS)
    assert not again.upgraded  # recorded once
    again.close()


def test_another_experiment_on_a_log_is_refused_before_any_write(store, log):
    log.log_impression("u", "control", "topic", ["a"], topic_id="t")
    log.close()
    before = log_state(store)
    with pytest.raises(UsageError, match="another --events (file|store)"):
        open_event_store(store, ExperimentConfig("exp2", "exp2", CONFIG.arms, CONFIG.split), ARMS)
    assert log_state(store) == before


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


def test_servers_opening_a_new_postgres_store_at_once_all_start(postgres_server):
    """Replicas started together on one new database: PostgreSQL's CREATE TABLE IF NOT EXISTS is not safe
    against a concurrent creator, so creation is serialised (an advisory lock); every opener must start."""
    failures = []
    for round_ in range(5):
        uri, barrier = postgres_server.create_database(f"at_once_{round_}"), threading.Barrier(8)

        def open_store():
            barrier.wait()
            try:
                open_event_store(uri, CONFIG, ARMS).close()
            except Exception as e:  # noqa: BLE001 - the test reports every failure
                failures.append(repr(e))

        threads = [threading.Thread(target=open_store) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert rows(uri, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    assert failures == []


def test_a_store_from_before_schema_versions_is_upgraded_keeping_its_events(store):
    """Version 1 is what every log written before versions were recorded holds (SCHEMA, no schema_version):
    a serving start upgrades it, in place, events kept; a second start finds nothing to do."""
    schema = SCHEMA
    if not isinstance(store, Path):
        from interbert.serve.events_pg import PG_SCHEMA as schema
    rows_ = "; ".join(f"INSERT INTO experiment VALUES ('{k}', '{v}')" for k, v in CONFIG.as_rows().items())
    execute(store, schema + rows_ + "; INSERT INTO impressions VALUES ('r1', 1.5, 'u', 'control', 'topic', 't', NULL)")
    log = open_event_store(store, CONFIG, ARMS)
    log.close()
    assert rows(store, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    assert rows(store, "SELECT request_id, time, user_id FROM impressions") == [("r1", 1.5, "u")]
    before = log_state(store)[1]
    open_event_store(store, CONFIG, ARMS).close()
    assert log_state(store)[1] == before


def test_a_store_of_a_newer_schema_is_refused_by_name_writing_nothing(store, log):
    log.log_impression("u", "control", "topic", ["a"], topic_id="t")
    log.close()
    execute(store, f"UPDATE schema_version SET version = {SCHEMA_VERSION + 7}")
    before = log_state(store)
    with pytest.raises(UsageError, match=f"schema version {SCHEMA_VERSION + 7}, newer than this interbert") as refused:
        open_event_store(store, CONFIG, ARMS)
    assert str(store) in str(refused.value) and "\n" not in str(refused.value)
    assert log_state(store) == before
    from interbert.serve.report import build_report

    with pytest.raises(UsageError, match="newer than this interbert"):  # the report does not guess either
        build_report(store)


@pytest.mark.parametrize("uri", ["postgresql://me:s3cr3t@127.0.0.1:5432/events",
                                 "postgresql://me@127.0.0.1:5432/events?password=s3cr3t",
                                 "postgres://me:s3cr3t@db.example/events"])
def test_a_uri_holding_a_password_is_refused_in_one_line_without_repeating_it(uri, capsys):
    with pytest.raises(UsageError, match="PGPASSWORD") as refused:
        open_event_store(uri, CONFIG)
    assert "s3cr3t" not in str(refused.value)
    from interbert.cli import main as interbert_main

    assert interbert_main(["abtest", "report", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "PGPASSWORD" in err[0] and "s3cr3t" not in err[0]


def test_an_unreachable_postgres_store_is_one_line_at_start(capsys):
    from postgres_server import free_port, require_psycopg

    require_psycopg()

    from interbert.cli import main as interbert_main

    uri = f"postgresql://nobody@127.0.0.1:{free_port()}/events"  # nothing listens there
    with pytest.raises(UsageError, match="cannot connect to the event store"):
        open_event_store(uri, CONFIG)
    assert interbert_main(["abtest", "report", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot connect to the event store")
