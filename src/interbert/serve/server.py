"""The HTTP server under both ``interbert serve`` modes: uvicorn, with every connection's time bounded.

The installed uvicorn bounds only the idle time *between* requests (``timeout_keep_alive``, armed after a
response). It has no deadline for reading a request: a client that connects and sends nothing, or half a
header, or a body one byte a minute, holds its connection (a file descriptor, an h11 buffer) for as long
as it likes, and 400 such clients stayed open past 65 s (slowloris). Neither ``h11_max_incomplete_event_size``
(a byte bound, not a time bound) nor ``timeout_graceful_shutdown`` (shutdown only) changes that, and the
ASGI app never sees a request whose head has not arrived. So the bound lives in the protocol:
:class:`BoundedH11Protocol`, uvicorn's own h11 protocol with two deadlines per request:

    header_timeout  from the connection's start (or the first byte of the next request on a kept-alive
                    connection) until the request head is complete
    body_timeout    from the end of the head until the body is complete

A request that misses one is answered ``408 Request Timeout`` (when no response has started) and its
connection closed. Beside them: ``timeout_keep_alive`` (idle between requests), ``h11_max_incomplete_event_size``
(the largest request head, else 400) and ``limit_concurrency`` (connections plus running requests; past
it new requests are answered 503), so the number of connections and the time each may take are both bounded.

The h11 protocol is used whether or not httptools is installed (uvicorn's "auto" would pick httptools,
which this guard does not cover): one implementation, the one the tests exercise.

Stopping. On SIGTERM (or Ctrl-C) uvicorn stops accepting connections, lets the requests in flight finish
for up to ``shutdown_timeout`` seconds (then cancels them), and runs the app's shutdown (the A/B app
closes its event log, after the writes in progress). Every event is committed before the answer that
acknowledges it, so nothing acknowledged is left to flush. uvicorn then re-raises the signal, which would
end the process "killed by SIGTERM"; :func:`run_server` catches that SIGTERM, so a stop that was asked for
and done in order exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import threading

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from interbert.serve import (
    DEFAULT_BODY_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, DEFAULT_LIMIT_CONCURRENCY, DEFAULT_SHUTDOWN_TIMEOUT_S,
)

KEEP_ALIVE_TIMEOUT_S = 5  # uvicorn's default, set explicitly: idle time allowed between two requests
MAX_HEADER_BYTES = 16 * 1024  # a request head larger than this is answered 400 (h11's own default, made explicit)

_TIMEOUT_BODY = b"request not received in time\n"
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"connection: close\r\ncontent-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n"
                     + _TIMEOUT_BODY)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's head and one for its body (see the module)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None
        super().connection_made(transport)
        self._arm("head", self.header_timeout)  # also a client that connects and never sends a byte

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._phase is None:
            self._arm("head", self.header_timeout)  # the next request on a kept-alive connection begins
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()  # a pipelined request may have been read meanwhile

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Move the deadline along with what h11 has read of the client's request."""
        state = self.conn.their_state
        if state is h11.IDLE:
            return  # still reading a head: its deadline (if a byte of it has come) keeps running
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body", self.body_timeout)
            return
        self._disarm()  # the request is read (DONE), or the connection is ending: nothing left to wait for

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expired(self, phase: str) -> None:
        self._deadline, self._phase = None, None
        if self.transport.is_closing():
            return
        # uvicorn's own log (shown at the default level), as its other refusals (400, 503) are
        self.logger.info("%s - closed: the request %s did not arrive within %g s",
                    "%s:%d" % self.client if self.client else "client", phase,
                    self.header_timeout if phase == "head" else self.body_timeout)
        answering = self.cycle is not None and not self.cycle.response_complete
        if not (answering and self.cycle.response_started):
            self.transport.write(_TIMEOUT_RESPONSE)
        if self.cycle is not None and answering:
            self.cycle.keep_alive = False
        self.transport.close()  # connection_lost tells a waiting app (receive() -> http.disconnect)


def bounded_protocol(header_timeout: float, body_timeout: float) -> type[BoundedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, with these deadlines."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,),
                {"header_timeout": float(header_timeout), "body_timeout": float(body_timeout)})


def run_server(app, host: str, port: int, log_level: str, header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
               body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
               limit_concurrency: int = DEFAULT_LIMIT_CONCURRENCY, access_log: bool = True,
               shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
    """Serve ``app`` until interrupted, with every bound of the module docstring. ``access_log``: uvicorn's
    own access log (off when the app writes its own, or none is wanted)."""
    import uvicorn

    with _sigterm_is_a_clean_exit():
        uvicorn.run(app, host=host, port=port, log_level=log_level,
                    http=bounded_protocol(header_timeout, body_timeout),
                    timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                    limit_concurrency=limit_concurrency, access_log=access_log,
                    timeout_graceful_shutdown=shutdown_timeout)


def _exit_cleanly(signum, frame):
    raise SystemExit(0)


class _sigterm_is_a_clean_exit:
    """While uvicorn runs it handles SIGTERM itself (the graceful stop); afterwards it re-raises the signal
    to the handler found before it, installed here: that one exits 0. (Not a no-op handler: a SIGTERM in
    the moment before uvicorn installs its own must still stop the process.)"""

    def __enter__(self):
        # signal.signal works only in the main thread (tests also run the server in other threads)
        self.previous = (signal.signal(signal.SIGTERM, _exit_cleanly)
                         if threading.current_thread() is threading.main_thread() else None)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
