"""The search service as an A/B experiment: several arms (each an index, its model, and optionally a topic
feed), every user assigned to one arm by :func:`interbert.serve.abtest.assign_arm`, every answer logged.

    GET  /topics                    the topics every arm has a feed for
    GET  /topics/{topic_id}?user=   the user's arm's ranked items for the topic   -> request_id, arm, results
    POST /search                    as the single-index service, answered by the user's arm -> + request_id, arm
    POST /events/click              {request_id, image_id}: a click on an item that request showed
    GET  /metrics, /health/live, /health/ready   as the single-index service; readiness also asks the event log

The user is named by the ``X-User-Id`` header, else the ``user`` query parameter, else the
``interbert_user`` cookie; a request with none gets a fresh id, set as that cookie (signed), so a browser
stays in its arm. Only ids signed with the server's secret are believed (:mod:`interbert.serve.identity`):
an unsigned header or parameter is refused with 401, one signed with another secret with 403, unless the
server runs with ``insecure_user_ids`` (local tests); a cookie that does not verify is replaced by a
fresh id. A click counts only from the user its request was served to (else 403), and clicks are
rate-limited per user and per request (429 with Retry-After).

An answer's impression is committed to the event log (fsynced) before the answer is sent, so a click can
always find its request; a click is acknowledged only once it is committed. When the log cannot store an
event (SQLite: locked beyond its busy wait, a disk error, a read-only file; PostgreSQL: a server that
refuses or drops the connection), the request is answered 503 with
Retry-After and counted in GET /metrics: never a 500, never an acknowledgement of what was not stored. The log binds each arm to the
hashes of its weights, index and feed at the experiment's first start; a later start whose arms differ is
refused before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from interbert.errors import UsageError, shown
from interbert.serve import DEFAULT_RERANK_QUEUE_TIMEOUT
from interbert.serve.abtest import MAX_USER_ID_CHARS, ArmSpec, assign_arm, index_sha256, valid_user_id
from interbert.serve.events import (
    BUSY_WAIT, ArmHashes, ExperimentConfig, NotShown, NotYours, UnknownRequest, check_existing_log, open_event_store,
)
from interbert.serve.identity import (
    DEFAULT_REQUEST_CLICKS_PER_MINUTE, DEFAULT_USER_CLICKS_PER_MINUTE, SIGNATURE_CHARS, Refused, TokenBuckets, UserIds,
    random_secret, retry_after,
)
from interbert.serve.index import MANIFEST, recorded_path
from interbert.serve.metrics import AccessLog, Observe, ServiceMetrics, note
from interbert.serve.service import (
    MAX_BODY_BYTES, MAX_K, RERANK_CAP, RETRY_AFTER_S, BodySizeLimit, RerankGate, RerankSaturated, SearchHit,
    SearchRequest, SearchResponse, SearchService, _failure, _validation_message, add_operations_routes, api_app,
    default_max_concurrent_reranks,
)
from interbert.serve.topics import Feed
from interbert.utils.files import file_sha256

logger = logging.getLogger(__name__)

USER_COOKIE = "interbert_user"
USER_HEADER = "X-User-Id"
COOKIE_MAX_AGE_S = 365 * 24 * 3600
MAX_USER_TOKEN_CHARS = MAX_USER_ID_CHARS + 1 + SIGNATURE_CHARS  # "<id>.<hex hmac>"
EVENTS_RETRY_AFTER_S = 5  # the Retry-After of a 503 for an unavailable event log: a lock or a disk takes a while
READY_WAIT_S = 1.0  # how long the readiness probe waits for the event log's write lock
# Why Users.of refused a click's user (its HTTP status), as interbert_clicks_refused_total's reason
USER_REFUSALS = {401: "unsigned_user", 403: "bad_signature", 422: "bad_user_id"}


class Arm:
    """One arm, loaded: its search service (index + model) and its feed (or None)."""

    def __init__(self, spec: ArmSpec, rerank_cap: int, device: str, compile: str = "off"):
        self.name = spec.name
        self.service = SearchService(spec.index, spec.model, rerank_cap=rerank_cap, device=device, compile=compile)
        self.feed = Feed(spec.feed) if spec.feed else None
        if self.feed and self.feed.weights_sha256 != self.service.index.manifest["weights_sha256"]:
            # A feed ranks the images its own model embedded; paired with another index its items and
            # thumbnails would come from elsewhere, and the experiment would compare the wrong things.
            raise UsageError(f"arm {spec.name}: the feed {spec.feed} was built with the model at "
                             f"{self.feed.meta.get('model')}, the index {spec.index} with another one")


def arm_hashes(spec: ArmSpec) -> ArmHashes:
    """What the event log binds an arm to, from its files alone (no model is loaded): the weights hash
    the index recorded (loading the arm checks the model's weights against it), the index's and the
    feed's content hashes."""
    manifest = json.loads((Path(spec.index) / MANIFEST).read_text(encoding="utf-8"))
    model = Path(spec.model).resolve() if spec.model else recorded_path(Path(spec.index), manifest["model"], "model")
    return ArmHashes(model=str(model),
                     weights_sha256=manifest["weights_sha256"], index_sha256=index_sha256(spec.index),
                     feed_sha256=file_sha256(spec.feed) if spec.feed else None)


def _hashes_before_loading(specs: Sequence[ArmSpec]) -> dict[str, ArmHashes] | None:
    try:
        return {spec.name: arm_hashes(spec) for spec in specs}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable index or feed: loading the arm says what is wrong with it


class ExperimentSearchResponse(SearchResponse):
    request_id: str
    arm: str


class TopicSummary(BaseModel):
    topic_id: str
    title: str


class TopicItem(SearchHit):
    position: int  # 1-based: the position a click is attributed to


class TopicResponse(BaseModel):
    request_id: str
    arm: str
    topic_id: str
    title: str
    results: list[TopicItem]


class ClickRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{32}$")]  # what log_impression hands out
    image_id: Annotated[StrictStr, Field(min_length=1, max_length=512)]


class ClickRefused(HTTPException):
    """A click not counted; ``reason`` names why in GET /metrics."""

    def __init__(self, reason: str, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status, detail, headers=headers)
        self.reason = reason


class ClickResponse(BaseModel):
    request_id: str
    image_id: str
    position: int
    counted: bool  # False: this request's item was clicked before and is counted once


class Users:
    """Who a request comes from (see the module's docstring), and the cookie that keeps a browser's id."""

    def __init__(self, ids: UserIds):
        self.ids = ids

    def of(self, request: Request, user: str | None) -> tuple[str, str | None]:
        """(user id, the signed cookie to set for a new browser or None); raises HTTPException."""
        try:
            header = request.headers.get(USER_HEADER)
            if header is not None:
                return self._given(header, USER_HEADER), None
            if user is not None:
                return self._given(user, "?user="), None
        except Refused as refused:
            raise HTTPException(refused.status, refused.detail) from None
        cookie = request.cookies.get(USER_COOKIE)
        known = self.ids.from_cookie(cookie) if cookie else None
        if known is not None and valid_user_id(known):
            return known, None
        user_id = uuid.uuid4().hex  # a new browser, or a cookie this server did not sign
        return user_id, self.ids.sign(user_id)

    def _given(self, token: str, where: str) -> str:
        if not 0 < len(token) <= MAX_USER_TOKEN_CHARS or not token.isprintable():
            raise HTTPException(422, f"{where}: user id must be 1-{MAX_USER_ID_CHARS} printable characters "
                                     f"(with its signature, at most {MAX_USER_TOKEN_CHARS})")
        user_id = self.ids.from_given(token, where)
        if not valid_user_id(user_id):
            raise HTTPException(422, f"{where}: user id must be 1-{MAX_USER_ID_CHARS} printable characters")
        return user_id


def _remember(request: Request, response: Response, cookie: str | None) -> None:
    if cookie is not None:
        # httponly: the page never reads it (fetch sends it); secure when the request came over https.
        response.set_cookie(USER_COOKIE, cookie, max_age=COOKIE_MAX_AGE_S, samesite="lax", httponly=True,
                            secure=request.url.scheme == "https")


class ClickLimits:
    """Token buckets per user and per request (``*_per_minute`` clicks at once, refilled at that rate)."""

    def __init__(self, user_per_minute: int, request_per_minute: int):
        self.user_per_minute, self.request_per_minute = user_per_minute, request_per_minute
        self._users, self._requests = TokenBuckets(user_per_minute), TokenBuckets(request_per_minute)

    def check(self, user_id: str, request_id: str) -> None:
        """Raise 429 with Retry-After when this user or this request has clicked too much lately."""
        for buckets, key, what, limit, reason in (
                (self._users, user_id, "this user", self.user_per_minute, "user_rate_limit"),
                (self._requests, request_id, "this request", self.request_per_minute, "request_rate_limit")):
            wait = buckets.take(key)
            if wait > 0:
                raise ClickRefused(reason, 429, f"too many clicks from {what} (at most {limit} a minute); retry "
                                   "later", headers={"Retry-After": retry_after(wait)})


def _warn_about_user_ids(random_secret_made: bool, insecure: bool) -> None:
    if random_secret_made:
        logger.warning("no --user-secret-file: user ids are signed with a random secret of this process; users' "
                       "cookies will not survive a restart, nor be valid on another replica (each browser then "
                       "becomes a new user)")
    if insecure:
        logger.warning("--insecure-user-ids: UNSIGNED user ids are accepted from X-User-Id and ?user=, so anyone "
                       "can log impressions and clicks as any user; for local tests and simulation only")


def common_topics(arms: Sequence[Arm]) -> list[TopicSummary]:
    """Topics every arm has a finished feed for, in the first arm's order: the arms are compared on the
    same topics, so a topic one arm lacks is offered to nobody."""
    feeds = [arm.feed for arm in arms]
    if any(feed is None for feed in feeds):
        return []
    shared = set.intersection(*(set(feed.items) for feed in feeds))
    return [TopicSummary(topic_id=t.topic_id, title=t.title) for t in feeds[0].topics if t.topic_id in shared]


def create_experiment_app(arm_specs: Sequence[ArmSpec], split: Sequence[float], experiment: str,
                          events: str | Path, salt: str | None = None, rerank_cap: int = RERANK_CAP,
                          max_body_bytes: int = MAX_BODY_BYTES, device: str = "cpu",
                          max_concurrent_reranks: int | None = None,
                          rerank_queue_timeout: float = DEFAULT_RERANK_QUEUE_TIMEOUT,
                          user_secret: bytes | None = None, insecure_user_ids: bool = False,
                          user_clicks_per_minute: int = DEFAULT_USER_CLICKS_PER_MINUTE,
                          request_clicks_per_minute: int = DEFAULT_REQUEST_CLICKS_PER_MINUTE,
                          access_log: AccessLog | None = None, events_busy_wait: float = BUSY_WAIT,
                          compile: str = "off") -> FastAPI:
    """``user_secret``: the key user ids are signed with (None: a random one for this process, so cookies
    last only as long as it); ``insecure_user_ids``: also take unsigned ids from X-User-Id / ?user=;
    ``access_log`` receives one record per request (:mod:`interbert.serve.metrics`); ``events_busy_wait``:
    seconds a write waits for another process's lock on the event log before the request is answered 503;
    ``compile``: every arm's re-rank on static shapes through torch.compile (``serve --compile``).

    Long because each route is a closure over the arms, the log and the limits, FastAPI's usual shape; what a
    route does beyond reading its request and answering lives in identity.py, events.py and metrics.py."""
    names = [spec.name for spec in arm_specs]
    if len(names) < 2:
        raise UsageError("an experiment needs at least two arms (--arm control=... --arm treatment=...)")
    if len(set(names)) != len(names):
        raise UsageError(f"arm names must differ, got {names}")
    if len(split) != len(names):
        raise UsageError(f"{len(split)} split shares for {len(names)} arms")
    if [spec.feed is None for spec in arm_specs].count(True) not in (0, len(names)):
        raise UsageError("give every arm a feed (NAME=INDEX,FEED) or none: topics are compared across all arms")
    gate = RerankGate(max_concurrent_reranks or default_max_concurrent_reranks(), rerank_queue_timeout)
    limits = ClickLimits(user_clicks_per_minute, request_clicks_per_minute)
    config = ExperimentConfig(experiment, salt if salt is not None else experiment, tuple(names), tuple(split))
    # A log of another experiment or of other arms is refused now, in a moment, not after every arm's model
    # has loaded; EventLog checks again (inside its transaction) once they have.
    hashes = _hashes_before_loading(arm_specs)
    check_existing_log(events, config, hashes)
    arms = {spec.name: Arm(spec, rerank_cap, device, compile) for spec in arm_specs}
    log = open_event_store(events, config, hashes or {spec.name: arm_hashes(spec) for spec in arm_specs},
                           busy_wait=events_busy_wait)
    if log.upgraded:
        logger.warning("%s: recorded the arms' weights, index and feed hashes of experiment %r (a log written "
                       "before they were recorded); later starts with other arms are refused", log.where, config.name)
    users = Users(UserIds(user_secret if user_secret is not None else random_secret(), insecure_user_ids))
    _warn_about_user_ids(user_secret is None, insecure_user_ids)
    topics = common_topics(list(arms.values()))
    titles = {t.topic_id: t.title for t in topics}
    page = resources.files("interbert.serve").joinpath("page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        log.close()

    app = api_app("interbert experiment", lifespan=lifespan)
    app.state.arms, app.state.event_log, app.state.experiment = arms, log, config
    app.state.rerank_gate = gate
    metrics = ServiceMetrics()
    metrics.watch_rerank_gate(gate)
    metrics.service_info.info({"kind": "experiment", "experiment": config.name, "arms": ",".join(config.arms),
                               "events": log.where})
    for arm, share in zip(arms.values(), config.split):
        metrics.arm_info.labels(arm.name).info({**arm.service.info(), "share": f"{share:g}",
                                                "feed_topics": str(len(arm.feed.topics) if arm.feed else 0)})
    app.state.metrics = metrics

    def arm_of(user_id: str) -> Arm:
        return arms[assign_arm(user_id, config.salt, config.arms, config.split)]

    def stored(kind: str, write, *args, counted=lambda result: True):
        """``write(*args)`` on the event log (blocking: call it in a worker thread), counted in the metrics.
        A store that cannot take the event (SQLite: locked beyond the busy wait, a disk error; PostgreSQL:
        refused or lost connection, a lock or statement timeout) answers 503 with Retry-After: the
        transaction was rolled back (or its COMMIT's fate is unknown), and nothing is acknowledged."""
        try:
            result = write(*args)
        except log.UNAVAILABLE as error:
            metrics.events_failed.labels(kind).inc()
            logger.error("%s: a %s was not stored: %s", log.where, kind, error)
            raise HTTPException(503, f"the event log cannot store events now ({error}); nothing was recorded: "
                                     "retry later", headers={"Retry-After": str(EVENTS_RETRY_AFTER_S)}) from None
        if counted(result):
            metrics.events_written.labels(kind).inc()
        return result

    def readiness() -> dict[str, str]:
        checks = {f"{arm.name}.{part}": value for arm in arms.values() for part, value in arm.service.readiness().items()}
        try:
            log.check_writable(READY_WAIT_S)
            checks["events"] = "ok"
        except log.ERRORS as error:
            checks["events"] = _failure(error)
        return checks

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(error)}, status_code=422)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "experiment": config.name, "events": log.where,
                "arms": [{"name": arm.name, "share": share, "images": len(arm.service.index),
                          "model": str(arm.service.model.model_dir.resolve()),
                          "topics": len(arm.feed.topics) if arm.feed else 0}
                         for arm, share in zip(arms.values(), config.split)],
                "topics": len(topics), "max_concurrent_reranks": gate.limit,
                "user_ids": "insecure: unsigned ids accepted (--insecure-user-ids)" if insecure_user_ids else "signed",
                "user_secret": "per-process (cookies do not survive a restart)" if user_secret is None else "given",
                "clicks_per_minute": {"user": user_clicks_per_minute, "request": request_clicks_per_minute},
                "pid": os.getpid()}  # which process answered (serve --workers N runs several)

    @app.post("/search", response_model=ExperimentSearchResponse, response_model_exclude_none=True)
    async def search(body: SearchRequest, request: Request, response: Response,
                     user: Annotated[str | None, Query(max_length=MAX_USER_TOKEN_CHARS)] = None):
        user_id, cookie = users.of(request, user)
        arm = arm_of(user_id)
        note(request, arm=arm.name, user_id=user_id)

        def answer() -> ExperimentSearchResponse:
            found = arm.service.search(body.query, body.k, body.rerank)
            request_id = stored("impression", lambda: log.log_impression(
                user_id, arm.name, "search", [hit.image_id for hit in found.results], query=body.query))
            return ExperimentSearchResponse(**found.model_dump(), request_id=request_id, arm=arm.name)

        _remember(request, response, cookie)
        if not body.rerank:
            return await run_in_threadpool(answer)
        try:
            async with gate.slot():
                return await run_in_threadpool(answer)
        except RerankSaturated:
            raise HTTPException(503, f"busy: {gate.limit} re-ranked searches are running; retry, or search "
                                     f"without rerank", headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    @app.get("/topics", response_model=list[TopicSummary])
    async def list_topics() -> list[TopicSummary]:
        return topics

    @app.get("/topics/{topic_id}", response_model=TopicResponse, response_model_exclude_none=True)
    async def topic_feed(topic_id: str, request: Request, response: Response,
                         user: Annotated[str | None, Query(max_length=MAX_USER_TOKEN_CHARS)] = None,
                         k: Annotated[int, Query(ge=1, le=MAX_K)] = MAX_K) -> TopicResponse:
        if topic_id not in titles:
            raise HTTPException(404, f"no topic {shown(topic_id)}" + ("" if topics else " (this server has no feeds)"))
        user_id, cookie = users.of(request, user)
        arm = arm_of(user_id)
        note(request, arm=arm.name, user_id=user_id)
        items = arm.feed.items[topic_id][:k]
        records = {r.image_id: r for r in (arm.service.index.record(item.image_id) for item in items) if r}
        results = [
            TopicItem(position=position, image_id=item.image_id, score=item.score, similarity=item.similarity,
                      caption=records[item.image_id].caption if item.image_id in records else None,
                      thumbnail_url=f"/images/{quote(item.image_id, safe='')}"
                      if item.image_id in records and records[item.image_id].thumbnail else None)
            for position, item in enumerate(items, 1)
        ]
        request_id = await run_in_threadpool(stored, "impression", log.log_impression, user_id, arm.name, "topic",
                                             [item.image_id for item in items], topic_id)
        _remember(request, response, cookie)
        return TopicResponse(request_id=request_id, arm=arm.name, topic_id=topic_id, title=titles[topic_id],
                             results=results)

    @app.post("/events/click", response_model=ClickResponse)
    async def click(body: ClickRequest, request: Request,
                    user: Annotated[str | None, Query(max_length=MAX_USER_TOKEN_CHARS)] = None) -> ClickResponse:
        try:
            return await accept_click(body, request, user)
        except ClickRefused as refused:
            metrics.clicks_refused.labels(refused.reason).inc()
            raise

    async def accept_click(body: ClickRequest, request: Request, user: str | None) -> ClickResponse:
        try:
            user_id, cookie = users.of(request, user)
        except HTTPException as refused:
            raise ClickRefused(USER_REFUSALS.get(refused.status_code, "bad_user_id"), refused.status_code,
                               refused.detail) from None
        if cookie is not None:  # no id at all: nobody was served anything under it
            raise ClickRefused("no_user", 401, f"a click must name its user: the {USER_COOKIE} cookie or "
                                               f"{USER_HEADER} of the request it clicks in")
        note(request, arm=arm_of(user_id).name, user_id=user_id)
        limits.check(user_id, body.request_id)
        try:
            counted, position = await run_in_threadpool(stored, "click", log.log_click, body.request_id,
                                                         body.image_id, user_id, counted=lambda result: result[0])
        except UnknownRequest as error:
            raise ClickRefused("unknown_request", 404, str(error)) from None
        except NotShown as error:
            raise ClickRefused("not_shown", 422, str(error)) from None
        except NotYours as error:
            raise ClickRefused("not_yours", 403, str(error)) from None
        return ClickResponse(request_id=body.request_id, image_id=body.image_id, position=position, counted=counted)

    @app.get("/images/{image_id:path}")
    async def image(image_id: str) -> FileResponse:
        # Arms may index different galleries: serve the first arm's copy that has a thumbnail. As in the
        # single-index service, only paths the index stored ever reach the file system.
        for arm in arms.values():
            record = arm.service.index.record(image_id)
            path = arm.service.index.thumbnail_file(record) if record is not None else None  # inside thumbnails/
            if path is not None:
                return FileResponse(path, media_type="image/jpeg")
        raise HTTPException(404, f"image {shown(image_id)} has no thumbnail in any arm's index")

    @app.get("/", response_class=HTMLResponse)
    async def home(request: Request, user: Annotated[str | None, Query(max_length=MAX_USER_TOKEN_CHARS)] = None):
        # The page's later requests carry the cookie, so a browser stays in one arm.
        _, cookie = users.of(request, user)
        response = HTMLResponse(page)
        _remember(request, response, cookie)
        return response

    add_operations_routes(app, metrics, readiness)
    app.add_middleware(BodySizeLimit, limit=max_body_bytes)
    app.add_middleware(Observe, metrics=metrics, router=app.router, access_log=access_log)  # outermost: sees 413s too
    return app
