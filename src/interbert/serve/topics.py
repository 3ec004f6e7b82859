"""Topic feeds, computed offline: for each topic title, the index's nearest images re-ranked by the ITM head,
the top N stored with their scores in one SQLite file (the "feed") that ``interbert serve --arm`` reads.

    meta        key/value: index, model, weights_sha256, top_n, rerank_depth
    topics      topic_id, title, position (order in the topics file), done (1 once its items are stored)
    feed_items  topic_id, rank (1 = best), image_id, score (ITM), similarity (cosine, first stage)

A topic's items and its ``done`` mark are committed in the same transaction, one transaction per batch
of topics: a build that stops (crash, Ctrl-C) keeps every finished batch, and running the same command
again computes only the topics that are not done. A feed belongs to one model's weights: resuming it with
another model is refused (serve a second model with a second feed).

Topics files: plain text, one title per line (the topic id is then derived from the title, so reordering
the file keeps the ids), or JSON lines ``{"topic_id": ..., "title": ...}``. Titles may be in any
language the model's tokenizer reads (English, Chinese).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from interbert.errors import DataError, UsageError

MAX_TITLE_CHARS = 512  # the search service's query bound
TOPIC_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # ids appear in URLs: /topics/{topic_id}
DEFAULT_TOP_N = 20

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS topics (
    topic_id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    position INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS feed_items (
    topic_id TEXT NOT NULL REFERENCES topics(topic_id),
    rank INTEGER NOT NULL,
    image_id TEXT NOT NULL,
    score REAL NOT NULL,
    similarity REAL NOT NULL,
    PRIMARY KEY (topic_id, rank)
);
"""


@dataclass(frozen=True)
class Topic:
    topic_id: str
    title: str


@dataclass(frozen=True)
class FeedItem:
    image_id: str
    score: float
    similarity: float


def title_id(title: str) -> str:
    """A stable id for a title given without one (the same title always gets the same id)."""
    return "t" + hashlib.sha256(title.encode("utf-8")).hexdigest()[:12]


def read_topics(path: str | Path) -> list[Topic]:
    """Topics of a plain text or JSON lines file, in file order; errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from None
    topics: list[Topic] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        where = f"{path}:{number}"
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: malformed JSON ({error})") from None
            topic_id, title = record.get("topic_id"), record.get("title")
            if not isinstance(topic_id, str) or not TOPIC_ID.match(topic_id):
                raise DataError(f"{where}: topic_id must be 1-64 letters, digits, '_', '.' or '-', got {topic_id!r}")
            if not isinstance(title, str) or not title.strip():
                raise DataError(f"{where}: title must be a non-empty string, got {title!r}")
            title = title.strip()
        else:
            title, topic_id = line, title_id(line)
        if len(title) > MAX_TITLE_CHARS:
            raise DataError(f"{where}: title longer than {MAX_TITLE_CHARS} characters")
        if topic_id in seen:
            raise DataError(f"{where}: topic {topic_id!r} already given on line {seen[topic_id]}")
        seen[topic_id] = number
        topics.append(Topic(topic_id, title))
    if not topics:
        raise DataError(f"{path}: no topics")
    return topics


FEED_TABLES = {"meta", "topics", "feed_items"}
SQLITE_MAGIC = b"SQLite format 3\x00"


def check_feed_out(path: Path) -> None:
    """Refuse an ``--out`` that is not a feed file this build may create or continue, before any work:
    a folder, a file of another kind, or another SQLite database (an A/B event log, an index's
    meta.sqlite) whose tables the feed's would be added to."""
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; give the feed's file name (e.g. {path / 'feed.sqlite'})")
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), Path("."))
        if not parent.is_dir():
            raise UsageError(f"--out {path}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"--out {path}: cannot create it, {parent} is not writable")
        return
    if not path.is_file():
        raise UsageError(f"--out {path} is not a regular file")
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head and head != SQLITE_MAGIC:
        raise UsageError(f"--out {path} exists and is not a topic feed (not SQLite): give a new file or a feed "
                         f"made by `interbert topics build`")
    if head:
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            finally:
                db.close()
        except sqlite3.Error as error:
            raise UsageError(f"--out {path}: cannot read it as a topic feed ({error})") from None
        if tables and not FEED_TABLES <= tables:
            raise UsageError(f"--out {path} is another SQLite database (tables {', '.join(sorted(tables))}), not a "
                             f"topic feed: give a new file or a feed made by `interbert topics build`")
    if not os.access(path, os.W_OK):
        raise UsageError(f"--out {path} is not writable")


def _open_feed(path: Path, meta: dict[str, str]) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(str(path), isolation_level=None)
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
    except sqlite3.Error as error:  # SQLite's message does not name the file
        raise UsageError(f"--out {path}: cannot open it as a topic feed ({error})") from None
    stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if not stored:
        db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
    else:
        for key in ("weights_sha256", "top_n", "rerank_depth"):
            if stored.get(key) != meta[key]:
                db.close()
                raise UsageError(f"{path} was built with {key}={stored.get(key)} ({stored.get('model')}), not "
                                 f"{meta[key]}: give another --out for another model or setting")
    return db


def reranked_items(service, title: str, similarities: np.ndarray, rows: np.ndarray,
                   top_n: int) -> list[tuple[int, str, float, float]]:
    """A topic's feed items, ``(rank, image_id, ITM score, similarity)``: its FAISS candidates (``rows``, -1
    where the index had fewer) re-ranked by the ITM head, the best ``top_n``."""
    from interbert.serve.service import RERANK_BATCH

    keep = rows >= 0
    records = service.index.records(rows[keep])
    sims = similarities[keep]
    scores = np.concatenate([
        service.model.pair_scores(title, service.regions_of(records[i : i + RERANK_BATCH]))
        for i in range(0, len(records), RERANK_BATCH)
    ]) if records else np.zeros(0)
    order = np.argsort(-scores, kind="stable")[:top_n]
    return [(rank, records[i].image_id, float(scores[i]), float(sims[i])) for rank, i in enumerate(order, 1)]


def build_feed(topics_path: str | Path, index_dir: str | Path, out: str | Path, model_dir: str | Path | None = None,
               top_n: int = DEFAULT_TOP_N, batch_size: int = 16, progress: bool = True, device: str = "cpu",
               engine: str | None = None) -> dict:
    """Compute the feed of every topic not yet done in ``out``; returns counts {topics, built, skipped}."""
    from tqdm.auto import tqdm

    from interbert.serve.service import SearchService, rerank_depth

    if top_n < 1:
        raise UsageError(f"--top must be >= 1, got {top_n}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    topics = read_topics(topics_path)
    out = Path(out)
    check_feed_out(out)  # before the model loads, and before anything is written
    service = SearchService(index_dir, model_dir, device=device, engine=engine)  # checks the model matches the index
    depth = rerank_depth(top_n, service.rerank_cap)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"index": str(Path(index_dir).resolve()), "model": str(service.model.model_dir.resolve()),
            "weights_sha256": service.index.manifest["weights_sha256"], "top_n": str(top_n), "rerank_depth": str(depth)}
    db = _open_feed(out, meta)
    try:
        db.execute("BEGIN")
        for position, topic in enumerate(topics):
            db.execute("INSERT INTO topics (topic_id, title, position) VALUES (?, ?, ?) ON CONFLICT(topic_id) "
                       "DO UPDATE SET position = excluded.position", (topic.topic_id, topic.title, position))
        db.execute("COMMIT")
        stored_titles = dict(db.execute("SELECT topic_id, title FROM topics").fetchall())
        for topic in topics:
            if stored_titles[topic.topic_id] != topic.title:
                raise DataError(f"{topics_path}: topic {topic.topic_id!r} is titled {topic.title!r}, but {out} "
                                f"holds it as {stored_titles[topic.topic_id]!r}: give it another id or another --out")
        done = {row[0] for row in db.execute("SELECT topic_id FROM topics WHERE done = 1")}
        pending = [t for t in topics if t.topic_id not in done]
        bar = tqdm(total=len(pending), desc=f"feed {out.name}", unit="topic", disable=not progress)
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            # One text forward and one FAISS search for the whole batch; the ITM re-rank is per topic.
            similarities, rows = service.index.search(service.model.embed_texts([t.title for t in batch]), depth)
            results = [(topic, reranked_items(service, topic.title, topic_similarities, topic_rows, top_n))
                       for topic, topic_similarities, topic_rows in zip(batch, similarities, rows)]
            db.execute("BEGIN")
            for topic, items in results:
                db.execute("DELETE FROM feed_items WHERE topic_id = ?", (topic.topic_id,))
                db.executemany("INSERT INTO feed_items VALUES (?, ?, ?, ?, ?)",
                               [(topic.topic_id, *item) for item in items])
                db.execute("UPDATE topics SET done = 1 WHERE topic_id = ?", (topic.topic_id,))
            db.execute("COMMIT")
            bar.update(len(batch))
        bar.close()
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")
        db.close()
    return {"topics": len(topics), "built": len(pending), "skipped": len(topics) - len(pending)}


class Feed:
    """A finished feed, read once into memory at start (topics x N rows: small) and read-only after, so
    request threads share it without locks. Topics whose build did not finish are left out."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"{self.path}: no such feed (build it with `interbert topics build`)")
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            self.meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            rows = db.execute("SELECT topic_id, title FROM topics WHERE done = 1 ORDER BY position").fetchall()
            items: dict[str, list[FeedItem]] = {topic_id: [] for topic_id, _ in rows}
            for topic_id, image_id, score, similarity in db.execute(
                    "SELECT topic_id, image_id, score, similarity FROM feed_items ORDER BY topic_id, rank"):
                if topic_id in items:
                    items[topic_id].append(FeedItem(image_id, score, similarity))
        except sqlite3.DatabaseError as error:
            raise UsageError(f"{self.path} is not a topic feed ({error})") from None
        finally:
            db.close()
        self.topics = [Topic(topic_id, title) for topic_id, title in rows]
        self.items = items

    @property
    def weights_sha256(self) -> str:
        return self.meta["weights_sha256"]
