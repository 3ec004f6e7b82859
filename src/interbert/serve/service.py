"""The search service: two-stage text-to-image retrieval over an index folder, as a FastAPI app.

    query --embed_text--> FAISS top-N by cosine --(rerank)--> ITM pair scores on the N --> top k

Everything heavy (model, tokenizer, FAISS index, feature stores) loads once in :func:`create_app`;
each search runs in a worker thread so the event loop keeps answering while the model works.

Re-ranking costs up to RERANK_CAP pair forwards per query, so at most ``max_concurrent_reranks`` run at
once (:class:`RerankGate`); a re-ranked search that finds them all busy waits up to
``rerank_queue_timeout`` seconds for a slot and is otherwise answered 503 with ``Retry-After``: the client
learns at once that the service is saturated instead of queueing without end. Searches without
re-ranking (one text forward and a FAISS lookup) are not held back by the gate.

Beside the search: ``GET /metrics`` (Prometheus), ``/health/live`` and ``/health/ready`` (the model and the
index answer), and an ``X-Request-Id`` on every answer (:mod:`interbert.serve.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from interbert.errors import UsageError, shown
from interbert.serve import DEFAULT_RERANK_QUEUE_TIMEOUT
from interbert.serve._data import open_features, region_batch
from interbert.serve.index import ImageIndex, ImageRecord
from interbert.serve.metrics import AccessLog, Observe, ServiceMetrics
from interbert.serve.model import SearchModel, weights_fingerprint

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 512  # characters (Unicode code points), as the API states: not bytes
MAX_K = 100
# The body bound must admit every query within MAX_QUERY_CHARS however the client encodes it: JSON may
# write a character outside the BMP (an emoji) as a surrogate pair of escapes, "\ud83d\ude00", 12 bytes.
# 1 KiB more is for the rest of the object (keys, k, rerank, whitespace).
MAX_BODY_BYTES = 12 * MAX_QUERY_CHARS + 1024
# Characters that draw nothing although Unicode files them as letters or symbols (fillers, the blank
# Braille pattern); format (zero-width), control and mark characters are recognised by their category.
BLANK_GRAPHIC = frozenset("\u115f\u1160\u3164\uffa0\u2800")
RERANK_FACTOR = 4  # re-rank the top 4k candidates ...
RERANK_CAP = 200  # ... but never more than this many pair forwards per query
RERANK_BATCH = 64
RETRY_AFTER_S = 1  # the 503's Retry-After, in seconds: several re-ranks' time at the default depth


def default_max_concurrent_reranks() -> int:
    """Half the cores this process may run on (at least 1). With one intra-op thread per forward (what
    ``interbert serve`` sets) each re-rank keeps one core busy; the other half is left for the first
    stage of searches without re-ranking and for the event loop."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


class RerankSaturated(Exception):
    """Every re-rank slot stayed busy for the whole queue timeout."""


class RerankGate:
    """At most ``limit`` re-ranked searches at once; a request waits at most ``queue_timeout`` seconds
    for a free slot (first come, first served), else :class:`RerankSaturated`.

    Lives on the server's event loop (uvicorn runs one), where admission costs no worker thread: waiting
    requests do not hold the threads that searches without re-ranking run on."""

    def __init__(self, limit: int, queue_timeout: float):
        if limit < 1:
            raise UsageError(f"max_concurrent_reranks must be >= 1, got {limit}")
        if not queue_timeout >= 0:  # also refuses nan
            raise UsageError(f"rerank_queue_timeout must be >= 0 seconds, got {queue_timeout}")
        self.limit, self.queue_timeout = limit, queue_timeout
        self._slots = asyncio.Semaphore(limit)
        # For GET /metrics. Only the event loop touches them, so plain integers need no lock.
        self.in_use = 0  # slots held now
        self.rejected = 0  # requests refused (RerankSaturated) since the start

    @contextlib.asynccontextmanager
    async def slot(self):
        try:
            # A free slot is taken without suspending, so even a zero timeout admits it.
            async with asyncio.timeout(self.queue_timeout):
                await self._slots.acquire()
        except TimeoutError:
            self.rejected += 1
            raise RerankSaturated from None
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
            self._slots.release()


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS)]
    k: Annotated[StrictInt, Field(ge=1, le=MAX_K)] = 10
    rerank: StrictBool = False

    @field_validator("query")
    @classmethod
    def not_blank(cls, query: str) -> str:
        if not query.strip():
            raise ValueError("query is blank")
        if not has_visible_character(query):
            # NUL, control or zero-width characters only: the tokenizer would drop them all and the
            # "results" would be an answer to an empty query.
            raise ValueError("query has no visible character")
        return query.strip()


def has_visible_character(text: str) -> bool:
    """Whether ``text`` holds a letter, digit, punctuation mark or symbol that draws something (not only
    whitespace, control (NUL...), format (zero-width space, joiner, BOM...) or combining characters)."""
    return any(unicodedata.category(c)[0] in "LNPS" and c not in BLANK_GRAPHIC for c in text)


class SearchHit(BaseModel):
    image_id: str
    score: float  # the ITM score when re-ranked, else the cosine similarity
    similarity: float  # cosine similarity of the text and image embeddings (first stage)
    caption: str | None = None
    thumbnail_url: str | None = None


class SearchResponse(BaseModel):
    query: str
    k: int
    rerank: bool
    candidates: int  # images scored by the second stage (0 without re-ranking)
    results: list[SearchHit]


def rerank_depth(k: int, cap: int = RERANK_CAP) -> int:
    """How many first-stage candidates the ITM head re-scores for a top-``k`` answer."""
    return max(k, min(RERANK_FACTOR * k, cap))


class SearchService:
    """The two stages, independent of HTTP (the app is a thin layer over :meth:`search`)."""

    def __init__(self, index_dir: str | Path, model_dir: str | Path | None = None, rerank_cap: int = RERANK_CAP,
                 device: str = "cpu", engine: str | None = None, compile: str = "off"):
        """``compile``: ``off``, or the re-rank on static shapes through torch.compile (``serve --compile``)."""
        self.index = ImageIndex(index_dir, engine=engine)
        built_with = self.index.manifest["model"]
        # --model (the command line) is taken as given; the folder's own record is confined by ImageIndex.
        model_dir = Path(model_dir) if model_dir else self.index.model_path()
        if weights_fingerprint(model_dir) != self.index.manifest["weights_sha256"]:
            raise ValueError(
                f"{index_dir} was built with the model at {built_with}; {model_dir} holds different weights, whose "
                f"text embeddings would not match the indexed image embeddings. Serve with that model or rebuild."
            )
        self.max_regions = int(self.index.manifest["max_regions"])
        self.model = SearchModel(model_dir, device=device, compile=compile, max_regions=self.max_regions,
                                 rerank_batch=RERANK_BATCH)
        self.rerank_cap = rerank_cap
        # Opened now, not on the first re-ranked query: a moved store fails at start, not mid-request.
        self._stores = {path: open_features(self.index.store_path(path)) for path in self.index.feature_stores()}

    def _store(self, path: str):
        return self._stores[path]

    def readiness(self) -> dict[str, str]:
        """Whether each part answers now: "ok", or what went wrong. The model embeds one word (a tiny
        forward) and the index looks up that word's nearest image, as every search does."""
        # Any exception is a "not ready" to report, not a crash of the probe: a lost Milvus connection,
        # a CUDA error, a removed meta.sqlite all raise their own types.
        try:
            vector = self.model.embed_texts(["ready"])
        except Exception as error:  # noqa: BLE001
            return {"model": _failure(error), "index": "not checked (the model failed)"}
        try:
            _, rows = self.index.search(vector, 1)
            self.index.records(rows[0][rows[0] >= 0])
        except Exception as error:  # noqa: BLE001
            return {"model": "ok", "index": _failure(error)}
        return {"model": "ok", "index": "ok"}

    def info(self) -> dict[str, str]:
        """The model and index identity that GET /metrics reports (as labels: strings)."""
        return {"weights_sha256": self.index.manifest["weights_sha256"], "index_type": self.index.index_type,
                "images": str(len(self.index)), "engine": self.index.engine.uri, "scorer": self.model.architecture,
                "model": str(self.model.model_dir.resolve())}

    def regions_of(self, records: list[ImageRecord]) -> dict:
        return region_batch([(self._store(r.store), r.image_id) for r in records], self.max_regions)

    def search(self, query: str, k: int, rerank: bool) -> SearchResponse:
        depth = rerank_depth(k, self.rerank_cap) if rerank else k
        similarities, rows = self.index.search(self.model.embed_texts([query]), depth)
        keep = rows[0] >= 0
        records = self.index.records(rows[0][keep])
        similarities = similarities[0][keep]
        scores = similarities
        if rerank and records:
            scores = np.concatenate([
                self.model.pair_scores(query, self.regions_of(records[i : i + RERANK_BATCH]))
                for i in range(0, len(records), RERANK_BATCH)
            ])
        order = np.argsort(-scores, kind="stable")[:k]
        hits = [
            SearchHit(
                image_id=records[i].image_id,
                score=float(scores[i]),
                similarity=float(similarities[i]),
                caption=records[i].caption,
                thumbnail_url=f"/images/{quote(records[i].image_id, safe='')}" if records[i].thumbnail else None,
            )
            for i in order
        ]
        return SearchResponse(query=query, k=k, rerank=rerank, candidates=len(records) if rerank else 0, results=hits)


def _failure(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def readiness_response(checks: dict[str, str]) -> JSONResponse:
    """200 when every check is "ok", else 503 naming each part and what went wrong."""
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)


def add_operations_routes(app: FastAPI, metrics: ServiceMetrics, readiness) -> None:
    """GET /metrics, /health/live and /health/ready (``readiness``: a blocking function returning the
    checks, run in a worker thread: a forward must not stall the event loop)."""

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/health/live")
    async def live() -> dict:
        return {"status": "alive"}  # answered at all: the process and its event loop run

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        return readiness_response(await run_in_threadpool(readiness))


class BodySizeLimit:
    """Refuse request bodies over ``limit`` bytes with 413, whether or not they declare Content-Length
    (a chunked body is counted as it arrives)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _send_json(send, 413, f"request body over {self.limit} bytes")
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                # FastAPI passes an HTTPException raised while reading the body through to its handler.
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for e in error.errors():
        if e.get("type") == "json_invalid":
            parts.append(f"malformed JSON at character {e['loc'][-1]}: {e.get('ctx', {}).get('error', e['msg'])}")
            continue
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(parts)


def api_app(title: str, **kwargs) -> FastAPI:
    """A FastAPI app whose interactive API page (``/docs``) works offline: Swagger UI's script and style are
    served from the swagger-ui-bundle package at ``/docs/assets`` instead of FastAPI's default CDN (a page that
    loads nothing where the service has no internet). ReDoc, which has no such package, is off."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app = FastAPI(title=title, version="1", docs_url=None, redoc_url=None, **kwargs)
    # The bundled Swagger UI (4.x, the package's latest) refuses a document that says 3.1. FastAPI's schemas
    # for these routes differ from 3.0 only in writing an optional field as anyOf [..., {"type": "null"}],
    # which Swagger UI 4 shows as one more alternative; /openapi.json says 3.0.3 so that the page renders.
    app.openapi_version = "3.0.3"
    app.mount("/docs/assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{title} - API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    return app


def create_app(index_dir: str | Path, model_dir: str | Path | None = None, rerank_cap: int = RERANK_CAP,
               max_body_bytes: int = MAX_BODY_BYTES, device: str = "cpu", max_concurrent_reranks: int | None = None,
               rerank_queue_timeout: float = DEFAULT_RERANK_QUEUE_TIMEOUT, engine: str | None = None,
               access_log: AccessLog | None = None, compile: str = "off") -> FastAPI:
    """The app over one index; ``model_dir`` defaults to the model recorded in the index.
    ``max_concurrent_reranks`` defaults to :func:`default_max_concurrent_reranks`; ``access_log`` receives
    one record per request (:mod:`interbert.serve.metrics`). Long because each route is a closure over the
    service, the gate and the metrics, FastAPI's usual shape, as in :func:`interbert.serve.experiment.create_experiment_app`."""
    if max_concurrent_reranks is None:
        max_concurrent_reranks = default_max_concurrent_reranks()
    gate = RerankGate(max_concurrent_reranks, rerank_queue_timeout)
    service = SearchService(index_dir, model_dir, rerank_cap=rerank_cap, device=device, engine=engine, compile=compile)
    page = resources.files("interbert.serve").joinpath("page.html").read_text(encoding="utf-8")
    app = api_app("interbert search")
    app.state.service = service
    app.state.rerank_gate = gate
    metrics = ServiceMetrics()
    metrics.watch_rerank_gate(gate)
    metrics.service_info.info({"kind": "search", **service.info()})
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(error)}, status_code=422)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "images": len(service.index), "index_type": service.index.index_type,
                "engine": service.index.engine.uri,
                "model": str(service.model.model_dir.resolve()), "scorer": service.model.architecture,
                "max_concurrent_reranks": gate.limit, "rerank_queue_timeout_s": gate.queue_timeout,
                "pid": os.getpid()}  # which process answered (serve --workers N runs several)

    @app.post("/search", response_model=SearchResponse, response_model_exclude_none=True)
    async def search(request: SearchRequest) -> SearchResponse:
        if not request.rerank:
            return await run_in_threadpool(service.search, request.query, request.k, False)
        try:
            # The slot is held until the worker thread returns, even if the client goes away meanwhile:
            # the thread cannot be stopped, so its forwards still count against the bound.
            async with gate.slot():
                return await run_in_threadpool(service.search, request.query, request.k, True)
        except RerankSaturated:
            raise HTTPException(
                503, f"busy: {gate.limit} re-ranked searches are running and none finished within "
                     f"{gate.queue_timeout:g} s; retry, or search without rerank",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None

    @app.get("/images/{image_id:path}")  # ids may hold any character, "/" included
    async def image(image_id: str) -> FileResponse:
        # Only ids in the index, and only the path the index stored for them: nothing from the request
        # ever becomes part of a file path.
        record = service.index.record(image_id)
        if record is None:
            raise HTTPException(404, f"image {shown(image_id)} is not in the index")
        path = service.index.thumbnail_file(record)  # confined to the folder's thumbnails/
        if path is None:
            raise HTTPException(404, f"image {shown(image_id)} has no thumbnail in the index")
        return FileResponse(path, media_type="image/jpeg")

    @app.get("/", response_class=HTMLResponse)
    async def home() -> HTMLResponse:
        return HTMLResponse(page)

    add_operations_routes(app, metrics, service.readiness)
    app.add_middleware(BodySizeLimit, limit=max_body_bytes)
    app.add_middleware(Observe, metrics=metrics, router=app.router, access_log=access_log)  # outermost: sees 413s too
    return app
