"""``interbert serve --workers N``: N processes on one machine answering on one listening socket.

uvicorn's own supervisor does the work (``uvicorn.supervisors.Multiprocess``): the parent binds the socket
once and starts N spawned worker processes that accept on it (the kernel hands each connection to one of
them), pings them, and on SIGTERM or SIGINT sends each worker SIGTERM, which makes it stop accepting,
finish its requests in flight (``--shutdown-timeout``) and close its event store, then waits for them all.
What this module adds to it:

- Each worker builds the app from the command line itself (:func:`interbert.serve.cli.build_serve_app`):
  its own models, index and event-store connections. Nothing but the parsed arguments crosses the
  process boundary; an SQLite event log is one WAL file that every worker's connection writes (SQLite's
  locks order them), a PostgreSQL store one database.
- Every worker serves with :mod:`interbert.serve.server`'s bounded protocol (``--header-timeout``,
  ``--body-timeout``), ``--limit-concurrency`` (per worker) and ``--shutdown-timeout``.
- The first worker starts alone, and the others once it answers: a start that cannot succeed (a bad
  event store, a missing index) is one ``error:`` line from one worker, and the service exits with that
  error's code instead of N workers printing it N times.
- A worker that dies later (killed, out of memory) is replaced by uvicorn; a replacement that cannot
  start (its `error:` line, then exit code 3, uvicorn's start failure) stops the whole service, loudly:
  uvicorn logs it, every other worker is stopped, and the parent exits with that error's code. Requests the dead worker was answering are lost to
  their clients (never acknowledged: every event is committed before its answer).
- ``GET /metrics`` sums the workers' counters and histograms (prometheus-client's multiprocess mode over a
  folder of this service's own, removed at exit; a dead worker's counts stay in the sums). The info
  metrics and the re-rank gauges are the answering worker's own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import get_context

from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from interbert.serve.metrics import MULTIPROCESS_ENV
from interbert.serve.server import KEEP_ALIVE_TIMEOUT_S, MAX_HEADER_BYTES, bounded_protocol
from interbert.utils.logs import SERVICE_FORMAT, setup_cli_logging

FIRST_WORKER_START_S = 1800.0  # loading models and indexes on a busy machine; the parent waits this long at most


class WorkerConfig(Config):
    """uvicorn's Config, as each worker loads it: the app built from ``serve_args`` in the worker, the
    bounded protocol with this service's deadlines. (Config travels to the workers pickled; a protocol
    class made at run time does not pickle, so it is made in the worker.)"""

    def __init__(self, serve_args: argparse.Namespace, start_error_code, **kwargs):
        super().__init__(app="interbert.serve.cli:build_serve_app", factory=True, **kwargs)
        self.serve_args = serve_args
        self.start_error_code = start_error_code  # shared with the parent: the CLI's exit code of a failed start

    def load_app(self):
        return self._build

    def _build(self):
        from interbert.cli import error_exit_code, error_message
        from interbert.serve.cli import build_serve_app

        try:
            app, _ = build_serve_app(self.serve_args)
        except Exception as error:  # noqa: BLE001 -- the user's errors become one line; a bug keeps its traceback
            code = error_exit_code(error) or (1 if isinstance(error, (ValueError, OSError)) else None)
            if code is None:
                raise
            print(f"error: {error_message(error)}", file=sys.stderr, flush=True)
            self.start_error_code.value = code
            sys.exit(STARTUP_FAILURE)  # uvicorn's "cannot start": the supervisor stops instead of restarting
        return app

    def load(self) -> None:
        super().load()
        self.http_protocol_class = bounded_protocol(self.serve_args.header_timeout, self.serve_args.body_timeout)


class Supervisor(Multiprocess):
    """uvicorn's supervisor, starting the first worker alone (see the module's docstring)."""

    start_failed: bool = False

    def init_processes(self) -> None:
        first = Process(self.config, self.sockets)
        first.start()
        self.processes.append(first)
        deadline = time.monotonic() + FIRST_WORKER_START_S
        while not first.is_ready(timeout=1):
            self.handle_signals()  # Ctrl-C while the models load
            if self.should_exit.is_set():
                return
            if not first.process.is_alive() or time.monotonic() > deadline:
                first.kill()
                first.join()
                self.start_failed = True
                self.should_exit.set()
                return
            time.sleep(0.1)
        for _ in range(self.processes_num - 1):
            process = Process(self.config, self.sockets)
            process.start()
            self.processes.append(process)

    def handle_term(self) -> None:
        super().handle_term()
        self._stop_listening()

    def handle_int(self) -> None:
        super().handle_int()
        self._stop_listening()

    def _stop_listening(self) -> None:
        """Close the parent's copy of the listening socket: once the stopping workers close theirs, new
        connections are refused (a proxy tries another replica) instead of waiting in a backlog nobody
        accepts from any more."""
        for sock in self.sockets:
            sock.close()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        if self.should_exit.is_set() and not self.start_failed and self.config.start_error_code.value:
            self.start_failed = True  # a replacement worker could not start: uvicorn stops the service


def serve_workers(args: argparse.Namespace) -> int:
    """Run ``serve`` as ``args.workers`` processes until SIGTERM/SIGINT; the exit code: 0 after a requested
    stop, the failed worker's error code (1 or 2) when a worker could not start."""
    setup_cli_logging(SERVICE_FORMAT, datefmt=None)
    start_error_code = get_context("spawn").RawValue("i", 0)
    metrics_folder = tempfile.mkdtemp(prefix="interbert-metrics-")
    os.environ[MULTIPROCESS_ENV] = metrics_folder  # inherited by the spawned workers, read when they import prometheus_client
    try:
        config = WorkerConfig(
            args, start_error_code, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level,
            timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            limit_concurrency=args.limit_concurrency, access_log=args.access_log == "uvicorn",
            timeout_graceful_shutdown=args.shutdown_timeout, http="h11")
        supervisor = Supervisor(config, sockets=[config.bind_socket()])
        supervisor.run()
    finally:
        os.environ.pop(MULTIPROCESS_ENV, None)
        shutil.rmtree(metrics_folder, ignore_errors=True)
    if supervisor.start_failed:
        return start_error_code.value or 1
    return 0
