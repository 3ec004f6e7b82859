"""Region-feature stores: one lookup interface over the layouts detectors leave behind.

``store[image_id] -> Regions`` in O(1) for every format (a dict from id to where the image lives, never
a list search), without loading the whole file: the TSV is indexed by line byte offsets in one pass and
read with ``os.pread``; the project's own store (:class:`RegionStore`) memory-maps concatenated ``.npy``
arrays. Pickled LMDB values (ViLBERT / the original code) are read only with ``trust_pickle=True`` —
pickle runs code, so it is meant for a one-time ``interbert data convert``.

Every reader may be shared by threads (the search service's workers) and inherited by forked processes
(DataLoader workers): reads never move a shared file position, and what a reader opens on first use
(a file, an HDF5 file, an LMDB environment, the store's array maps) is opened once per process and
published only when complete. A malformed input raises :class:`DataFormatError` naming the file and
line or the image id, never a bare numpy / json / h5py / zipfile / unicode error.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
import weakref
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from interbert.data.errors import DataFormatError, UnknownImageError
from interbert.errors import InterBertError, UsageError
from interbert.utils.files import (
    atomic_path,
    atomic_write,
    atomic_write_json,
    fsync_dir,
    remove_leftover_temporaries,
    update_digest,
)

logger = logging.getLogger(__name__)

# Guards the first open of a reader's handle in a process. Re-created in a forked child: a child forked
# while another thread held it would otherwise wait for it forever. Re-entrant because opening an LMDB
# handle takes it again for the process-wide environment table.
_OPEN_LOCK = threading.RLock()


def _fresh_open_lock_after_fork() -> None:
    global _OPEN_LOCK
    _OPEN_LOCK = threading.RLock()


os.register_at_fork(after_in_child=_fresh_open_lock_after_fork)


@dataclass
class Regions:
    """Detector output for one image: boxes are ``x1 y1 x2 y2`` in original-image pixels."""

    features: np.ndarray  # N x D float32
    boxes: np.ndarray  # N x 4 float32
    image_w: int
    image_h: int
    class_probs: np.ndarray | None = None  # N x C, the detector's class distribution

    def __post_init__(self):
        self.features = np.asarray(self.features, dtype=np.float32)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.image_w, self.image_h = int(self.image_w), int(self.image_h)
        if self.class_probs is not None:
            self.class_probs = np.asarray(self.class_probs, dtype=np.float32)

    @property
    def num_regions(self) -> int:
        return len(self.features)


class FeatureStore:
    """What every reader offers. Subclasses fill ``self._index`` (id -> location) and ``_read``."""

    path: Path
    _index: dict[str, object]
    feature_dim: int

    def _read(self, image_id: str, location: object) -> Regions:
        raise NotImplementedError

    def _per_process(self, attr: str, open_handle):
        """The handle in ``self.<attr>``, opened by ``open_handle()`` on first use in this process. It is
        kept as one ``(pid, handle)`` tuple, assigned only once the handle is complete, so a thread reads
        either nothing (and opens it under the lock) or a finished handle, and a forked DataLoader worker
        sees another process's pid and opens its own. The fast path takes no lock."""
        current, pid = getattr(self, attr), os.getpid()
        if current is None or current[0] != pid:
            with _OPEN_LOCK:
                current = getattr(self, attr)
                if current is None or current[0] != pid:
                    current = (pid, open_handle())
                    setattr(self, attr, current)
        return current[1]

    def __getitem__(self, image_id: str | int) -> Regions:
        image_id = str(image_id)
        try:
            location = self._index[image_id]
        except KeyError:
            raise UnknownImageError(image_id, self.path) from None
        return self._read(image_id, location)

    def __contains__(self, image_id: object) -> bool:
        return str(image_id) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def ids(self) -> list[str]:
        return list(self._index)

    def items(self) -> Iterator[tuple[str, Regions]]:
        for image_id in self._index:
            yield image_id, self[image_id]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, images={len(self)}, feature_dim={self.feature_dim})"


# --------------------------------------------------------------------------- bottom-up TSV
TSV_LAYOUTS = {
    # bottom-up-attention's generate_tsv.py
    6: ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"],
    # its variant that also dumps the class distribution
    7: ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "cls_prob"],
    # LXMERT's (note: height before width)
    10: ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes", "boxes",
         "features"],
}
_TSV_ALIASES = {"img_id": "image_id", "img_w": "image_w", "img_h": "image_h"}


def _utf8(path: Path, line: int | None, raw: bytes, what: str = "line") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(path, f"{what} is not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})",
                              line) from None


def _load_json(path: Path):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except json.JSONDecodeError as e:
        raise DataFormatError(path, f"not valid JSON ({e.msg}, column {e.colno})", e.lineno) from None
    except UnicodeDecodeError as e:  # json.loads decodes bytes as UTF-8/16/32 itself
        raise DataFormatError(path, f"not UTF-8 text (byte {e.start}: {e.reason})") from None


def _decode_float32(path: Path, line: int | None, image_id: str, field: str, value: str | bytes, rows: int,
                    columns: int | None = None) -> np.ndarray:
    """Base64 float32 ``value`` as ``rows x columns`` (``columns`` inferred when None)."""
    try:
        flat = np.frombuffer(base64.b64decode(value, validate=True), dtype=np.float32)
    except (binascii.Error, ValueError) as e:  # bad characters, cut padding, a length not whole floats
        raise DataFormatError(path, f"image {image_id}: field {field!r} is not valid base64 float32 ({e})", line) from None
    if rows < 1:
        raise DataFormatError(path, f"image {image_id}: num_boxes={rows}, expected at least 1", line)
    if columns is not None and flat.size != rows * columns:
        raise DataFormatError(path, f"image {image_id}: field {field!r} holds {flat.size} floats, expected "
                                    f"num_boxes={rows} x {columns}", line)
    if flat.size % rows:
        raise DataFormatError(
            path, f"image {image_id}: field {field!r} holds {flat.size} floats, not a multiple of num_boxes={rows}", line)
    return flat.reshape(rows, -1)


def _pread_exactly(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``, or fewer at the end of the file. ``os.pread`` reads at an offset
    without moving the descriptor's position, so threads sharing the descriptor cannot disturb each other."""
    parts = []
    while length > 0:
        part = os.pread(fd, length, offset)
        if not part:
            break
        parts.append(part)
        length, offset = length - len(part), offset + len(part)
    return b"".join(parts)


class TsvFeatures(FeatureStore):
    """Bottom-up-attention TSV (6 columns), its ``cls_prob`` variant (7) or LXMERT's (10), no header
    (an optional header line naming the fields is honoured). One pass records each line's byte offset
    and length; a lookup reads exactly that line with ``os.pread`` and decodes it."""

    def __init__(self, path: str | Path, fieldnames: list[str] | None = None):
        self.path = Path(path)
        self.fieldnames = fieldnames
        self._index: dict[str, tuple[int, int, int]] = {}  # image id -> (byte offset, byte length, line number)
        self._file = None  # (pid, unbuffered file) once read in this process; see FeatureStore._per_process
        header_line = None
        with open(self.path, "rb") as f:
            offset = 0
            for line_no, raw in enumerate(f, 1):
                if line_no == 1 and fieldnames is None and raw.split(b"\t", 1)[0].strip() in (b"image_id", b"img_id"):
                    self.fieldnames = _utf8(self.path, line_no, raw, "the header line").rstrip("\r\n").split("\t")
                    header_line = line_no
                elif raw.strip():
                    self._index_line(raw, offset, line_no)
                offset += len(raw)
        if not self._index:
            raise DataFormatError(self.path, "no feature lines")
        self._columns = [_TSV_ALIASES.get(name, name) for name in self.fieldnames]
        missing = {"image_id", "image_w", "image_h", "num_boxes", "boxes", "features"} - set(self._columns)
        if missing:
            raise DataFormatError(self.path, f"the field names lack {sorted(missing)}", header_line)
        first = next(iter(self._index))
        self._first_line = self._index[first][2]
        self.feature_dim = self[first].features.shape[1]

    def _index_line(self, raw: bytes, offset: int, line_no: int) -> None:
        n = raw.count(b"\t") + 1
        if self.fieldnames is None:
            if n not in TSV_LAYOUTS:
                raise DataFormatError(self.path, f"{n} tab-separated fields; expected one of {sorted(TSV_LAYOUTS)} "
                                                 "(or pass fieldnames)", line_no)
            self.fieldnames = TSV_LAYOUTS[n]
        if n != len(self.fieldnames):
            raise DataFormatError(
                self.path, f"{n} tab-separated fields, expected {len(self.fieldnames)} (truncated line?)", line_no)
        image_id = _utf8(self.path, line_no, raw.split(b"\t", 1)[0], "the image id").strip()
        if image_id in self._index:
            raise DataFormatError(self.path, f"image id {image_id!r} appears twice (first on line "
                                             f"{self._index[image_id][2]})", line_no)
        self._index[image_id] = (offset, len(raw), line_no)

    def _read(self, image_id: str, location: tuple[int, int, int]) -> Regions:
        offset, length, line = location
        f = self._per_process("_file", lambda: open(self.path, "rb", buffering=0))
        raw = _pread_exactly(f.fileno(), length, offset)
        # stop at the line's end as readline would, should the file have been rewritten since it was indexed
        values = _utf8(self.path, line, raw.split(b"\n", 1)[0], f"the line of image {image_id}").rstrip("\r\n").split("\t")
        if len(values) != len(self._columns):
            raise DataFormatError(self.path, f"image {image_id}: {len(values)} fields, expected {len(self._columns)} "
                                             "(truncated line?)", line)
        row = dict(zip(self._columns, values))
        if row["image_id"].strip() != image_id:
            raise DataFormatError(self.path, f"image {image_id}: the line now holds image {row['image_id'].strip()!r} "
                                             "(the file changed after it was opened)", line)
        try:
            num_boxes, image_w, image_h = int(row["num_boxes"]), int(float(row["image_w"])), int(float(row["image_h"]))
        except ValueError as e:
            raise DataFormatError(self.path, f"image {image_id}: bad number ({e})", line) from None
        # boxes first: 4 floats per box make them the check that catches a wrong num_boxes
        boxes = _decode_float32(self.path, line, image_id, "boxes", row["boxes"], num_boxes, 4)
        features = _decode_float32(self.path, line, image_id, "features", row["features"], num_boxes)
        known_dim = getattr(self, "feature_dim", features.shape[1])  # unset while the first line is being read
        if features.shape[1] != known_dim:  # name the line the size came from: either line may be the wrong one
            raise DataFormatError(self.path, f"image {image_id}: {features.size} feature values for num_boxes="
                                             f"{num_boxes} (expected {num_boxes} x {known_dim}, the feature size of "
                                             f"line {self._first_line})", line)
        class_probs = None
        if "cls_prob" in row:
            class_probs = _decode_float32(self.path, line, image_id, "cls_prob", row["cls_prob"], num_boxes)
        return Regions(features, boxes, image_w, image_h, class_probs)

    def __getstate__(self):  # picklable for DataLoader workers (spawn): the open file is not
        return {**self.__dict__, "_file": None}


def write_tsv(path: str | Path, items: Iterable[tuple[str, Regions]], with_class_probs: bool = False) -> None:
    """Write the bottom-up-attention TSV (``with_class_probs`` adds its ``cls_prob`` column). The file
    appears complete or not at all: a failure part-way keeps the file that was there before."""
    def b64(a: np.ndarray) -> str:
        return base64.b64encode(np.ascontiguousarray(a, dtype=np.float32).tobytes()).decode()

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for image_id, r in items:
            fields = [image_id, r.image_w, r.image_h, r.num_regions, b64(r.boxes), b64(r.features)]
            if with_class_probs:
                fields.append(b64(r.class_probs))
            f.write("\t".join(map(str, fields)) + "\n")


# --------------------------------------------------------------------------- folder of .npz
class NpzFolderFeatures(FeatureStore):
    """One ``<image_id>.npz`` per image with ``features``, ``boxes``, ``image_w``, ``image_h`` and
    optionally ``class_probs`` (or ``cls_prob``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._index = {p.stem: p for p in sorted(self.path.glob("*.npz"))}
        if not self._index:
            raise DataFormatError(self.path, "no .npz files in this folder")
        self.feature_dim = self[next(iter(self._index))].features.shape[1]

    def _read(self, image_id: str, file: Path) -> Regions:
        return read_npz_regions(file, image_id)


def read_npz_regions(file: str | Path, image_id: str | None = None) -> Regions:
    """One image's regions from an ``.npz`` of the npz-folder layout (``features``, ``boxes``, ``image_w``,
    ``image_h``, optionally ``class_probs``/``cls_prob``): what :class:`NpzFolderFeatures` reads per image,
    and what :class:`interbert.processing.InterBertProcessor` reads for a path. A missing, cut or
    inconsistent file is a :class:`DataFormatError` naming it (and ``image_id``; default: the file's stem)."""
    file = Path(file)
    image_id = file.stem if image_id is None else image_id
    # np.load opens the file anew for every read, so threads and processes share nothing here
    try:
        with np.load(file) as z:
            missing = {"features", "boxes", "image_w", "image_h"} - set(z.files)
            if missing:
                raise DataFormatError(file, f"image {image_id}: missing arrays {sorted(missing)}")
            probs = z["class_probs"] if "class_probs" in z.files else (z["cls_prob"] if "cls_prob" in z.files else None)
            features, boxes, image_w, image_h = z["features"], z["boxes"], z["image_w"], z["image_h"]
    except (DataFormatError, FileNotFoundError):  # already clear (a file deleted since the folder was listed)
        raise
    # a cut or corrupt archive fails in many layers: the zip directory, inflate, the .npy header, a pickle
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
        raise DataFormatError(file, f"image {image_id}: not a readable .npz ({type(e).__name__}: {e})") from None
    if features.ndim != 2 or boxes.ndim != 2 or len(boxes) != len(features) or boxes.shape[1] != 4:
        raise DataFormatError(file, f"image {image_id}: features {features.shape} and boxes {boxes.shape} disagree")
    if probs is not None and (probs.ndim != 2 or len(probs) != len(features)):
        raise DataFormatError(file, f"image {image_id}: class_probs {probs.shape} do not match features {features.shape}")
    if image_w.size != 1 or image_h.size != 1:
        raise DataFormatError(file, f"image {image_id}: image_w/image_h are not single numbers")
    try:
        return Regions(features, boxes, image_w.item(), image_h.item(), probs)
    except (TypeError, ValueError) as e:  # e.g. string arrays where numbers belong
        raise DataFormatError(file, f"image {image_id}: arrays of the wrong type ({e})") from None


def write_npz_folder(path: str | Path, items: Iterable[tuple[str, Regions]]) -> None:
    """One ``<image_id>.npz`` per image in the folder ``path`` (added to what is there). Each file is
    written under a temporary name and renamed when complete, so a killed writer leaves no cut archive."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for image_id, r in items:
        extra = {} if r.class_probs is None else {"class_probs": r.class_probs}
        atomic_write(path / f"{image_id}.npz", lambda handle: np.savez(
            handle, features=r.features, boxes=r.boxes, image_w=r.image_w, image_h=r.image_h, **extra))


# --------------------------------------------------------------------------- HDF5
# Flat layout: one array per field over all images, rows aligned. Names in order of preference; the
# second ones are bottom-up-attention-vqa's (``image_features``, ``image_bb``, ``spatial_features``).
HDF5_FLAT_FIELDS = {
    "features": ("features", "image_features"),  # N x K x D
    "boxes": ("boxes", "image_bb"),  # N x K x 4, pixels
    "ids": ("image_ids", "image_id", "ids"),  # N (ints or strings); else a <stem>_imgid2idx.json/.pkl beside the file
    "num_boxes": ("num_boxes", "num_regions"),  # N; else all K rows are regions
    "image_w": ("image_w", "image_width"),  # N; else derived from spatial_features
    "image_h": ("image_h", "image_height"),
    "class_probs": ("class_probs", "cls_prob"),  # N x K x C, optional
}


def _first(f, names: tuple[str, ...]):
    return next((f[n] for n in names if n in f and not hasattr(f[n], "keys")), None)


class Hdf5Features(FeatureStore):
    """Two HDF5 layouts, told apart by their content.

    - **Groups:** one group per image id holding ``features``, ``boxes`` (and ``class_probs``), with the
      image size in the group's attributes ``image_w``/``image_h``.
    - **Flat:** datasets over all images with aligned rows (:data:`HDF5_FLAT_FIELDS`): ``features``
      (N x K x D), ``boxes`` (N x K x 4), ``image_ids`` (N), optional ``num_boxes``, ``image_w``/``image_h``
      and ``class_probs``. Bottom-up-attention-vqa's ``train36.hdf5`` reads as is: ``image_features``,
      ``image_bb``, sizes derived from ``spatial_features`` (boxes divided by the image size), ids from
      ``train36_imgid2idx.pkl`` beside it (a pickle: only with ``trust_pickle=True``) or a ``.json`` twin.
    """

    def __init__(self, path: str | Path, trust_pickle: bool = False):
        import h5py

        self.path = Path(path)
        self._file = None  # (pid, h5py.File) once read in this process; see FeatureStore._per_process
        try:
            with h5py.File(self.path, "r") as f:
                features = _first(f, HDF5_FLAT_FIELDS["features"])
                if features is not None and features.ndim == 3:
                    self._flat = self._read_flat_index(f, features, trust_pickle)
                    self._index = {image_id: row for row, image_id in enumerate(self._flat["ids"])}
                    self.feature_dim = int(features.shape[2])
                    return
                self._flat = None
                self._index = {name: name for name in f.keys() if hasattr(f[name], "keys")}
        except (DataFormatError, FileNotFoundError, PermissionError):  # clear already (PermissionError: a pickle)
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:  # h5py's errors for a cut or corrupt file
            raise DataFormatError(self.path, f"not a readable HDF5 file ({type(e).__name__}: {e})") from None
        if not self._index:
            raise DataFormatError(self.path, "neither image groups nor a flat N x K x D 'features' dataset in this HDF5 file")
        self.feature_dim = self[next(iter(self._index))].features.shape[1]

    def _read_flat_index(self, f, features, trust_pickle: bool) -> dict:
        """Ids, region counts and image sizes of a flat file (small, read once); the arrays stay on disk."""
        n, k = features.shape[:2]
        boxes = _first(f, HDF5_FLAT_FIELDS["boxes"])
        if boxes is None or boxes.shape[:2] != (n, k) or boxes.shape[2] < 4:
            raise DataFormatError(self.path, f"flat layout: a boxes dataset {HDF5_FLAT_FIELDS['boxes']} of shape "
                                  f"({n}, {k}, 4) is needed, found {None if boxes is None else boxes.shape}")

        def per_image(field: str, dtype):
            ds = _first(f, HDF5_FLAT_FIELDS[field])
            if ds is None:
                return None
            if ds.shape != (n,):
                raise DataFormatError(self.path, f"flat layout: dataset {ds.name!r} has shape {ds.shape}, expected ({n},)")
            return ds[()].astype(dtype) if dtype is not None else ds[()]

        ids = per_image("ids", None)
        ids = self._sidecar_ids(n, trust_pickle) if ids is None else [
            _utf8(self.path, None, i, f"the image id of row {row}") if isinstance(i, bytes) else str(i)
            for row, i in enumerate(ids.tolist())]
        duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
        if duplicates:
            raise DataFormatError(self.path, f"flat layout: image ids occur more than once: {duplicates[:5]}")
        num_boxes = per_image("num_boxes", np.int64)
        if num_boxes is None:
            num_boxes = np.full(n, k, dtype=np.int64)
        bad = np.flatnonzero((num_boxes < 1) | (num_boxes > k))
        if len(bad):
            raise DataFormatError(self.path, f"image {ids[bad[0]]}: num_boxes {num_boxes[bad[0]]} outside 1..{k}")
        width, height = per_image("image_w", np.int64), per_image("image_h", np.int64)
        if width is None or height is None:
            width, height = self._sizes_from_spatial(f, boxes, n, k, ids)
        probs = _first(f, HDF5_FLAT_FIELDS["class_probs"])
        if probs is not None and probs.shape[:2] != (n, k):
            raise DataFormatError(self.path, f"flat layout: {probs.name!r} has shape {probs.shape}, expected ({n}, {k}, C)")
        return {"ids": ids, "num_boxes": num_boxes, "image_w": width, "image_h": height,
                "features": features.name, "boxes": boxes.name, "class_probs": None if probs is None else probs.name}

    def _sidecar_ids(self, n: int, trust_pickle: bool) -> list[str]:
        stem = self.path.with_suffix("")
        json_file, pkl_file = Path(f"{stem}_imgid2idx.json"), Path(f"{stem}_imgid2idx.pkl")
        if json_file.exists():
            mapping = _load_json(json_file)
        elif pkl_file.exists():
            if not trust_pickle:
                raise PermissionError(
                    f"{pkl_file} maps image ids to rows of {self.path} as a Python pickle; unpickling runs code the "
                    "file's author chose. If you trust its source pass trust_pickle=True (CLI: --trust-pickle), or "
                    f"write the same mapping as {json_file.name}.")
            import pickle

            try:
                with open(pkl_file, "rb") as handle:
                    mapping = pickle.load(handle)
            except Exception as e:  # noqa: BLE001 -- a broken pickle fails with any type (EOFError, ImportError, ...)
                raise DataFormatError(pkl_file, f"not a readable pickle ({type(e).__name__}: {e})") from None
        else:
            raise DataFormatError(self.path, f"flat layout without an ids dataset {HDF5_FLAT_FIELDS['ids']} and no "
                                  f"{json_file.name} or {pkl_file.name} beside it: which row is which image is unknown")
        id_map = json_file if json_file.exists() else pkl_file
        if not isinstance(mapping, dict):
            raise DataFormatError(id_map, f"holds a {type(mapping).__name__}, not a mapping of image id to row")
        ids: list[str | None] = [None] * n
        for image_id, row in mapping.items():
            if not isinstance(row, (int, np.integer)) or not 0 <= int(row) < n:
                raise DataFormatError(id_map, f"image {image_id}: row {row!r} is not one of the {n} rows of {self.path.name}")
            ids[int(row)] = str(image_id)
        missing = [row for row, i in enumerate(ids) if i is None]
        if missing:  # rows without an id would be silently unreachable
            raise DataFormatError(self.path, f"{len(missing)} rows have no image id in the id map (first: row {missing[0]})")
        return ids

    def _sizes_from_spatial(self, f, boxes, n: int, k: int, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """bottom-up-attention-vqa stores no image size, but ``spatial_features`` = boxes / (w, h, w, h, ...)."""
        spatial = f["spatial_features"] if "spatial_features" in f else None
        if spatial is None or spatial.shape[:2] != (n, k) or spatial.shape[2] < 4:
            raise DataFormatError(self.path, "flat layout: no image_w/image_h datasets and no spatial_features to "
                                  "derive the image sizes from")
        pixel, normalised = boxes[()][..., :4].astype(np.float64), spatial[()][..., :4].astype(np.float64)
        # per image, the region reaching furthest right / down gives the most precise ratio
        rows = np.arange(n)
        right, bottom = pixel[..., 2].argmax(1), pixel[..., 3].argmax(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            width = pixel[rows, right, 2] / normalised[rows, right, 2]
            height = pixel[rows, bottom, 3] / normalised[rows, bottom, 3]
        bad = np.flatnonzero(~np.isfinite(width) | ~np.isfinite(height) | (width < 1) | (height < 1))
        if len(bad):
            raise DataFormatError(self.path, f"image {ids[bad[0]]}: spatial_features do not give its size")
        return np.rint(width).astype(np.int64), np.rint(height).astype(np.int64)

    def _read(self, image_id: str, location: str | int) -> Regions:
        import h5py

        # One h5py.File per process, shared by its threads: h5py serialises every call into the HDF5 library
        # with its own global lock, and a dataset read names its position, so threads do not disturb each other.
        f = self._per_process("_file", lambda: h5py.File(self.path, "r"))
        try:
            if self._flat is not None:
                flat, row = self._flat, int(location)
                count = int(flat["num_boxes"][row])
                probs = None if flat["class_probs"] is None else f[flat["class_probs"]][row, :count]
                return Regions(f[flat["features"]][row, :count], f[flat["boxes"]][row, :count, :4],
                               int(flat["image_w"][row]), int(flat["image_h"][row]), probs)
            g = f[location]
            try:
                features, boxes, image_w, image_h = g["features"][()], g["boxes"][()], g.attrs["image_w"], g.attrs["image_h"]
            except KeyError:  # (only now ask what is missing: every h5py call costs)
                missing = {"features", "boxes"} - set(g.keys()) | {"image_w", "image_h"} - set(g.attrs.keys())
                raise DataFormatError(self.path, f"image {image_id}: group lacks {sorted(missing)}") from None
            probs = g["class_probs"][()] if "class_probs" in g else None
            if features.ndim != 2 or boxes.shape != (len(features), 4):
                raise DataFormatError(self.path, f"image {image_id}: features {features.shape} and boxes {boxes.shape} "
                                                 "disagree")
            return Regions(features, boxes, image_w, image_h, probs)
        except DataFormatError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:  # unreadable data (a cut file), wrong types
            raise DataFormatError(self.path, f"image {image_id}: unreadable ({type(e).__name__}: {e})") from None

    def __getstate__(self):  # picklable for DataLoader workers (spawn): the open file is not
        return {**self.__dict__, "_file": None}



# --------------------------------------------------------------------------- ViLBERT / original LMDB
# One read-only environment per LMDB and process, shared by all its readers and threads: py-lmdb refuses to
# open an environment twice in one process, and LMDB forbids using one inherited through fork. Keyed by
# (pid, device, inode of the data file), so a re-created LMDB at the same path is a new environment.
_LMDB_ENVS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _lmdb_env(path: Path):
    import lmdb

    subdir = path.is_dir()
    data = os.stat(path / "data.mdb" if subdir else path)
    key = (os.getpid(), data.st_dev, data.st_ino)
    with _OPEN_LOCK:
        env = _LMDB_ENVS.get(key)
        if env is None:
            for inherited in [k for k in _LMDB_ENVS if k[0] != key[0] and k[1:] == key[1:]]:
                stale = _LMDB_ENVS.pop(inherited, None)  # (None if collected meanwhile: the table holds weakly)
                if stale is not None:
                    stale.close()  # the parent's, in a forked child: close our copy, then open our own
            # read-only with lock=False: nothing writes while we read, so no reader table is needed; an
            # environment's read transactions may be begun from any thread
            env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=subdir)
            _LMDB_ENVS[key] = env
    return env


class LmdbFeatures(FeatureStore):
    """ViLBERT's LMDB (what the original InterBERT code reads): key ``b"keys"`` holds a pickled list of
    ids, each value a pickled dict with ``image_id, image_h, image_w, num_boxes, features, boxes``
    (base64 float32 or arrays). Pickle can execute arbitrary code, so this reader refuses to run
    unless ``trust_pickle=True``: use it once, to ``interbert data convert`` into a :class:`RegionStore`."""

    def __init__(self, path: str | Path, trust_pickle: bool = False):
        self.path = Path(path)
        if not trust_pickle:
            raise PermissionError(
                f"{self.path} is a ViLBERT-style LMDB whose values are Python pickles; unpickling runs code that "
                "the file's author chose. If you trust its source, pass trust_pickle=True (CLI: --trust-pickle) and "
                "convert it once into the project's store with `interbert data convert`.")
        import pickle

        self._pickle = pickle
        self._env = None  # (pid, environment) once opened in this process; see FeatureStore._per_process
        try:
            keys = self._unpickle("b'keys' entry", self._get(b"keys"))
            if keys is None:
                raise DataFormatError(self.path, "no b'keys' entry (not a ViLBERT feature LMDB)")
            if not isinstance(keys, (list, tuple)):
                raise DataFormatError(self.path, f"the b'keys' entry holds a {type(keys).__name__}, not a list of ids")
            self._index = {(k.decode() if isinstance(k, bytes) else str(k)):
                           (k if isinstance(k, bytes) else str(k).encode()) for k in keys}
            self.feature_dim = self[next(iter(self._index))].features.shape[1]
        except BaseException:
            # the traceback keeps this half-built reader alive: let go of the environment now, or the
            # process could not open this LMDB again (not even to repair it) while the error is around
            self._env = None
            raise

    def _get(self, key: bytes) -> bytes | None:
        import lmdb

        try:
            env = self._per_process("_env", lambda: _lmdb_env(self.path))
            with env.begin() as txn:  # a read transaction per lookup: transactions are not shared by threads
                return txn.get(key)
        except lmdb.Error as e:  # not an LMDB, a cut data.mdb
            raise DataFormatError(self.path, f"not a readable LMDB ({type(e).__name__}: {e})") from None

    def _unpickle(self, what: str, raw: bytes | None):
        if raw is None:
            return None
        try:
            return self._pickle.loads(raw)
        except Exception as e:  # noqa: BLE001 -- a broken pickle fails with any type (EOFError, ImportError, ...)
            raise DataFormatError(self.path, f"{what}: not a readable pickle ({type(e).__name__}: {e})") from None

    def _read(self, image_id: str, key: bytes) -> Regions:
        item = self._unpickle(f"image {image_id}", self._get(key))
        if item is None:
            raise DataFormatError(self.path, f"image {image_id}: listed in b'keys' but has no value")
        missing = {"num_boxes", "image_w", "image_h", "features", "boxes"} - set(item if isinstance(item, dict) else ())
        if missing:
            raise DataFormatError(self.path, f"image {image_id}: the value lacks {sorted(missing)}")
        try:
            num_boxes = int(item["num_boxes"])

            def array(field: str, columns: int | None = None) -> np.ndarray:
                value = item[field]
                if isinstance(value, (str, bytes)):
                    return _decode_float32(self.path, None, image_id, field, value, num_boxes, columns)
                return np.asarray(value, dtype=np.float32).reshape(num_boxes, -1 if columns is None else columns)

            boxes = array("boxes", 4)  # first: 4 floats per box make them the check that catches a wrong num_boxes
            probs = array("cls_prob") if "cls_prob" in item else None
            return Regions(array("features"), boxes, item["image_w"], item["image_h"], probs)
        except DataFormatError:
            raise
        except (TypeError, ValueError) as e:  # a count that is no number, arrays of the wrong size
            raise DataFormatError(self.path, f"image {image_id}: {type(e).__name__}: {e}") from None

    def __getstate__(self):
        return {**self.__dict__, "_env": None, "_pickle": None}

    def __setstate__(self, state):
        import pickle

        self.__dict__.update(state, _pickle=pickle)


# --------------------------------------------------------------------------- the project's store
STORE_FORMAT = "interbert-regions"
MANIFEST = "manifest.json"


class RegionStore(FeatureStore):
    """The project's own store: a folder of chunks, each a set of memory-mapped ``.npy`` arrays
    concatenated over its images (``features`` float32 or float16, ``boxes``, ``class_probs`` when
    present) plus ``index.json`` with ``ids, offsets, counts, image_w, image_h``. ``manifest.json`` lists
    the complete chunks; a chunk exists for readers only once the manifest names it.

    Opening reads every index and maps every array, checking them against each other, so a damaged store
    fails here, naming the file, rather than on some later read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise DataFormatError(self.path, f"no {MANIFEST}: not an interbert region store")
        self.manifest = _load_json(manifest_path)
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != STORE_FORMAT:
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else type(self.manifest).__name__
            raise DataFormatError(manifest_path, f"format is {found!r}, not {STORE_FORMAT!r}")
        chunks, dim = self.manifest.get("chunks"), self.manifest.get("feature_dim")
        if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks) or not isinstance(dim, int):
            raise DataFormatError(manifest_path, "needs 'chunks' (a list of chunk names) and 'feature_dim' (an integer)")
        self.feature_dim = dim
        self._index: dict[str, tuple[int, int, int, int, int]] = {}  # id -> (chunk, first row, rows, width, height)
        self._rows = []  # rows each chunk's arrays must hold at least
        for c, chunk in enumerate(chunks):
            index_path = self.path / f"{chunk}.index.json"
            index = self._chunk_index(index_path)
            for image_id, offset, count, w, h in zip(index["ids"], index["offsets"], index["counts"],
                                                     index["image_w"], index["image_h"]):
                if image_id in self._index:
                    raise DataFormatError(index_path, f"image {image_id} is also in {chunks[self._index[image_id][0]]}")
                self._index[image_id] = (c, offset, count, w, h)
            self._rows.append(max((o + n for o, n in zip(index["offsets"], index["counts"])), default=0))
        self._maps = None  # (pid, one dict of arrays per chunk); see FeatureStore._per_process
        self._per_process("_maps", self._map_chunks)

    @staticmethod
    def _chunk_index(index_path: Path) -> dict:
        if not index_path.exists():
            raise DataFormatError(index_path, f"missing, but {MANIFEST} lists its chunk")
        index = _load_json(index_path)
        fields = ("ids", "offsets", "counts", "image_w", "image_h")
        if not isinstance(index, dict) or not all(isinstance(index.get(f), list) for f in fields):
            raise DataFormatError(index_path, f"needs the lists {list(fields)}")
        if len({len(index[f]) for f in fields}) != 1:
            raise DataFormatError(index_path, "its lists " + ", ".join(f"{f} ({len(index[f])})" for f in fields) +
                                  " differ in length")
        for row, (image_id, *numbers) in enumerate(zip(*(index[f] for f in fields))):
            if not isinstance(image_id, str) or not all(isinstance(x, int) and x >= 0 for x in numbers) or numbers[1] < 1:
                raise DataFormatError(index_path, f"entry {row} (image {image_id!r}): expected a string id and counts "
                                                  f"of at least 1, found {numbers}")
        return index

    def _map_chunks(self) -> list[dict[str, np.ndarray | None]]:
        """Memory-map every chunk's arrays. The list is complete before anyone sees it (the caller publishes it)."""
        maps = []
        with_probs = self.manifest.get("num_classes") is not None
        for chunk, rows in zip(self.manifest["chunks"], self._rows):
            arrays = {key: self._map(f"{chunk}.{key}.npy") for key in ("features", "boxes")}
            arrays["class_probs"] = self._map(f"{chunk}.class_probs.npy") if with_probs else None
            features, boxes, probs = arrays["features"], arrays["boxes"], arrays["class_probs"]
            if features.ndim != 2 or (self.feature_dim and features.shape[1] != self.feature_dim):
                raise DataFormatError(self.path / f"{chunk}.features.npy", f"shape {features.shape}, expected "
                                      f"(rows, {self.feature_dim}) as {MANIFEST} says")
            if len(features) < rows:
                raise DataFormatError(self.path / f"{chunk}.features.npy", f"{len(features)} rows, but "
                                      f"{chunk}.index.json needs {rows}")
            for key, array, width in (("boxes", boxes, 4), ("class_probs", probs, None)):
                if array is not None and (array.ndim != 2 or len(array) != len(features) or
                                          (width is not None and array.shape[1] != width)):
                    raise DataFormatError(self.path / f"{chunk}.{key}.npy", f"shape {array.shape} does not match "
                                          f"the {len(features)} feature rows")
            maps.append(arrays)
        return maps

    def _map(self, name: str) -> np.ndarray:
        file = self.path / name
        if not file.exists():
            raise DataFormatError(file, f"missing, but {MANIFEST} lists its chunk")
        try:
            return np.load(file, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:  # a bad header, a file shorter than its header says
            raise DataFormatError(file, f"not a readable .npy ({e})") from None

    def _read(self, image_id: str, location: tuple) -> Regions:
        c, offset, count, w, h = location
        arrays = self._per_process("_maps", self._map_chunks)[c]
        rows = slice(offset, offset + count)
        probs = arrays["class_probs"]
        return Regions(arrays["features"][rows], arrays["boxes"][rows], w, h, None if probs is None else probs[rows])

    def __getstate__(self):  # an unpickled copy (a spawned DataLoader worker) maps the arrays anew
        return {**self.__dict__, "_maps": None}


class StoreWriteError(InterBertError, OSError):
    """Writing a store failed (a full disk, a lost mount): the store still holds what it held before."""


class RegionStoreWriter:
    """Append images to a :class:`RegionStore`, restartably. Each full chunk's arrays and index are written
    first, then the manifest that names the chunk: that write is the commit point. Every file is replaced
    crash-safely (:mod:`interbert.utils.files`: a temporary beside it, fsync, rename, fsync of the folder).
    A failed write leaves the store as it was: the manifest untouched, the chunk's files removed, and the
    writer's own state unchanged, so writing again (re-running the convert) resumes with each id once.
    Reopening skips every id already in the manifest."""

    def __init__(self, path: str | Path, feature_dtype: str = "float32", chunk_size: int = 1000):
        if feature_dtype not in ("float32", "float16"):
            raise UsageError(f"feature_dtype must be float32 or float16, not {feature_dtype!r}")
        self.path, self.chunk_size = Path(path), chunk_size
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"{self.path}: is a file, not a store folder (give a new or an existing store's folder)")
        if not self.path.is_dir():
            self.path.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.path.parent)  # the new folder's own entry must survive a crash too
        remove_leftover_temporaries(self.path)  # of a writer killed mid-chunk: never named by the manifest
        if (self.path / MANIFEST).exists():
            existing = RegionStore(self.path)
            self.manifest = existing.manifest
            self.written_ids = set(existing.ids())
            if self.manifest["feature_dtype"] != feature_dtype:
                raise UsageError(f"{self.path} holds {self.manifest['feature_dtype']} features; resume with that dtype")
        else:
            self.manifest = {"format": STORE_FORMAT, "version": 1, "feature_dim": None, "feature_dtype": feature_dtype,
                             "num_classes": None, "chunks": []}
            self.written_ids = set()
        self._pending: list[tuple[str, Regions]] = []
        self._failed = False  # the last write failed: __exit__ does not try again

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.written_ids

    def add(self, image_id: str, regions: Regions) -> None:
        image_id = str(image_id)
        if image_id in self.written_ids:
            raise ValueError(f"image id {image_id!r} is already in {self.path}")
        dim, classes = regions.features.shape[1], None if regions.class_probs is None else regions.class_probs.shape[1]
        if not self.manifest["feature_dim"]:  # None for a new store, 0 for one closed empty
            self.manifest["feature_dim"], self.manifest["num_classes"] = dim, classes
        if dim != self.manifest["feature_dim"] or classes != self.manifest["num_classes"]:
            raise DataFormatError(self.path, f"image {image_id}: {dim}-d features / {classes} classes, but the store "
                                             f"holds {self.manifest['feature_dim']}-d / {self.manifest['num_classes']}")
        self._pending.append((image_id, regions))
        self.written_ids.add(image_id)
        if len(self._pending) >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        number = len(self.manifest["chunks"])
        while f"chunk-{number:05d}" in self.manifest["chunks"]:
            number += 1
        name = f"chunk-{number:05d}"
        regions = [r for _, r in self._pending]
        counts = [r.num_regions for r in regions]
        arrays = {
            "features": np.concatenate([r.features for r in regions]).astype(self.manifest["feature_dtype"]),
            "boxes": np.concatenate([r.boxes for r in regions]).astype(np.float32),
        }
        if self.manifest["num_classes"] is not None:
            arrays["class_probs"] = np.concatenate([r.class_probs for r in regions]).astype(np.float32)
        index = {"ids": [i for i, _ in self._pending], "offsets": np.cumsum([0] + counts[:-1]).tolist(),
                 "counts": counts, "image_w": [r.image_w for r in regions], "image_h": [r.image_h for r in regions]}
        chunk_files = {self.path / f"{name}.{key}.npy": lambda f, a=array: np.save(f, a) for key, array in arrays.items()}
        chunk_files[self.path / f"{name}.index.json"] = lambda f: f.write(json.dumps(index).encode())
        # the new manifest is a copy: self.manifest changes only once the store on disk does
        self._commit({**self.manifest, "chunks": [*self.manifest["chunks"], name]}, chunk_files, name)
        self._pending = []

    def _commit(self, manifest: dict, chunk_files: dict, what: str) -> None:
        """Write ``chunk_files`` (path -> writer), then ``manifest``; adopt ``manifest`` only if all succeeded."""
        try:
            for file, write in chunk_files.items():
                atomic_write(file, write)
            atomic_write_json(self.path / MANIFEST, manifest)
        except OSError as e:
            self._failed = True
            for file in chunk_files:  # named by no manifest, so unreachable: give the (maybe full) disk its space back
                file.unlink(missing_ok=True)
            fsync_dir(self.path)
            kept = len(self.written_ids) - len(self._pending)
            error = StoreWriteError(f"{self.path}: writing {what} failed ({e.strerror or e}); the store is unchanged "
                                    f"and holds the {kept} images written before it: write again to resume")
            error.errno = e.errno
            raise error from e
        except BaseException:  # e.g. Ctrl-C: the chunk's files stay unlisted and the next write of it replaces them
            self._failed = True
            raise
        self.manifest, self._failed = manifest, False

    def close(self) -> RegionStore:
        self.flush()
        if self.manifest["feature_dim"] is None:  # an empty store is still a valid one
            self._commit({**self.manifest, "feature_dim": 0}, {}, MANIFEST)
        return RegionStore(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # keep what was complete, also when interrupted; but not after a failed write: a full disk does not
        # empty itself in a millisecond, and a second failure would only bury the first
        if not self._failed:
            self.flush()


def source_fingerprint(path: str | Path) -> dict:
    """What identifies a conversion's source: its path, size and the SHA-256 of its bytes (a folder's files
    in name order, each name hashed with its content). Two sources are the same when size and hash agree,
    wherever they lie; the path is kept for messages."""
    import hashlib

    path = Path(path)
    digest, size = hashlib.sha256(), 0
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        update_digest(digest, file)
        size += file.stat().st_size
    return {"path": str(path.resolve()), "size": size, "sha256": digest.hexdigest()}


def check_same_source(store: Path, recorded: dict | None, given: dict) -> None:
    """A store converted from one source is resumed only from that source: "already there" from another one
    would keep the first one's features under ids the second one names (a different TSV into an existing store)."""
    if recorded is None:  # a store written before sources were recorded, or by a merge of several
        return
    if (recorded.get("size"), recorded.get("sha256")) != (given["size"], given["sha256"]):
        raise UsageError(f"{store}: holds features converted from {recorded.get('path')} (sha256 "
                         f"{str(recorded.get('sha256'))[:12]}), not from {given['path']} (sha256 {given['sha256'][:12]}); "
                         "convert into a new folder")


def convert_features(source: FeatureStore, destination: str | Path, feature_dtype: str = "float32",
                     chunk_size: int = 1000, progress: bool = True, fingerprint: dict | None = None,
                     nonfinite: list[str] | None = None) -> tuple[int, int]:
    """Copy every image of ``source`` into a :class:`RegionStore` at ``destination``, resuming a partial
    one. Returns ``(written, already_there)``. A failed write raises :class:`StoreWriteError` and leaves
    the store as its last complete chunk left it; running the conversion again completes it.

    ``fingerprint`` (:func:`source_fingerprint` of the source): recorded in the store's manifest, and a store
    recorded from another source is refused. ``nonfinite``: the ids of written images with NaN or inf
    features are appended to it (they are written as they are, and training refuses them); without it
    they are logged as one warning with their count."""
    from tqdm.auto import tqdm

    written = skipped = 0
    bad: list[str] = []
    with RegionStoreWriter(destination, feature_dtype, chunk_size) as writer:
        if fingerprint is not None:
            check_same_source(writer.path, writer.manifest.get("source"), fingerprint)
            writer.manifest["source"] = fingerprint  # written with the next chunk's manifest
        for image_id in tqdm(source.ids(), desc=f"convert -> {destination}", unit="img", disable=not progress):
            if image_id in writer:
                skipped += 1
                continue
            regions = source[image_id]
            if not np.isfinite(regions.features).all():
                bad.append(image_id)
            writer.add(image_id, regions)
            written += 1
        writer.close()
    if nonfinite is not None:
        nonfinite.extend(bad)
    elif bad:
        logger.warning("%s", nonfinite_message(destination, bad))
    return written, skipped


def nonfinite_message(destination: str | Path, ids: list[str], shown: int = 5) -> str:
    listed = ", ".join(repr(i) for i in ids[:shown]) + (", ..." if len(ids) > shown else "")
    return (f"{destination}: {len(ids)} image(s) with non-finite feature values (NaN or inf), written as they are; "
            f"training refuses them: {listed}")


# --------------------------------------------------------------------------- detection
FORMATS = ("store", "tsv", "npz", "hdf5", "lmdb")


def detect_feature_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / MANIFEST).exists():
            return "store"
        if (path / "data.mdb").exists():
            return "lmdb"
        if next(path.glob("*.npz"), None) is not None:
            return "npz"
        raise DataFormatError(path, "folder holds neither manifest.json, data.mdb nor .npz files")
    if not path.exists():
        raise FileNotFoundError(f"no feature store at {path}")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic == b"\x89HDF\r\n\x1a\n":
        return "hdf5"
    if path.suffix in (".lmdb", ".mdb"):
        return "lmdb"
    return "tsv"


def open_features(path: str | Path, format: str = "auto", trust_pickle: bool = False) -> FeatureStore:
    """Open any supported store; ``format`` is ``auto`` or one of :data:`FORMATS`."""
    format = detect_feature_format(path) if format == "auto" else format
    if format == "store":
        return RegionStore(path)
    if format == "tsv":
        return TsvFeatures(path)
    if format == "npz":
        return NpzFolderFeatures(path)
    if format == "hdf5":
        return Hdf5Features(path, trust_pickle=trust_pickle)
    if format == "lmdb":
        return LmdbFeatures(path, trust_pickle=trust_pickle)
    raise ValueError(f"unknown feature format {format!r}; choose auto or one of {FORMATS}")
