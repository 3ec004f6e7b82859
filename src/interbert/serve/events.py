"""The experiment's event log: what each user was shown (impressions) and what they clicked.

One interface (:class:`EventStore`), two engines: SQLite (:class:`EventLog`, a file: the embedded default)
and PostgreSQL (:class:`interbert.serve.events_pg.PostgresEventLog`, ``postgresql://USER@HOST:PORT/DB``:
several `serve` processes on several machines share it). :func:`open_event_store` picks the engine from
``--events``. Both hold the same tables (types adapted) and give the same guarantees; this module's
docstring below describes them for SQLite, events_pg.py for PostgreSQL.

    experiment        key/value: name, salt, arms (JSON list, control first), split (JSON list), and
                      arm_hashes (JSON: per arm its model folder and the sha256 of its weights, index and
                      feed, recorded when the experiment first starts: the arms are bound to them)
    impressions       one row per answered request: request_id, time, user_id, arm, kind (topic|search),
                      topic_id or query
    impression_items  the items of a request with their 1-based positions; UNIQUE (request_id, image_id)
    clicks            UNIQUE (request_id, image_id), referencing the item that was shown
    schema_version    one row: the version of these tables (a log without it predates it: version 1)

Migrations are the project's own: :data:`MIGRATIONS` lists what each version adds. A writer (`serve`)
upgrades an older store inside the transaction that records the experiment; a store of a newer version
than this interbert knows is refused by name before anything is written (by the report too).

Durability. The database runs in WAL mode with ``synchronous=FULL``: every commit fsyncs the WAL before
it returns, and each write is committed before the HTTP response that acknowledges it is sent. So once a
client has a request_id or a click acknowledgement, the event survives a killed process and a power
loss. (``synchronous=NORMAL`` would survive a killed process but could lose the last commits on a power
loss, which is exactly what an acknowledgement promises not to do.) One fsync per event costs ~ms on a
local disk: cheaper than one re-rank.

A click is accepted only from the user the request was served to (else :class:`NotYours`) and for an
item that request showed (else :class:`UnknownRequest` / :class:`NotShown`); a repeated click on the same item of the same request is stored once (the UNIQUE
constraint decides, so two concurrent duplicates cannot both count).

Threads share one connection behind a lock: SQLite serialises writers anyway, and the lock also keeps
one thread's transaction from interleaving with another's on the shared connection. Several processes
(two `serve` processes on one ``--events`` file) each hold their own connection and SQLite's file locks
order their transactions, waiting up to 30 s for one another (tests/abtest/test_abtest_events.py runs 4 at once).
"""

from __future__ import annotations

import abc
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

SCHEMA_VERSION = 2
# version -> the statements that bring a store of the version before it to this one. SCHEMA above is
# version 1 (what every log written before versions were recorded holds); a new store is created as
# version 1 and upgraded like an old one, so both take the same path. Both engines run these as written.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
        # `abtest report` sums impressions per (arm, user) in the database: this index serves that GROUP BY
        "CREATE INDEX IF NOT EXISTS impressions_by_arm_user ON impressions(arm, user_id)"),
}


def refuse_newer_schema(where: str, version: int) -> None:
    """A store written by a newer interbert: its tables may mean something this one does not know."""
    if version > SCHEMA_VERSION:
        raise UsageError(f"{where}: the event store has schema version {version}, newer than this interbert "
                         f"knows ({SCHEMA_VERSION}): upgrade interbert to use it (nothing was written)")


def migrate(execute, where: str, version: int) -> bool:
    """Bring a store of schema ``version`` to :data:`SCHEMA_VERSION` with ``execute(sql)`` (inside the
    caller's transaction, so an upgrade is all or nothing); True when anything was done."""
    refuse_newer_schema(where, version)
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[step]:
            execute(statement)
    if version == SCHEMA_VERSION:
        return False
    execute("DELETE FROM schema_version")
    execute(f"INSERT INTO schema_version (version) VALUES ({SCHEMA_VERSION})")
    return True


class UnknownRequest(LookupError):
    """A click names a request_id that the log never served."""


class NotShown(LookupError):
    """A click names an image that its request did not show."""


class NotYours(PermissionError):
    """A click names a request that was served to another user."""


@dataclass(frozen=True)
class ArmHashes:
    """What an arm is: its model folder (for people to read) and the sha256 of its weights, its index
    (index.json and meta.sqlite) and its feed (None: no feed). The hashes decide whether two starts run
    the same arm; the folder may move."""

    model: str
    weights_sha256: str
    index_sha256: str
    feed_sha256: str | None

    COMPARED = ("weights_sha256", "index_sha256", "feed_sha256")


ARM_HASHES_KEY = "arm_hashes"


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
REPORT_TIMEOUT_S = 600.0  # `abtest report --timeout`'s default: a PostgreSQL store's reading ends by then


def connect(path: str | Path, busy_wait: float = BUSY_WAIT) -> sqlite3.Connection:
    """A connection with the log's durability settings; autocommit mode, transactions are explicit."""
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=busy_wait)
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


def read_arm_hashes(db: sqlite3.Connection) -> dict[str, ArmHashes] | None:
    """The arms' hashes recorded at the experiment's first start; None for a log written before they were."""
    row = db.execute("SELECT value FROM experiment WHERE key = ?", (ARM_HASHES_KEY,)).fetchone()
    if row is None:
        return None
    return {arm: ArmHashes(**fields) for arm, fields in json.loads(row[0]).items()}


def _arm_hashes_row(arms: dict[str, ArmHashes]) -> tuple[str, str]:
    return ARM_HASHES_KEY, json.dumps({arm: vars(hashes) for arm, hashes in arms.items()}, sort_keys=True)


def _refuse_other_experiment(path: Path | str, stored: ExperimentConfig, config: ExperimentConfig) -> None:
    if stored.as_rows() != config.as_rows():
        # Mixing two experiments' events in one log would make every statistic meaningless.
        raise UsageError(
            f"{path} logs experiment {stored.name!r} (arms {list(stored.arms)}, split "
            f"{[round(s, 4) for s in stored.split]}); this server runs {config.name!r} (arms {list(config.arms)}, "
            f"split {[round(s, 4) for s in config.split]}): give another --events file"
        )


def _refuse_other_arms(path: Path | str, experiment: str, stored: dict[str, ArmHashes], given: dict[str, ArmHashes]) -> None:
    """One line naming the first arm whose weights, index or feed differ from what the log recorded: the
    log's events under that arm's name came from other rankings than this start would serve."""
    for arm, now in given.items():
        before = stored.get(arm)
        if before is None:
            raise UsageError(f"{path}: experiment {experiment!r} recorded no hashes for arm {arm!r}")
        for key in ArmHashes.COMPARED:
            if getattr(before, key) != getattr(now, key):
                what = key.removesuffix("_sha256")
                raise UsageError(
                    f"{path}: arm {arm!r} of experiment {experiment!r} was started with {what} sha256 "
                    f"{getattr(before, key)} (model {before.model}), this start gives it {what} sha256 "
                    f"{getattr(now, key)} (model {now.model}): an arm cannot change within an experiment; "
                    f"start another --experiment with another --events file")


def check_existing_log(events: str | Path, config: ExperimentConfig, arms: dict[str, ArmHashes] | None) -> None:
    """Refuse, before anything is written, to run ``config`` with ``arms`` on the store ``events`` (a file
    or a PostgreSQL URI) when it holds another experiment, other arms or a newer schema."""
    if is_postgres_uri(events):
        _postgres_engine().check_existing_store(checked_postgres_uri(str(events)), config, arms)
    else:
        _check_existing_file(events, config, arms)


def _check_existing_file(path: str | Path, config: ExperimentConfig, arms: dict[str, ArmHashes] | None) -> None:
    """Refuse, before anything is written, to run ``config`` with ``arms`` on the log at ``path`` when it
    holds another experiment or other arms. Read-only (the main file and its WAL stay as they are); the
    same checks run again inside the transaction that records the experiment, for a racing start."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    stored, recorded = _read_experiment(path, "give another --events file")
    if stored is not None:
        _refuse_other_experiment(path, stored, config)
        if recorded is not None and arms is not None:
            _refuse_other_arms(path, config.name, recorded, arms)


LOG_TABLES = ("experiment", "impressions", "impression_items", "clicks")


def _read_experiment(path: Path, advice: str) -> tuple[ExperimentConfig | None, dict[str, ArmHashes] | None]:
    """The experiment and arm hashes a log at ``path`` records, read through a read-only connection (None
    where the file holds no log yet); a file that is not a log is refused with one line."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_WAIT)
    try:
        return _read_experiment_rows(db, path, advice)
    finally:
        db.close()


def _read_experiment_rows(db: sqlite3.Connection, path: Path, advice: str):
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return None, None  # an empty database: no log yet
        missing = [table for table in LOG_TABLES if table not in tables]
        if missing:
            raise UsageError(f"{path} is not an event log (no {', '.join(missing)} table): {advice}")
        refuse_newer_schema(str(path), _sqlite_schema_version(db, tables))
        return read_config(db), read_arm_hashes(db)
    except sqlite3.DatabaseError as error:  # not SQLite at all, or a damaged file
        raise UsageError(f"{path} is not an event log ({error}): {advice}") from None
    except (KeyError, TypeError, json.JSONDecodeError) as error:  # SQLite, but its experiment rows are not ours
        raise UsageError(f"{path} is not an event log (its experiment table does not hold an experiment: "
                         f"{type(error).__name__} {error}): {advice}") from None


def _sqlite_schema_version(db: sqlite3.Connection, tables: set[str] | None = None) -> int:
    if tables is None:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "schema_version" not in tables:
        return 1  # written before versions were recorded
    row = db.execute("SELECT max(version) FROM schema_version").fetchone()
    return 1 if row[0] is None else int(row[0])


def is_postgres_uri(events: str | Path) -> bool:
    """``--events postgresql://...`` (or postgres://, libpq's other spelling) names a PostgreSQL store;
    anything else is a file. A Path never is a URI (it would have folded the // already)."""
    return isinstance(events, str) and events.startswith(("postgresql://", "postgres://"))


def checked_postgres_uri(uri: str) -> str:
    """``uri`` as given, once it is known to hold no password: a URI travels through shell history, process
    lists, logs and /health, so the password comes from $PGPASSWORD, a libpq service file or ~/.pgpass
    (libpq reads them) and a URI with one is refused (its password is not repeated in the message)."""
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(uri)
        in_query = "password" in parse_qs(parts.query)
        has_password = parts.password is not None or in_query
    except ValueError as error:  # a port that is not a number, a broken IPv6 literal
        raise UsageError(f"--events: not a PostgreSQL URI postgresql://USER@HOST:PORT/DB ({error})") from None
    if has_password:
        raise UsageError("--events: the PostgreSQL URI holds a password; name the store without it "
                         "(postgresql://USER@HOST:PORT/DB) and give the password in $PGPASSWORD (or a libpq "
                         "service file or ~/.pgpass)")
    return uri


def _postgres_engine():
    """events_pg, or one line naming the extra to install (psycopg is not a core dependency)."""
    from interbert.extras import require_extra

    require_extra("postgres", "an event store in PostgreSQL (--events postgresql://...)")
    from interbert.serve import events_pg

    return events_pg


class EventStore(abc.ABC):
    """Append-only impressions and clicks of one experiment: what the service needs of either engine.

    Every write commits before it returns (so the HTTP response that acknowledges an event follows its
    commit); a write that raises one of :attr:`UNAVAILABLE` stored nothing of its event (the service
    answers 503 and acknowledges nothing). Opening the store creates or upgrades its tables, records the
    experiment and the arms' hashes, and refuses another experiment's store or other arms (UsageError)."""

    config: ExperimentConfig
    upgraded: bool  # True when this start recorded arm hashes into a log that predates them
    UNAVAILABLE: tuple[type[BaseException], ...]  # the store cannot take an event now (locked, unreachable)
    ERRORS: tuple[type[BaseException], ...]  # whatever the engine raises (the readiness probe reports it)

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """The store as people name it (a file, or a URI: one that never holds a password)."""

    @abc.abstractmethod
    def log_impression(self, user_id: str, arm: str, kind: str, image_ids: Sequence[str],
                       topic_id: str | None = None, query: str | None = None) -> str:
        """Store what ``user_id`` was shown (positions 1..n in order) and return the new request_id."""

    @abc.abstractmethod
    def log_click(self, request_id: str, image_id: str, user_id: str | None = None) -> tuple[bool, int]:
        """Record a click by ``user_id``; returns (counted, position), ``counted`` False for a repeated click.
        Raises UnknownRequest / NotShown / NotYours (``user_id`` None: the user is not checked)."""

    @abc.abstractmethod
    def check_writable(self, wait: float) -> None:
        """Raise one of :attr:`ERRORS` unless an event could be stored within ``wait`` seconds (readiness)."""

    @abc.abstractmethod
    def close(self) -> None:
        ...


def open_event_store(events: str | Path, config: ExperimentConfig, arms: dict[str, ArmHashes] | None = None,
                     busy_wait: float = BUSY_WAIT) -> EventStore:
    """The engine ``events`` names: a PostgreSQL URI, else an SQLite file."""
    if is_postgres_uri(events):
        checked_postgres_uri(str(events))  # refused before the driver is even needed
        return _postgres_engine().PostgresEventLog(str(events), config, arms, busy_wait)
    return EventLog(events, config, arms, busy_wait)


def _file_identity(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


class EventLog(EventStore):
    """The SQLite engine: one file, WAL, ``synchronous=FULL`` (see the module's docstring)."""

    UNAVAILABLE = (sqlite3.OperationalError,)
    ERRORS = (sqlite3.Error,)

    def __init__(self, path: str | Path, config: ExperimentConfig, arms: dict[str, ArmHashes] | None = None,
                 busy_wait: float = BUSY_WAIT):
        """``arms``: each arm's hashes, recorded at the experiment's first start and checked at every later
        one (None: neither, for callers that have no models, such as tests of the log itself).
        ``busy_wait``: seconds a write waits for another connection's lock before sqlite3.OperationalError."""
        self.path = Path(path)
        self.config = config
        self.upgraded = False  # True when this start recorded arm hashes into a log that predates them
        self._lock = threading.Lock()
        _check_existing_file(self.path, config, arms)  # a refused start writes nothing, not even the WAL switch
        self._db = connect(self.path, busy_wait)
        self._file = _file_identity(self.path)  # which file the connection writes, whatever its name becomes
        try:
            self._create(config, arms)
        except BaseException:
            self._db.close()
            raise

    def _create(self, config: ExperimentConfig, arms: dict[str, ArmHashes] | None) -> None:
        # The schema and the experiment's rows in one BEGIN IMMEDIATE transaction (which waits for the write
        # lock, where a statement that reads before it writes could be told "database is locked" while other
        # processes create it too); every statement is IF NOT EXISTS, so a re-run is harmless.
        with self._lock, self._transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            migrate(self._db.execute, str(self.path), _sqlite_schema_version(self._db))
            stored = read_config(self._db)
            if stored is None:
                self._db.executemany("INSERT INTO experiment VALUES (?, ?)", config.as_rows().items())
            else:
                _refuse_other_experiment(self.path, stored, config)
            if arms is None:
                return
            recorded = read_arm_hashes(self._db)
            if recorded is None:
                self._db.execute("INSERT INTO experiment VALUES (?, ?)", _arm_hashes_row(arms))
                self.upgraded = stored is not None
            else:
                _refuse_other_arms(self.path, config.name, recorded, arms)

    @property
    def where(self) -> str:
        return str(self.path)

    @contextlib.contextmanager
    def _transaction(self):
        # BEGIN IMMEDIATE takes the write lock up front: the checks and the insert of a click see one state.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")  # returns once the WAL is fsynced (synchronous=FULL)
        except BaseException:
            # Also when COMMIT itself failed (a reader's lock outlasting the busy wait, a disk error): a
            # transaction left open on the shared connection would make every later BEGIN fail. SQLite may
            # have rolled back already (an I/O error does), and a failing ROLLBACK must not hide the cause.
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise

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

    def log_click(self, request_id: str, image_id: str, user_id: str | None = None) -> tuple[bool, int]:
        """Record a click by ``user_id``; returns (counted, position): ``counted`` is False for a repeated
        click. Raises UnknownRequest / NotShown for a click that no impression explains, and NotYours for
        a click from a user other than the one the request was served to (``user_id`` None: not checked,
        for callers that are not the service)."""
        with self._lock, self._transaction():
            served = self._db.execute("SELECT user_id FROM impressions WHERE request_id = ?", (request_id,)).fetchone()
            if served is None:
                raise UnknownRequest(f"no request {request_id!r} was served")
            # Checked in the same transaction as the insert: what was served to whom cannot change in between.
            if user_id is not None and served[0] != user_id:
                raise NotYours(f"request {request_id!r} was served to another user: only that user's clicks count")
            shown = self._db.execute("SELECT position FROM impression_items WHERE request_id = ? AND image_id = ?",
                                     (request_id, image_id)).fetchone()
            if shown is None:
                raise NotShown(f"image {image_id!r} was not shown in request {request_id!r}")
            inserted = self._db.execute("INSERT OR IGNORE INTO clicks (request_id, image_id, time) VALUES (?, ?, ?)",
                                        (request_id, image_id, time.time()))
            return inserted.rowcount == 1, int(shown[0])

    def check_writable(self, wait: float) -> None:
        """Raise sqlite3.OperationalError unless the log could store an event now: the file at ``path`` is
        still the one this connection writes (a removed or replaced file would swallow events nobody
        reads), a read answers, and the write lock is free within ``wait`` seconds (taken and released
        at once: nothing is written). For the readiness probe."""
        if not self._lock.acquire(timeout=wait):
            raise sqlite3.OperationalError(f"a write of this process has waited over {wait:g} s for the log")
        try:
            try:
                same = _file_identity(self.path) == self._file
            except OSError:
                same = False
            if not same:
                raise sqlite3.OperationalError(f"{self.path} is not the file this server opened (removed, moved "
                                               "or replaced while serving)")
            wait_ms = self._db.execute("PRAGMA busy_timeout").fetchone()[0]
            self._db.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
            try:
                with self._transaction():
                    self._db.execute("SELECT count(*) FROM experiment").fetchone()
            finally:
                self._db.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_log(path: str | Path, timeout: float = REPORT_TIMEOUT_S):
    """Open an existing log for reading (the report): a connection (SQLite's or psycopg's: both answer
    ``execute(sql)`` with rows), the experiment and its arms' hashes (empty for a log written before they
    were recorded). A file or database that is not one is refused in one line. A PostgreSQL store's reading
    ends by ``timeout`` seconds; a local SQLite file has no server to hang."""
    if is_postgres_uri(path):
        return _postgres_engine().open_store_for_reading(checked_postgres_uri(str(path)), timeout)
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not an event log")
    if not path.is_file():
        raise UsageError(f"{path}: no such event log")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        config, arms = _read_experiment_rows(db, path, "give the --events file of `interbert serve --arm ...`")
    except BaseException:
        db.close()
        raise
    if config is None:
        db.close()
        raise UsageError(f"{path} is not an event log (no experiment recorded)")
    return db, config, arms or {}


def one_line(error: BaseException) -> str:
    """An error's message on one line (a server's messages span several)."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def read_failure(db, error: BaseException) -> str:
    """One line for an error met while reading an open store: the store's own account where it has one (a
    PostgreSQL store whose server did not answer within the report's --timeout), else the error's."""
    if hasattr(db, "explained"):
        error = db.explained(error)
    return one_line(error)


def read_errors() -> tuple[type[BaseException], ...]:
    """What reading a store may raise once it is open (a damaged SQLite page, a lost PostgreSQL connection)."""
    errors: tuple[type[BaseException], ...] = (sqlite3.DatabaseError,)
    with contextlib.suppress(ImportError):
        import psycopg

        errors += (psycopg.Error,)
    return errors
