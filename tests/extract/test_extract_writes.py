"""The extraction run's own files (settings record, report, TSV export) are replaced crash-safely.

Needs torchvision (``interbert.extract.run`` imports the detector): ``make test-extract`` runs it.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

pytest.importorskip(
    "torchvision", reason="interbert extract needs torchvision: run `make test-extract` (uses .venv-extract)"
)

from interbert.data.features import Regions, TsvFeatures  # noqa: E402
from interbert.extract import run  # noqa: E402
from interbert.utils.files import leftover_temporaries  # noqa: E402


class StoreFailingAt:
    """A store whose ``fail_at``-th read raises, as a disk error would in the middle of an export."""

    def __init__(self, regions: dict[str, Regions], fail_at: int | None = None):
        self.regions, self.fail_at, self.reads = regions, fail_at, 0

    def ids(self):
        return list(self.regions)

    def __getitem__(self, image_id):
        self.reads += 1
        if self.reads == self.fail_at:
            raise OSError(errno.EIO, "Input/output error")
        return self.regions[image_id]


def regions(seed: int) -> Regions:
    rng = np.random.default_rng(seed)
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20]], np.float32)
    return Regions(rng.random((2, 4), dtype=np.float32), boxes, 32, 32, rng.random((2, 3), dtype=np.float32))


def test_a_tsv_export_failing_midway_keeps_the_previous_tsv(tmp_path):
    target = tmp_path / run.TSV_FILE
    run._write_tsv_atomically(target, StoreFailingAt({"a": regions(0)}))
    before = target.read_bytes()
    with pytest.raises(OSError, match="Input/output"):
        run._write_tsv_atomically(target, StoreFailingAt({"a": regions(1), "b": regions(2)}, fail_at=2))
    assert target.read_bytes() == before
    assert leftover_temporaries(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == [run.TSV_FILE]
    assert TsvFeatures(target).ids() == ["a"]
