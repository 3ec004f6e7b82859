"""The search service as an A/B experiment: several arms (each an index, its model, and optionally a topic
feed), every user assigned to one arm by :func:`interbert.serve.abtest.assign_arm`, every answer logged.

    GET  /topics                    the topics every arm has a feed for
    GET  /topics/{topic_id}?user=   the user's arm's ranked items for the topic   -> request_id, arm, results
    POST /search                    as the single-index service, answered by the user's arm -> + request_id, arm
    POST /events/click              {request_id, image_id}: a click on an item that request showed

The user is named by the ``X-User-Id`` header, else the ``user`` query parameter, else the
``interbert_user`` cookie; a request with none gets a fresh id, set as that cookie, so a browser stays in
its arm. An answer's impression is committed to the event log (fsynced) before the answer is sent, so a
click can always find its request; a click is acknowledged only once it is committed.
"""

from __future__ import annotations

import contextlib
import logging
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

from interbert.errors import UsageError
from interbert.serve import DEFAULT_RERANK_QUEUE_TIMEOUT
from interbert.serve.abtest import MAX_USER_ID_CHARS, ArmSpec, assign_arm, valid_user_id
from interbert.serve.events import EventLog, ExperimentConfig, NotShown, UnknownRequest
from interbert.serve.service import (
    MAX_BODY_BYTES, MAX_K, RERANK_CAP, RETRY_AFTER_S, BodySizeLimit, RerankGate, RerankSaturated, SearchHit,
    SearchRequest, SearchResponse, SearchService, _validation_message, default_max_concurrent_reranks,
)
from interbert.serve.topics import Feed

logger = logging.getLogger(__name__)

USER_COOKIE = "interbert_user"
USER_HEADER = "X-User-Id"
COOKIE_MAX_AGE_S = 365 * 24 * 3600


class Arm:
    """One arm, loaded: its search service (index + model) and its feed (or None)."""

    def __init__(self, spec: ArmSpec, rerank_cap: int, device: str):
        self.name = spec.name
        self.service = SearchService(spec.index, spec.model, rerank_cap=rerank_cap, device=device)
        self.feed = Feed(spec.feed) if spec.feed else None
        if self.feed and self.feed.weights_sha256 != self.service.index.manifest["weights_sha256"]:
            # A feed ranks the images its own model embedded; paired with another index its items and
            # thumbnails would come from elsewhere, and the experiment would compare the wrong things.
            raise UsageError(f"arm {spec.name}: the feed {spec.feed} was built with the model at "
                             f"{self.feed.meta.get('model')}, the index {spec.index} with another one")


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


class ClickResponse(BaseModel):
    request_id: str
    image_id: str
    position: int
    counted: bool  # False: this request's item was clicked before and is counted once


def _user_of(request: Request, user: str | None) -> tuple[str, bool]:
    """(user id, whether it is new and needs its cookie set)."""
    given = request.headers.get(USER_HEADER) or user or request.cookies.get(USER_COOKIE)
    if given is None:
        return uuid.uuid4().hex, True
    if not valid_user_id(given):
        raise HTTPException(422, f"user id must be 1-{MAX_USER_ID_CHARS} printable characters")
    return given, False


def _remember(response: Response, user_id: str, new: bool) -> None:
    if new:
        response.set_cookie(USER_COOKIE, user_id, max_age=COOKIE_MAX_AGE_S, samesite="lax")


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
                          rerank_queue_timeout: float = DEFAULT_RERANK_QUEUE_TIMEOUT) -> FastAPI:
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
    arms = {spec.name: Arm(spec, rerank_cap, device) for spec in arm_specs}
    config = ExperimentConfig(experiment, salt if salt is not None else experiment, tuple(names), tuple(split))
    log = EventLog(events, config)
    topics = common_topics(list(arms.values()))
    titles = {t.topic_id: t.title for t in topics}
    page = resources.files("interbert.serve").joinpath("page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        log.close()

    app = FastAPI(title="interbert experiment", version="1", lifespan=lifespan)
    app.state.arms, app.state.event_log, app.state.experiment = arms, log, config
    app.state.rerank_gate = gate

    def arm_of(user_id: str) -> Arm:
        return arms[assign_arm(user_id, config.salt, config.arms, config.split)]

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(error)}, status_code=422)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "experiment": config.name, "events": str(log.path),
                "arms": [{"name": arm.name, "share": share, "images": len(arm.service.index),
                          "model": str(arm.service.model.model_dir.resolve()),
                          "topics": len(arm.feed.topics) if arm.feed else 0}
                         for arm, share in zip(arms.values(), config.split)],
                "topics": len(topics), "max_concurrent_reranks": gate.limit}

    @app.post("/search", response_model=ExperimentSearchResponse, response_model_exclude_none=True)
    async def search(body: SearchRequest, request: Request, response: Response,
                     user: Annotated[str | None, Query(max_length=MAX_USER_ID_CHARS)] = None):
        user_id, new = _user_of(request, user)
        arm = arm_of(user_id)

        def answer() -> ExperimentSearchResponse:
            found = arm.service.search(body.query, body.k, body.rerank)
            request_id = log.log_impression(user_id, arm.name, "search", [hit.image_id for hit in found.results],
                                            query=body.query)
            return ExperimentSearchResponse(**found.model_dump(), request_id=request_id, arm=arm.name)

        _remember(response, user_id, new)
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
                         user: Annotated[str | None, Query(max_length=MAX_USER_ID_CHARS)] = None,
                         k: Annotated[int, Query(ge=1, le=MAX_K)] = MAX_K) -> TopicResponse:
        if topic_id not in titles:
            raise HTTPException(404, f"no topic {topic_id!r}" + ("" if topics else " (this server has no feeds)"))
        user_id, new = _user_of(request, user)
        arm = arm_of(user_id)
        items = arm.feed.items[topic_id][:k]
        records = {r.image_id: r for r in (arm.service.index.record(item.image_id) for item in items) if r}
        results = [
            TopicItem(position=position, image_id=item.image_id, score=item.score, similarity=item.similarity,
                      caption=records[item.image_id].caption if item.image_id in records else None,
                      thumbnail_url=f"/images/{quote(item.image_id, safe='')}"
                      if item.image_id in records and records[item.image_id].thumbnail else None)
            for position, item in enumerate(items, 1)
        ]
        request_id = await run_in_threadpool(log.log_impression, user_id, arm.name, "topic",
                                             [item.image_id for item in items], topic_id)
        _remember(response, user_id, new)
        return TopicResponse(request_id=request_id, arm=arm.name, topic_id=topic_id, title=titles[topic_id],
                             results=results)

    @app.post("/events/click", response_model=ClickResponse)
    async def click(body: ClickRequest) -> ClickResponse:
        try:
            counted, position = await run_in_threadpool(log.log_click, body.request_id, body.image_id)
        except UnknownRequest as error:
            raise HTTPException(404, str(error)) from None
        except NotShown as error:
            raise HTTPException(422, str(error)) from None
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
        raise HTTPException(404, f"image {image_id!r} has no thumbnail in any arm's index")

    @app.get("/", response_class=HTMLResponse)
    async def home(request: Request, user: Annotated[str | None, Query(max_length=MAX_USER_ID_CHARS)] = None):
        # The page's later requests carry the cookie, so a browser stays in one arm.
        user_id, new = _user_of(request, user)
        response = HTMLResponse(page)
        _remember(response, user_id, new)
        return response

    app.add_middleware(BodySizeLimit, limit=max_body_bytes)
    return app
