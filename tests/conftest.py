"""Shared test helpers.

Real data from the team lives in ``../shared`` beside the checkout (or ``$INTERBERT_SHARED``). It is
never copied into the repository; tests reach it only through :func:`shared_path`, which skips the
test with a clear reason when the folder is absent (e.g. on a machine without the team's data).
"""

from __future__ import annotations

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


@pytest.fixture
def one_torch_thread():
    """Tiny matrices: thread start-up costs more than the maths on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
