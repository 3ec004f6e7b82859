"""A throwaway PostgreSQL server for the tests: ``initdb`` into a temporary folder and ``pg_ctl start`` on a
free localhost port, owned by the test session, so no test depends on (or disturbs) a system service.

The server binaries come from Debian's ``postgresql`` package (/usr/lib/postgresql/N/bin) or PATH.
Without them the tests that need a server skip, saying so; under ``INTERBERT_REQUIRE_POSTGRES=1`` (set by
.ci/run, which installs the package) they fail instead, so CI cannot pass without having run them.
PostgreSQL refuses to run as root: as root the cluster belongs to the ``postgres`` user (runuser).

The server runs with fsync off: the tests kill `serve` processes and stop the server, never the machine,
so the operating system keeps every write either way; what they check (commit before acknowledgement,
synchronous_commit on) is the store's side, and a 2-core CI machine is spared an fsync per event.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from serve_process import free_port

REQUIRE_ENV = "INTERBERT_REQUIRE_POSTGRES"
SUPERUSER = "interbert"


def _unavailable(reason: str):
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 requires the PostgreSQL tests to run (CI installs Debian's "
                    "postgresql package in .ci/run)")
    pytest.skip(f"{reason}: the PostgreSQL event-store tests need it (apt-get install postgresql; "
                f"set {REQUIRE_ENV}=1 to make its absence a failure)")


def server_binaries() -> Path:
    """The folder holding initdb, pg_ctl and postgres (the newest Debian version first), else skip/fail."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda d: int(re.sub(r"\D", "", Path(d).parent.name) or 0), reverse=True)
    for name in ("pg_ctl", "initdb"):
        found = shutil.which(name)
        if found:
            candidates.insert(0, str(Path(found).resolve().parent))
    for folder in candidates:
        if all((Path(folder) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    _unavailable("no PostgreSQL server binaries (initdb, pg_ctl, postgres) were found")


def require_psycopg():
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg is not installed (pip install 'interbert[postgres]')")
    return psycopg


class PostgresServer:
    """One cluster in its own temporary folder; :meth:`stop` and :meth:`start` for outage tests."""

    def __init__(self, fsync: bool = False):
        """``fsync``: as a production server (benchmarks/abtest_scale.py times commits); off for the tests."""
        self.fsync = fsync
        self.bin = server_binaries()
        require_psycopg()
        self.as_user: list[str] = []
        self.folder = Path(tempfile.mkdtemp(prefix="interbert-pg-"))
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                _unavailable("running as root without a 'postgres' user to own the test cluster")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data = self.folder / "data"
        self.port = free_port()
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--no-sync", "-E", "UTF8",
                  "--locale=C")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            log = self.data / "server.log"
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr[-2000:]}{tail}")

    def start(self) -> None:
        options = f"-p {self.port} -h 127.0.0.1 -k {self.data}{'' if self.fsync else ' -F'} -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-o", options, "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """fast: sessions are ended at once (their open transactions rolled back), as a restarted server does."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def processes(self) -> list[int]:
        """The postmaster's pid, then every process below it (backends, checkpointer, WAL writer...)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        found, queue = [], [postmaster]
        while queue:
            pid = queue.pop()
            found.append(pid)
            with contextlib.suppress(FileNotFoundError):
                queue.extend(map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()))
        return found

    def pause(self) -> None:
        """A hung server (not a stopped one): every process of it SIGSTOPped, its sockets still open, so the
        kernel keeps accepting connections and bytes that nobody answers. The postmaster first: it forks no
        new backend meanwhile."""
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def require_password(self, role: str) -> None:
        """``role`` must give its password over TCP (scram-sha-256); everyone else stays trusted. The line goes
        first in pg_hba.conf (the first matching line decides) and the server reloads it."""
        import psycopg

        hba = self.data / "pg_hba.conf"
        rule = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
        if self.as_user:  # the file belongs to the postgres user: write it as root, keep its owner
            status = hba.stat()
            hba.write_text(rule + hba.read_text())
            os.chown(hba, status.st_uid, status.st_gid)
        else:
            hba.write_text(rule + hba.read_text())
        with psycopg.connect(self.uri(), autocommit=True) as db:
            db.execute("SELECT pg_reload_conf()")

    def uri(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.uri(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.resume()  # a paused server would never stop
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)
