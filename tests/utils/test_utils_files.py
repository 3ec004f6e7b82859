"""Crash-safe writes: a failed write keeps the previous file and leaves no temporary behind."""

from __future__ import annotations

import errno
import os

import pytest

from interbert.utils import files
from interbert.utils.files import atomic_path, atomic_write, atomic_write_json, leftover_temporaries


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2, "name": "图片"})
    assert target.read_text(encoding="utf-8").strip().startswith("{")
    assert '"图片"' in target.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_writer_that_fails_midway_keeps_the_old_content(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")

    def half_then_full_disk(handle):
        handle.write(b"new but incomp")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_full_disk)
    assert target.read_bytes() == b"old"
    assert leftover_temporaries(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_a_failed_rename_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "index.faiss"
    target.write_bytes(b"old")

    def failing_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
    assert target.read_bytes() == b"old"
    assert leftover_temporaries(tmp_path) == []


def test_the_file_and_its_folder_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    atomic_write(tmp_path / "x.bin", lambda h: h.write(b"1"))
    if os.path.exists("/proc/self/fd"):
        assert any(".x.bin.tmp-" in str(s) for s in synced)  # the data, before the rename
        assert str(tmp_path) in [str(s) for s in synced]  # the folder, after it
    else:
        assert len(synced) == 2


def write_files(**contents):
    def write(folder):
        for name, text in contents.items():
            (folder / name).write_text(text)

    return write


def test_replace_folder_swaps_in_the_new_content_whole(tmp_path):
    target = tmp_path / "model_best"
    files.replace_folder(target, write_files(**{"config.json": "1", "old_only.txt": "x"}))
    files.replace_folder(target, write_files(**{"config.json": "2"}))
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]  # nothing of the old folder is left
    assert (target / "config.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best"]


def test_replace_folder_keeps_the_previous_folder_when_the_writer_fails(tmp_path):
    target = tmp_path / "model_best"
    files.replace_folder(target, write_files(**{"config.json": "1"}))

    def half_then_full_disk(folder):
        (folder / "config.json").write_text("2")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.replace_folder(target, half_then_full_disk)
    assert (target / "config.json").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best"]


def test_replace_folder_puts_back_the_previous_folder_when_the_second_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "model_best"
    files.replace_folder(target, write_files(**{"config.json": "1"}))
    real_replace, failed = os.replace, []

    def replace(src, dst):  # the new folder's rename fails once; putting the old one back works
        if os.fspath(dst) == os.fspath(target) and not failed:
            failed.append(src)
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="I/O error"):
        files.replace_folder(target, write_files(**{"config.json": "2"}))
    monkeypatch.undo()
    assert failed and (target / "config.json").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best"]


def test_replace_folder_recovers_from_a_crash_between_its_two_renames(tmp_path):
    target = tmp_path / "model_best"
    files.replace_folder(target, write_files(**{"config.json": "1"}))
    os.rename(target, tmp_path / ".model_best.previous")  # killed after the first rename
    files.replace_folder(target, write_files(**{"config.json": "2"}))
    assert (target / "config.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best"]


def test_atomic_link_makes_the_target_the_same_content(tmp_path):
    source = tmp_path / "checkpoint-4.pt"
    source.write_bytes(b"state at 4")
    files.atomic_link(source, tmp_path / "checkpoint.pt")
    source.unlink()  # rotation deletes the numbered file: the latest stays readable
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"state at 4"
