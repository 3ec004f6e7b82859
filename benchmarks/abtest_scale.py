"""The A/B event store at scale, SQLite against PostgreSQL (issue 24):

1. events written per second at 1, 8 and 32 concurrent clients, through the event store API the service
   uses (``open_event_store``: ``log_impression`` of 10 items, then ``log_click`` on one of them, each
   committed before it returns), the clients being threads sharing one store object as the request threads
   of one ``serve`` process do (SQLite: one connection behind a lock, WAL, synchronous=FULL; PostgreSQL:
   up to 8 connections, synchronous_commit on). Not through HTTP: the model and the network would be timed
   too.
2. ``interbert abtest report`` on 1M and 10M generated impressions (items shown; 10 per request, one user
   per 20 requests, 5% of the items clicked) for each engine: wall time and peak memory (ru_maxrss of the
   child process that runs it). The rows are generated fast (executemany / COPY) and not timed.

PostgreSQL: a throwaway server started from Debian's binaries (tests/helpers/postgres_server.py, with fsync on as in
production), or ``--postgres URI`` of a server you run (the role needs CREATEDB: each run makes and drops
its own databases; the password from $PGPASSWORD). The machine, and the 1-minute load average before and
after, go into the results; a start above 1.0 is warned about (the numbers then measure other jobs too).

    python benchmarks/abtest_scale.py                          # the full run (idle machine: tens of minutes)
    python benchmarks/abtest_scale.py --scale 0.001 --seconds 1 --out /tmp/abtest_scale_smoke   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from interbert.serve.events import ExperimentConfig, open_event_store
from interbert.utils.machine import cpu_model

HERE = Path(__file__).resolve().parent
CLIENTS = (1, 8, 32)
IMPRESSIONS = (1_000_000, 10_000_000)
ITEMS_PER_REQUEST = 10
REQUESTS_PER_USER = 20
CLICK_RATE = 0.05
CONFIG = ExperimentConfig("scale", "scale", ("control", "treatment"), (0.5, 0.5))
MAX_START_LOAD = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the impression counts (smoke: 0.001)")
    parser.add_argument("--seconds", type=float, default=20.0, help="each write setting runs this long (default 20)")
    parser.add_argument("--postgres", metavar="URI", help="a server to use (default: start a throwaway one)")
    parser.add_argument("--out", default=str(HERE / "results" / "abtest_scale"), help="results, without extension")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    if load_before > MAX_START_LOAD:
        print(f"WARNING: 1-minute load average {load_before:.2f} > {MAX_START_LOAD} at start: the machine is busy, "
              "the numbers measure other jobs too", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="abtest-scale-") as folder, postgres(args.postgres) as server:
        results = {"writes": [], "reports": []}
        for engine in ("sqlite", "postgresql"):
            for clients in CLIENTS:
                store = fresh_store(engine, Path(folder), server)
                results["writes"].append({"engine": engine, "clients": clients,
                                          **write_rate(store, clients, args.seconds)})
                print(json.dumps(results["writes"][-1]), flush=True)
            for impressions in IMPRESSIONS:
                count = max(ITEMS_PER_REQUEST, int(impressions * args.scale))
                store = fresh_store(engine, Path(folder), server)
                generate(store, count)
                results["reports"].append({"engine": engine, "impressions": count, **time_report(store, Path(folder))})
                print(json.dumps(results["reports"][-1]), flush=True)
                if engine == "sqlite":
                    Path(store).unlink()
    results["machine"] = machine(load_before, os.getloadavg()[0], args)
    write_results(results, Path(args.out))
    return 0


@contextlib.contextmanager
def postgres(uri: str | None):
    """(make a database -> its URI, drop it) on ``uri``'s server, or on a throwaway server of this run."""
    if uri is not None:
        databases = _Databases(uri)
        try:
            yield databases
        finally:
            databases.drop_all()
        return
    sys.path.insert(0, str(HERE.parent / "tests" / "helpers"))
    from postgres_server import PostgresServer

    server = PostgresServer(fsync=True)
    try:
        yield _Databases(server.uri())
    finally:
        server.close()


class _Databases:
    def __init__(self, admin_uri: str):
        self.admin_uri = admin_uri
        self.names: list[str] = []

    def create(self) -> str:
        import psycopg

        name = f"abtest_scale_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_uri, autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return self.admin_uri.rsplit("/", 1)[0] + "/" + name

    def drop_all(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_uri, autocommit=True) as db:
            for name in self.names:
                db.execute(f'DROP DATABASE IF EXISTS "{name}"')


def fresh_store(engine: str, folder: Path, server: _Databases) -> str:
    """An empty store of ``engine`` with the experiment recorded (as `serve` leaves it)."""
    where = str(folder / f"{uuid.uuid4().hex[:8]}.sqlite") if engine == "sqlite" else server.create()
    open_event_store(where, CONFIG).close()
    return where


def write_rate(where: str, clients: int, seconds: float) -> dict:
    """Events (impressions and clicks) committed per second by ``clients`` threads on one store object."""
    store = open_event_store(where, CONFIG)
    counts = [0] * clients
    stop = threading.Event()

    def client(n: int) -> None:
        rng = random.Random(n)
        while not stop.is_set():
            user = f"user{n}-{rng.randrange(1000)}"
            items = [f"img{rng.randrange(100_000)}" for _ in range(ITEMS_PER_REQUEST)]
            items = list(dict.fromkeys(items))
            request_id = store.log_impression(user, CONFIG.arms[n % 2], "topic", items, topic_id="t")
            store.log_click(request_id, items[0], user)
            counts[n] += 2

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    took = time.perf_counter() - start
    store.close()
    return {"events": sum(counts), "seconds": round(took, 2), "events_per_second": round(sum(counts) / took, 1)}


def rows(items: int):
    """Generated (impression, its items, its clicks), ``items`` items shown in all, deterministic."""
    rng = random.Random(0)
    users = max(1, items // (ITEMS_PER_REQUEST * REQUESTS_PER_USER))
    now = time.time()
    for r in range(items // ITEMS_PER_REQUEST):
        request_id = f"{r:032x}"
        user = f"u{rng.randrange(users)}"
        arm = CONFIG.arms[int(user[1:]) % 2]
        images = [f"img{(r * 7 + p) % 100_003}" for p in range(1, ITEMS_PER_REQUEST + 1)]
        clicks = [image for image in images if rng.random() < CLICK_RATE]
        yield (request_id, now + r * 0.001, user, arm, "topic", "t", None), images, clicks


def generate(where: str, items: int) -> None:
    if where.startswith("postgresql://"):
        _generate_postgres(where, items)
    else:
        _generate_sqlite(where, items)


def _generate_sqlite(path: str, items: int, batch: int = 50_000) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")  # loading, not timed: durability is the service's concern
    impressions, shown, clicked = [], [], []

    def flush():
        db.execute("BEGIN")
        db.executemany("INSERT INTO impressions VALUES (?, ?, ?, ?, ?, ?, ?)", impressions)
        db.executemany("INSERT INTO impression_items VALUES (?, ?, ?)", shown)
        db.executemany("INSERT INTO clicks (request_id, image_id, time) VALUES (?, ?, ?)", clicked)
        db.execute("COMMIT")
        impressions.clear(), shown.clear(), clicked.clear()

    for impression, images, clicks in rows(items):
        impressions.append(impression)
        shown.extend((impression[0], p, image) for p, image in enumerate(images, 1))
        clicked.extend((impression[0], image, impression[1]) for image in clicks)
        if len(shown) >= batch:
            flush()
    flush()
    db.close()


def _generate_postgres(uri: str, items: int) -> None:
    import psycopg

    with psycopg.connect(uri) as db, db.cursor() as cursor:
        generated = list(rows(items)) if items <= 2_000_000 else None
        for table, columns, pick in (
                ("impressions", "", lambda i, s, c: [i]),
                ("impression_items", "", lambda i, s, c: [(i[0], p, image) for p, image in enumerate(s, 1)]),
                ("clicks", " (request_id, image_id, time)", lambda i, s, c: [(i[0], image, i[1]) for image in c])):
            with cursor.copy(f"COPY {table}{columns} FROM STDIN") as copy:
                for impression, images, clicks in (generated if generated is not None else rows(items)):
                    for row in pick(impression, images, clicks):
                        copy.write_row(row)
        db.commit()
        db.execute("ANALYZE")


def time_report(where: str, folder: Path) -> dict:
    """`interbert abtest report` in a child process: its wall time and peak resident memory."""
    out = folder / "report.md"
    command = [sys.executable, "-m", "interbert.cli", "abtest", "report", where, "--out", str(out),
               "--plot", str(folder / "report.png")]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    took = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"abtest report failed on {where}: {child.stderr.read().decode()[-2000:]}")
    return {"seconds": round(took, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # Linux: KiB


def machine(load_before: float, load_after: float, args) -> dict:
    import psycopg

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "psycopg": psycopg.__version__, "libpq": psycopg.pq.version(),
            "postgres": args.postgres or "throwaway server (tests/helpers/postgres_server.py, fsync on)",
            "platform": platform.platform(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average_before": round(load_before, 2), "load_average_after": round(load_after, 2),
            "scale": args.scale, "seconds_per_write_setting": args.seconds,
            "loaded": load_before > MAX_START_LOAD}


def write_results(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = ["# A/B event store at scale: SQLite vs PostgreSQL", "",
             f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, SQLite {m['sqlite']}, psycopg {m['psycopg']} "
             f"(libpq {m['libpq']}), PostgreSQL: {m['postgres']}; {m['date']}.",
             f"1-minute load average {m['load_average_before']} before, {m['load_average_after']} after."
             + (" **Started on a busy machine (load > 1.0): the numbers measure other jobs too.**" if m["loaded"] else ""),
             "", "## Events written per second",
             "Through the event store API the service uses (not HTTP): each client a thread on one store object, "
             "as one `serve` process's request threads; an event is an impression (10 items) or a click, each "
             f"committed (durably) before the call returns; {m['seconds_per_write_setting']:g} s per setting.", "",
             "| engine | clients | events/s | events |", "|---|---:|---:|---:|"]
    lines += [f"| {w['engine']} | {w['clients']} | {w['events_per_second']:,.0f} | {w['events']:,} |"
              for w in results["writes"]]
    lines += ["", "## `interbert abtest report`",
              "A child process per run: wall time (interpreter start and the plot included) and peak resident "
              "memory (ru_maxrss); impressions are items shown, 10 per request, one user per 20 requests.", "",
              "| engine | impressions | seconds | peak RSS (MB) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['engine']} | {r['impressions']:,} | {r['seconds']:.1f} | {r['peak_rss_mb']:,.0f} |"
              for r in results["reports"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
