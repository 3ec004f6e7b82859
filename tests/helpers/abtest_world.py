"""A small experiment's world for the A/B tests: the built-in benchmark (48 scenes), two tiny models
(different weights: the two arms), an index and a topic feed per model, and a topics file."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import minilm_vocab, single_torch_thread
from interbert.cli import main as interbert_main
from interbert.serve.abtest import ArmSpec
from interbert.serve.index import build_index
from interbert.serve.synthetic_gallery import save_tiny_model

FEATURE_DIM = 16
TOP_N = 8


@dataclass(frozen=True)
class World:
    data: Path  # `interbert data synth` output
    topics: Path
    models: tuple[Path, Path]
    indexes: tuple[Path, Path]
    feeds: tuple[Path, Path]

    def arms(self) -> list[ArmSpec]:
        return [ArmSpec("control", self.indexes[0], self.feeds[0]), ArmSpec("treatment", self.indexes[1], self.feeds[1])]

    def arm_flags(self) -> list[str]:
        return [f"--arm=control={self.indexes[0]},{self.feeds[0]}", f"--arm=treatment={self.indexes[1]},{self.feeds[1]}"]




@contextlib.contextmanager
def serve_in_thread(app):
    """Yield the URL of ``app`` served by uvicorn on a free localhost port in a thread of this process
    (no interpreter start-up: ~0.1 s instead of the ~10 s a fresh `interbert serve` takes on a busy machine)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def build_world(folder: Path) -> World:
    with single_torch_thread():
        return _build_world(folder)


def _build_world(folder: Path) -> World:
    vocab = minilm_vocab()
    data = folder / "data"
    assert interbert_main(["data", "synth", str(data), "--images", "48", "--feature-dim", str(FEATURE_DIM),
                           "--num-classes", "8", "--no-images", "--workers", "1", "--format", "store"]) == 0
    regions = data / json.loads((data / "synth.json").read_text())["files"]["regions"]
    topics = folder / "topics.txt"
    assert interbert_main(["abtest", "topics", str(data), "--out", str(topics), "--count", "6"]) == 0
    models, indexes, feeds = [], [], []
    for n, name in enumerate(("a", "b")):
        model = save_tiny_model(folder / f"model_{name}", vocab, FEATURE_DIM, architecture="retrieval", seed=n)
        build_index(model, regions, folder / f"index_{name}", progress=False)
        feed = folder / f"feed_{name}.sqlite"
        assert interbert_main(["topics", "build", "--topics", str(topics), "--index", str(folder / f"index_{name}"),
                               "--out", str(feed), "--top", str(TOP_N), "--no-progress"]) == 0
        models.append(model), indexes.append(folder / f"index_{name}"), feeds.append(feed)
    return World(data, topics, tuple(models), tuple(indexes), tuple(feeds))


def independent_counts(query: Callable[[str], list[tuple]]) -> dict[str, tuple[int, int, int, int]]:
    """Per arm (users, requests, items shown, clicks), computed from an event store's raw rows (``query(sql)``,
    either engine) apart from the report's code, to check the report against."""
    arm_of = dict(query("SELECT request_id, arm FROM impressions"))
    users = defaultdict(set)
    for user, arm in query("SELECT user_id, arm FROM impressions"):
        users[arm].add(user)
    requests = Counter(arm_of.values())
    shown = Counter(arm_of[r] for (r,) in query("SELECT request_id FROM impression_items"))
    clicks = Counter(arm_of[r] for (r,) in query("SELECT request_id FROM clicks"))
    return {arm: (len(users[arm]), requests[arm], shown[arm], clicks[arm]) for arm in requests}
