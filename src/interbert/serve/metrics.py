"""What a running service is doing, for operators: ``GET /metrics`` (the Prometheus text format), the
``X-Request-Id`` of every answer and, behind ``serve --access-log json``, one JSON line per request.

One ASGI middleware (:class:`Observe`) sees every request of an app. It names the request by its route
*template* (``/images/{image_id}``, never the raw path: image ids would make one time series per image)
and by the arm that answered it, which an A/B route notes with :func:`note`. Requests matching no route
are counted under ``route="unmatched"``.

Metrics (each app has its own :class:`~prometheus_client.CollectorRegistry`, so two apps in one process,
as in the tests, never share or collide):

    interbert_http_requests_total{method,route,status,arm}           requests answered
    interbert_http_request_duration_seconds{method,route,status,arm}  their latency (histogram)
    interbert_rerank_slots / interbert_rerank_slots_in_use            the re-rank gate's bound and use
    interbert_rerank_rejected_total                                   re-ranked searches answered 503 (busy)
    interbert_events_written_total{kind} / _failed_total{kind}        A/B: impressions and clicks stored / not
    interbert_clicks_refused_total{reason}                            A/B: clicks refused (401/403/404/422/429)
    interbert_service_info{...} / interbert_arm_info{arm,...}         model and index identity

Under ``serve --workers N`` (:mod:`interbert.serve.workers`) prometheus-client runs in its multiprocess
mode: each worker's counters and histograms live in files of one folder, and ``GET /metrics`` in any
worker answers their sums over all workers (also the dead ones'), with the info metrics and the re-rank
gauges of the worker that answered (prometheus-client cannot sum an info metric; a gauge read from the
gate when scraped is one process's).

``arm`` is empty for requests no arm answered (the single-index service, /health, /metrics...). The
access log never holds a query or a raw user id: an A/B user is logged as a short sha256 prefix only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TextIO

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.routing import Match

from interbert.errors import UsageError

REQUEST_ID_HEADER = "X-Request-Id"
# A client's (or a proxy's) id is kept only when it cannot smuggle anything into a log line or a header.
_GOOD_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
USER_HASH_CHARS = 12  # enough to follow one user through a log, too short to be worth reversing by brute force
# Seconds: a FAISS-only search takes milliseconds, a re-ranked one tens to hundreds, a saturated one waits
# up to the re-rank queue timeout (seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ACCESS_LOG_MODES = ("uvicorn", "json", "off")
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's switch to its multiprocess mode

AccessLog = Callable[[dict], None]  # receives one record per request


class ServiceMetrics:
    """The metrics of one app, in its own registry."""

    def __init__(self):
        self.registry = CollectorRegistry()
        labels = ("method", "route", "status", "arm")
        self.requests = Counter("interbert_http_requests", "HTTP requests answered, by route template, status "
                                "and arm", labels, registry=self.registry)
        self.latency = Histogram("interbert_http_request_duration_seconds", "Time from a request's arrival to "
                                 "the end of its answer", labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.events_written = Counter("interbert_events_written", "Events committed to the event log "
                                      "(kind: impression or click)", ("kind",), registry=self.registry)
        self.events_failed = Counter("interbert_events_failed", "Events the event log could not store (the "
                                     "request was answered 503)", ("kind",), registry=self.registry)
        self.clicks_refused = Counter("interbert_clicks_refused", "Clicks refused, by reason",
                                      ("reason",), registry=self.registry)
        self.service_info = Info("interbert_service", "What this service serves", registry=self.registry)
        self.arm_info = Info("interbert_arm", "What each arm of the experiment serves", ("arm",),
                             registry=self.registry)
        self._per_process = [self.service_info, self.arm_info]  # not summed over workers (see the module)

    def watch_rerank_gate(self, gate) -> None:
        """Report the gate's slots and refusals, read from it when scraped (the gate counts them itself)."""
        collector = _GateCollector(gate)
        self.registry.register(collector)
        self._per_process.append(collector)

    def exposition(self) -> tuple[bytes, str]:
        """The body and content type of ``GET /metrics``: this process's metrics, or under several workers
        (prometheus-client's multiprocess mode) the sums over all of them and this worker's own gauges."""
        folder = os.environ.get(MULTIPROCESS_ENV)
        if not folder:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        summed = CollectorRegistry()
        MultiProcessCollector(summed, folder)
        summed.register(_Chained(self._per_process))
        return generate_latest(summed), CONTENT_TYPE_LATEST


class _Chained:
    """One collector yielding the families of several (registered together in the summed registry)."""

    def __init__(self, collectors):
        self.collectors = collectors

    def collect(self):
        for collector in self.collectors:
            yield from collector.collect()


class _GateCollector:
    def __init__(self, gate):
        self.gate = gate

    def collect(self):
        yield GaugeMetricFamily("interbert_rerank_slots", "Re-ranked searches that may run at once",
                                value=self.gate.limit)
        yield GaugeMetricFamily("interbert_rerank_slots_in_use", "Re-ranked searches running now",
                                value=self.gate.in_use)
        yield CounterMetricFamily("interbert_rerank_rejected", "Re-ranked searches answered 503: every slot "
                                  "stayed busy for the whole queue timeout", value=self.gate.rejected)


def note(request, *, arm: str | None = None, user_id: str | None = None) -> None:
    """Tell the middleware which arm answered ``request`` and for which user (the latter only ever logged
    hashed). Kept in the request's own state: nothing is shared between requests."""
    if arm is not None:
        request.state.arm = arm
    if user_id is not None:
        request.state.user_id = user_id


def user_hash(user_id: str) -> str:
    return hashlib.sha256(user_id.encode()).hexdigest()[:USER_HASH_CHARS]


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-Id when it is well formed (so a proxy's id follows the request), else a new one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1")
            if _GOOD_REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class Observe:
    """ASGI middleware: counts and times every HTTP request, answers with its X-Request-Id, and hands one
    record per request to ``access_log`` (None: no access log of ours)."""

    def __init__(self, app, metrics: ServiceMetrics, router, access_log: AccessLog | None = None):
        self.app, self.metrics, self.router, self.access_log = app, metrics, router, access_log

    def route_of(self, scope) -> str:
        # The routing the app is about to do, done once more here (a handful of regular expressions): it
        # names also the requests that end before a route runs (413 from the body bound, 404 of no route).
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:  # PARTIAL: the path matches but not the method (405)
                return getattr(route, "path_format", None) or route.path
        return "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        request_id = request_id_of(scope["headers"])
        route = self.route_of(scope)
        status = None

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER.encode(), request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            if status is None:
                status = 500  # what Starlette's outermost error handler is about to answer
            raise
        finally:
            seconds = time.perf_counter() - start
            state = scope.get("state") or {}
            arm = state.get("arm") or ""
            labels = (scope["method"], route, str(status) if status is not None else "none", arm)
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(seconds)
            if self.access_log is not None:
                record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                          "request_id": request_id, "method": scope["method"], "route": route,
                          "status": status, "latency_ms": round(1000 * seconds, 2)}
                if arm:
                    record["arm"] = arm
                if state.get("user_id"):
                    record["user"] = user_hash(state["user_id"])
                self.access_log(record)


class JsonLines:
    """An access log sink: one JSON object per line, flushed at once (a crash loses no logged request)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._lock = threading.Lock()  # one line at a time, whichever thread writes

    def __call__(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.stream.write(line)
            self.stream.flush()


def access_log_sink(mode: str, path: str | None) -> AccessLog | None:
    """The sink ``serve --access-log MODE [--access-log-file PATH]`` asks for (None: not ours)."""
    if mode not in ACCESS_LOG_MODES:
        raise UsageError(f"--access-log must be one of {', '.join(ACCESS_LOG_MODES)}, got {mode!r}")
    if path is not None and mode != "json":
        raise UsageError("--access-log-file is where the JSON access log goes: give it with --access-log json")
    if mode != "json":
        return None
    if path is None:
        return JsonLines(sys.stderr)
    try:
        return JsonLines(open(path, "a", encoding="utf-8"))  # appended: a restart keeps the earlier lines
    except OSError as error:
        raise UsageError(f"--access-log-file {path}: {error.strerror or error}") from None
