"""A store write that fails (a full disk, simulated) leaves the store as its last complete chunk left it:
it opens, every id it lists reads back, no id twice, no temporary files; running the conversion again
completes it with every id once. Through the CLI the failure is one ``error:`` line."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from fixture_writers import write_hdf5, write_vilbert_lmdb
from test_data_features_concurrency import fingerprint, synthetic_regions

from interbert.cli import main
from interbert.data import RegionStore, open_features
from interbert.data.features import (
    StoreWriteError,
    convert_features,
    write_npz_folder,
    write_tsv,
)
from interbert.utils.files import leftover_temporaries

CHUNK = 4


@pytest.fixture
def source(tmp_path):
    items = synthetic_regions(n=10, dim=8, classes=5)
    write_npz_folder(tmp_path / "src", items.items())
    store = open_features(tmp_path / "src")
    return store, {image_id: fingerprint(store[image_id]) for image_id in store.ids()}


def disk_full_once(monkeypatch, file_suffix: str, on_call: int) -> None:
    """``os.replace`` onto a file ending in ``file_suffix`` fails with ENOSPC on its ``on_call``-th call only
    (a transient failure is the harder case: a retry behind the caller's back would then succeed)."""
    real_replace, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(file_suffix):
            calls.append(dst)
            if len(calls) == on_call:
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def ids_in_chunk_indexes(store_dir: Path) -> list[str]:
    """Every id of every chunk index on disk, listed or not: a duplicate here is one a reader could meet."""
    return [i for index in sorted(store_dir.glob("*.index.json")) for i in json.loads(index.read_text())["ids"]]


def assert_store_holds_exactly(store_dir: Path, expected: dict, ids: list[str]) -> None:
    store = RegionStore(store_dir)
    assert sorted(store.ids()) == sorted(ids)
    assert sorted(ids_in_chunk_indexes(store_dir)) == sorted(ids)  # each once, and no unlisted chunk left over
    for image_id in store.ids():
        assert fingerprint(store[image_id]) == expected[image_id]
    assert leftover_temporaries(store_dir) == []


@pytest.mark.parametrize("failing_file", ["manifest.json", ".features.npy"])
def test_a_failed_write_keeps_the_previous_store_and_a_rerun_completes_it(source, tmp_path, monkeypatch, failing_file):
    store, expected = source
    dst = tmp_path / "store"
    # the second chunk's manifest (or features array) cannot be written; the first chunk is complete
    disk_full_once(monkeypatch, failing_file, on_call=2)
    with pytest.raises(StoreWriteError, match=r"store: writing chunk-00001 failed \(No space left on device\).* holds "
                                              r"the 4 images written before") as failure:
        convert_features(store, dst, chunk_size=CHUNK, progress=False)
    assert failure.value.errno == errno.ENOSPC
    assert_store_holds_exactly(dst, expected, store.ids()[:CHUNK])

    monkeypatch.undo()
    assert convert_features(store, dst, chunk_size=CHUNK, progress=False) == (len(expected) - CHUNK, CHUNK)
    assert_store_holds_exactly(dst, expected, store.ids())


def test_cli_convert_with_a_full_disk_says_one_error_line_and_a_rerun_completes(source, tmp_path, monkeypatch, capsys):
    store, expected = source
    src, dst = str(tmp_path / "src"), str(tmp_path / "store")
    disk_full_once(monkeypatch, "manifest.json", on_call=2)
    assert main(["data", "convert", src, dst, "--chunk-size", str(CHUNK)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"error: {dst}: writing chunk-00001 failed (No space left on device)")
    assert err.rstrip().endswith(errors[0])  # the last thing said, after the progress bar
    assert_store_holds_exactly(Path(dst), expected, store.ids()[:CHUNK])

    monkeypatch.undo()
    assert main(["data", "convert", src, dst, "--chunk-size", str(CHUNK)]) == 0
    assert f"wrote {len(expected) - CHUNK} images, {CHUNK} already there" in capsys.readouterr().out
    assert_store_holds_exactly(Path(dst), expected, store.ids())


@pytest.mark.parametrize("write", [write_tsv, write_hdf5])
def test_a_single_file_writer_that_fails_part_way_keeps_the_old_file(tmp_path, write):
    items = synthetic_regions(n=6, dim=4, classes=3)
    path = tmp_path / "features"
    write(path, items.items())
    before = path.read_bytes()

    def cut_short():
        for n, item in enumerate(items.items()):
            if n == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            yield item

    with pytest.raises(OSError, match="No space left"):
        write(path, cut_short())
    assert path.read_bytes() == before and leftover_temporaries(tmp_path) == []
    assert sorted(open_features(path).ids()) == sorted(items)


def test_an_npz_writer_that_fails_mid_file_leaves_no_cut_archive(tmp_path, monkeypatch):
    """A full disk while one ``.npz`` is being written: the images before it read back, that one is absent
    (not a cut archive a later reader would trip on), and no temporary file is left."""
    items = synthetic_regions(n=4, dim=4, classes=3)
    real_savez, calls = np.savez, []

    def savez(file, **arrays):
        calls.append(file)
        if len(calls) == 3:
            file.write(b"PK\x03\x04 half an archive")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(file, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(OSError, match="No space left"):
        write_npz_folder(tmp_path / "npz", items.items())
    written = list(items)[:2]
    assert sorted(p.name for p in (tmp_path / "npz").iterdir()) == sorted(f"{i}.npz" for i in written)
    store = open_features(tmp_path / "npz")
    assert sorted(store.ids()) == sorted(written)
    for image_id in written:
        assert fingerprint(store[image_id]) == fingerprint(items[image_id])


def test_an_lmdb_writer_that_fails_part_way_keeps_the_old_environment(tmp_path):
    pytest.importorskip("lmdb")
    items = synthetic_regions(n=6, dim=4, classes=3)
    path = tmp_path / "features.lmdb"
    write_vilbert_lmdb(path, list(items.items())[:3])
    before = {image_id: fingerprint(open_features(path, trust_pickle=True)[image_id]) for image_id in list(items)[:3]}

    def cut_short():
        for n, item in enumerate(items.items()):
            if n == 4:
                raise OSError(errno.ENOSPC, "No space left on device")
            yield item

    with pytest.raises(OSError, match="No space left"):
        write_vilbert_lmdb(path, cut_short())
    store = open_features(path, trust_pickle=True)
    assert {image_id: fingerprint(store[image_id]) for image_id in store.ids()} == before
    assert leftover_temporaries(tmp_path) == []
