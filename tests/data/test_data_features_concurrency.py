"""Feature readers shared by threads (the search service's workers) and by forked processes (DataLoader
workers) return exactly what a lone sequential reader returns: every format, byte for byte."""

from __future__ import annotations

import base64
import random
import sys
import threading

import numpy as np
import pytest
import torch

from fixture_writers import write_hdf5, write_vilbert_lmdb

from interbert.data import Regions, RegionStoreWriter, open_features
from interbert.data.features import write_npz_folder, write_tsv

THREADS = 8
FORMATS = ["tsv", "tsv_cls_prob", "tsv_lxmert", "npz", "hdf5", "hdf5_flat", "lmdb", "store", "store_fp16"]


def synthetic_regions(n: int = 60, dim: int = 24, classes: int = 9, seed: int = 0) -> dict[str, Regions]:
    """Images with 2..40 regions, so TSV lines (and store rows) differ in length: a read at another image's
    offset then returns wrong data or a broken line instead of passing by luck."""
    rng = np.random.default_rng(seed)
    items = {}
    for i in range(n):
        k = int(rng.integers(2, 41))
        logits = rng.normal(size=(k, classes))
        xy = rng.uniform(0, 300, size=(k, 2))
        items[str(10_000 + 37 * i)] = Regions(
            rng.normal(size=(k, dim)), np.concatenate([xy, xy + rng.uniform(1, 200, size=(k, 2))], 1),
            int(rng.integers(320, 640)), int(rng.integers(240, 480)),
            np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    return items


def _b64(a) -> str:
    return base64.b64encode(np.ascontiguousarray(a, np.float32).tobytes()).decode()


def write_format(fmt: str, path, items: dict[str, Regions]) -> dict:
    """Write ``items`` in ``fmt`` at ``path``; returns the ``open_features`` keyword arguments."""
    if fmt in ("tsv", "tsv_cls_prob"):
        write_tsv(path, items.items(), with_class_probs=fmt == "tsv_cls_prob")
    elif fmt == "tsv_lxmert":  # img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, ...
        with open(path, "w") as f:
            for image_id, r in items.items():
                n = r.num_regions
                f.write("\t".join([image_id, str(r.image_h), str(r.image_w), _b64(np.zeros(n)), _b64(np.ones(n)),
                                   _b64(np.zeros(n)), _b64(np.ones(n)), str(n), _b64(r.boxes), _b64(r.features)]) + "\n")
    elif fmt == "npz":
        write_npz_folder(path, items.items())
    elif fmt in ("hdf5", "hdf5_flat"):
        write_hdf5(path, items.items(), layout="flat" if fmt == "hdf5_flat" else "groups")
    elif fmt == "lmdb":
        write_vilbert_lmdb(path, items.items())
        return {"trust_pickle": True}
    elif fmt in ("store", "store_fp16"):  # several chunks, so reads cross chunk maps
        with RegionStoreWriter(path, "float16" if fmt == "store_fp16" else "float32", chunk_size=16) as w:
            for image_id, r in items.items():
                w.add(image_id, r)
    else:
        raise ValueError(fmt)
    return {}


def fingerprint(r: Regions) -> tuple:
    """Everything a reader returns, as bytes: equal fingerprints mean byte-identical regions."""
    probs = None if r.class_probs is None else (r.class_probs.shape, r.class_probs.tobytes())
    return (r.features.dtype.str, r.features.shape, r.features.tobytes(), r.boxes.shape, r.boxes.tobytes(), probs,
            r.image_w, r.image_h)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Per format: its path, open keyword arguments and the sequential reference fingerprints."""
    items = synthetic_regions()
    out = {}
    for fmt in FORMATS:
        path = tmp_path_factory.mktemp("formats") / fmt
        kwargs = write_format(fmt, path, items)
        reader = open_features(path, **kwargs)
        assert sorted(reader.ids()) == sorted(items)
        out[fmt] = (path, kwargs, {image_id: fingerprint(reader[image_id]) for image_id in items})
    return out


@pytest.fixture
def eager_thread_switches():
    """Switch threads every microsecond instead of every 5 ms, so racing reads really interleave."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def hammer(reader, ids: list[str], reads_per_thread: int) -> tuple[list, list]:
    """``THREADS`` threads, released together, each reading ``reads_per_thread`` ids in its own shuffled order.
    Returns (results as (id, fingerprint), errors as (id, exception))."""
    barrier = threading.Barrier(THREADS)
    results, errors = [], []

    def work(seed: int):
        order = [ids[j % len(ids)] for j in range(reads_per_thread)]
        random.Random(seed).shuffle(order)
        barrier.wait()
        for image_id in order:
            try:
                results.append((image_id, fingerprint(reader[image_id])))
            except Exception as e:  # noqa: BLE001 -- every failure is a finding, counted below
                errors.append((image_id, e))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def assert_all_match(fmt, expected, results, errors, total):
    wrong = [image_id for image_id, fp in results if fp != expected[image_id]]
    assert not errors, f"{fmt}: {len(errors)} of {total} concurrent reads failed, e.g. {errors[0][0]}: {errors[0][1]!r}"
    assert not wrong, f"{fmt}: {len(wrong)} of {total} concurrent reads returned other bytes, e.g. image {wrong[0]}"
    assert len(results) == total


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_reader_shared_by_8_threads_reads_what_a_sequential_reader_reads(stores, fmt, eager_thread_switches):
    path, kwargs, expected = stores[fmt]
    reader = open_features(path, **kwargs)
    reads = 3 * len(expected)
    results, errors = hammer(reader, list(expected), reads)
    assert_all_match(fmt, expected, results, errors, THREADS * reads)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_freshly_opened_reader_survives_concurrent_first_reads(stores, fmt, eager_thread_switches):
    """The first reads open handles and map arrays: a lazily built structure must never be seen half-built."""
    path, kwargs, expected = stores[fmt]
    ids = list(expected)
    for trial in range(6):
        reader = open_features(path, **kwargs)
        results, errors = hammer(reader, ids[trial::6], 4)
        assert_all_match(f"{fmt} (trial {trial})", expected, results, errors, THREADS * 4)


class _ReadEverything(torch.utils.data.Dataset):
    def __init__(self, readers: dict, pairs: list[tuple[str, str]]):
        self.readers, self.pairs = readers, pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        fmt, image_id = self.pairs[i]
        return fmt, image_id, fingerprint(self.readers[fmt][image_id])


def test_readers_opened_before_fork_read_correctly_in_dataloader_workers(stores):
    readers = {}
    for fmt, (path, kwargs, expected) in stores.items():
        readers[fmt] = open_features(path, **kwargs)
        for image_id in expected:  # handles, maps and environments are open in the parent before the fork
            readers[fmt][image_id]
    pairs = [(fmt, image_id) for fmt in stores for image_id in stores[fmt][2]]
    random.Random(0).shuffle(pairs)
    loader = torch.utils.data.DataLoader(_ReadEverything(readers, pairs), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", collate_fn=lambda sample: sample)
    seen = []
    for fmt, image_id, fp in loader:
        assert fp == stores[fmt][2][image_id], f"{fmt}: image {image_id} differs in a worker"
        seen.append((fmt, image_id))
    assert sorted(seen) == sorted(pairs)
    for fmt, (_, _, expected) in stores.items():  # and the parent's own handles still read right afterwards
        image_id = next(iter(expected))
        assert fingerprint(readers[fmt][image_id]) == expected[image_id]
