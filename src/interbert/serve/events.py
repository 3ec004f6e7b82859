"""The experiment's event log: what each user was shown (impressions) and what they clicked, in SQLite.

    experiment        key/value: name, salt, arms (JSON list, control first), split (JSON list)
    impressions       one row per answered request: request_id, time, user_id, arm, kind (topic|search),
                      topic_id or query
    impression_items  the items of a request with their 1-based positions; UNIQUE (request_id, image_id)
    clicks            UNIQUE (request_id, image_id), referencing the item that was shown

Durability. The database runs in WAL mode with ``synchronous=FULL``: every commit fsyncs the WAL before
it returns, and each write is committed before the HTTP response that acknowledges it is sent. So once a
client has a request_id or a click acknowledgement, the event survives a killed process and a power
loss. (``synchronous=NORMAL`` would survive a killed process but could lose the last commits on a power
loss, which is exactly what an acknowledgement promises not to do.) One fsync per event costs ~ms on a
local disk: cheaper than one re-rank.

A click is accepted only for an item that request showed (else :class:`UnknownRequest` /
:class:`NotShown`); a repeated click on the same item of the same request is stored once (the UNIQUE
constraint decides, so two concurrent duplicates cannot both count).

Threads share one connection behind a lock: SQLite serialises writers anyway, and the lock also keeps
one thread's transaction from interleaving with another's on the shared connection. Several processes
(two `serve` processes on one ``--events`` file) each hold their own connection and SQLite's file locks
order their transactions, waiting up to 30 s for one another (tests/test_abtest_events.py runs 4 at once).
"""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from interbert.errors import UsageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS experiment (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS impressions (
    request_id TEXT PRIMARY KEY,
    time REAL NOT NULL,
    user_id TEXT NOT NULL,
    arm TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('topic', 'search')),
    topic_id TEXT,
    query TEXT
);
CREATE TABLE IF NOT EXISTS impression_items (
    request_id TEXT NOT NULL REFERENCES impressions(request_id),
    position INTEGER NOT NULL CHECK (position >= 1),
    image_id TEXT NOT NULL,
    PRIMARY KEY (request_id, position),
    UNIQUE (request_id, image_id)
);
CREATE TABLE IF NOT EXISTS clicks (
    click_id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    time REAL NOT NULL,
    UNIQUE (request_id, image_id),
    FOREIGN KEY (request_id, image_id) REFERENCES impression_items(request_id, image_id)
);
CREATE INDEX IF NOT EXISTS impressions_by_user ON impressions(user_id);
"""


class UnknownRequest(LookupError):
    """A click names a request_id that the log never served."""


class NotShown(LookupError):
    """A click names an image that its request did not show."""


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    salt: str
    arms: tuple[str, ...]  # the first is the control
    split: tuple[float, ...]

    def as_rows(self) -> dict[str, str]:
        return {"name": self.name, "salt": self.salt, "arms": json.dumps(list(self.arms)),
                "split": json.dumps([round(s, 12) for s in self.split])}


BUSY_WAIT = 30.0  # seconds a connection waits for another process's lock (sqlite3's timeout, and the WAL switch)


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection with the log's durability settings; autocommit mode, transactions are explicit."""
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_WAIT)
    _write_ahead_log(db)
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def _write_ahead_log(db: sqlite3.Connection) -> None:
    """Switch the file to WAL mode (a no-op once it is). While other processes open the same new file, the
    switch can answer "database is locked" at once: SQLite does not wait on a lock it could deadlock on,
    whatever the timeout. So it is retried, with a short random pause, for up to ``BUSY_WAIT`` seconds."""
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.005 + 0.02 * random.random())


def read_config(db: sqlite3.Connection) -> ExperimentConfig | None:
    rows = dict(db.execute("SELECT key, value FROM experiment").fetchall())
    if not rows:
        return None
    return ExperimentConfig(rows["name"], rows["salt"], tuple(json.loads(rows["arms"])),
                            tuple(json.loads(rows["split"])))


class EventLog:
    """Append-only impressions and clicks of one experiment; every method commits before it returns."""

    def __init__(self, path: str | Path, config: ExperimentConfig):
        self.path = Path(path)
        self.config = config
        self._lock = threading.Lock()
        self._db = connect(self.path)
        self._create(config)

    def _create(self, config: ExperimentConfig) -> None:
        # The schema and the experiment's rows in one BEGIN IMMEDIATE transaction (which waits for the write
        # lock, where a statement that reads before it writes could be told "database is locked" while other
        # processes create it too); every statement is IF NOT EXISTS, so a re-run is harmless.
        with self._lock, self._transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            stored = read_config(self._db)
            if stored is None:
                self._db.executemany("INSERT INTO experiment VALUES (?, ?)", config.as_rows().items())
            elif stored.as_rows() != config.as_rows():
                # Mixing two experiments' events in one log would make every statistic meaningless.
                raise UsageError(
                    f"{self.path} logs experiment {stored.name!r} (arms {list(stored.arms)}, split "
                    f"{[round(s, 4) for s in stored.split]}); this server runs {config.name!r} (arms {list(config.arms)}, "
                    f"split {[round(s, 4) for s in config.split]}): give another --events file"
                )

    @contextlib.contextmanager
    def _transaction(self):
        # BEGIN IMMEDIATE takes the write lock up front: the checks and the insert of a click see one state.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")  # returns once the WAL is fsynced (synchronous=FULL)

    def log_impression(self, user_id: str, arm: str, kind: str, image_ids: Sequence[str],
                       topic_id: str | None = None, query: str | None = None) -> str:
        """Store what ``user_id`` was shown (positions 1..n in order) and return the new request_id."""
        request_id = uuid.uuid4().hex
        with self._lock, self._transaction():
            self._db.execute("INSERT INTO impressions VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (request_id, time.time(), user_id, arm, kind, topic_id, query))
            self._db.executemany("INSERT INTO impression_items VALUES (?, ?, ?)",
                                 [(request_id, position, image_id) for position, image_id in enumerate(image_ids, 1)])
        return request_id

    def log_click(self, request_id: str, image_id: str) -> tuple[bool, int]:
        """Record a click; returns (counted, position): ``counted`` is False for a repeated click.
        Raises UnknownRequest / NotShown for a click that no impression explains."""
        with self._lock, self._transaction():
            if self._db.execute("SELECT 1 FROM impressions WHERE request_id = ?", (request_id,)).fetchone() is None:
                raise UnknownRequest(f"no request {request_id!r} was served")
            shown = self._db.execute("SELECT position FROM impression_items WHERE request_id = ? AND image_id = ?",
                                     (request_id, image_id)).fetchone()
            if shown is None:
                raise NotShown(f"image {image_id!r} was not shown in request {request_id!r}")
            inserted = self._db.execute("INSERT OR IGNORE INTO clicks (request_id, image_id, time) VALUES (?, ?, ?)",
                                        (request_id, image_id, time.time()))
            return inserted.rowcount == 1, int(shown[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_log(path: str | Path) -> tuple[sqlite3.Connection, ExperimentConfig]:
    """Open an existing log for reading (the report); refuse a file that is not one."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such event log")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        config = read_config(db)
    except sqlite3.DatabaseError as error:
        db.close()
        raise UsageError(f"{path} is not an event log ({error})") from None
    if config is None:
        db.close()
        raise UsageError(f"{path} is not an event log (no experiment recorded)")
    return db, config
