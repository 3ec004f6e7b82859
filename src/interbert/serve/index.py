"""The image index: one folder holding

    index.json     what built it (model path, weights fingerprint, config, feature stores, index type)
    meta.sqlite    one row per image: id, caption, thumbnail, feature store, embedding (float32 blob)
    index.faiss    the FAISS index over the embeddings, ids = the SQLite rows (the default engine)
    thumbnails/    small JPEG copies of the images, served by the web page

With ``engine`` (``--engine``) the vectors are searched by Milvus instead of index.faiss: a milvus-lite
file or a Milvus server (:mod:`interbert.serve.engines`); index.json records which, and the SQLite file
stays the source of truth either way.

Images whose embedding holds NaN or inf are not indexed (FAISS would drop them without a word); index.json
counts and names them per feature store (``not_indexed_non_finite``), and a store where most images are
affected fails the build. Image ids never lead the build outside the ``--thumbnails`` folder.

A folder is relocatable when what it names lies inside it: a model or a feature store inside the folder is
recorded by its path relative to the folder (``--copy-model`` and ``--copy-features`` copy them in), so the
folder can be moved or copied to another machine and served there as it is (:func:`path_to_record`).

Embeddings are written to SQLite in one transaction per batch, so a build that stops (crash, Ctrl-C,
a bad feature file) keeps every finished batch; running it again skips the ids already there. The
FAISS index is rebuilt from the stored embeddings at the end of each build/add, which also lets the
automatic index type follow the gallery's size.

index.faiss and then index.json are replaced with crash-safe writes (:mod:`interbert.utils.files`): a
write that fails (full disk, Ctrl-C) keeps the previous file, so the folder still opens and answers with
what it held before. A run whose manifest write failed leaves a manifest that disagrees with the stored
image count, so the next build/add over the folder rebuilds index.faiss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from interbert.data.features import FeatureStore, source_fingerprint
from interbert.errors import DataError, UsageError
from interbert.serve import DEFAULT_MAX_REGIONS, INDEX_TYPES
from interbert.serve._data import first_captions, open_features, region_batch
from interbert.serve.engines import (  # noqa: F401  (build_faiss_index, ivf_lists: the FAISS API, kept importable here)
    FAISS_FILE, HNSW_NEIGHBOURS, Engine, VectorIndex, build_faiss_index, build_vectors, check_engine, faiss_search_params, ivf_lists,
    open_vectors, parse_engine, vectors_exist,
)
from interbert.serve.model import SearchModel, weights_fingerprint
from interbert.utils.files import atomic_path, atomic_write_json, remove_leftover_temporaries, replace_folder

logger = logging.getLogger(__name__)

MANIFEST, METADATA, THUMBNAILS = "index.json", "meta.sqlite", "thumbnails"
# Exact search costs one dot product per image per query; past this size an approximate index pays off.
FLAT_MAX_IMAGES = 50_000
THUMBNAIL_SIZE = 256
THUMBNAIL_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Images whose embedding is not finite are left out of the index (FAISS would silently lose them). When
# more than this share of a store's images is affected, the model or the store is broken: fail instead.
MAX_NON_FINITE_SHARE = 0.5
NAMED_IN_MANIFEST = 20  # non-finite image ids listed in index.json; the count is always complete

SCHEMA = """
CREATE TABLE IF NOT EXISTS stores (store_id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    row INTEGER PRIMARY KEY,
    image_id TEXT UNIQUE NOT NULL,
    caption TEXT,
    thumbnail TEXT,
    store_id INTEGER NOT NULL REFERENCES stores(store_id),
    embedding BLOB NOT NULL
);
"""


# --------------------------------------------------------------------------------------------------
# Index type
# --------------------------------------------------------------------------------------------------
def choose_index_type(num_images: int, requested: str = "auto") -> str:
    """``flat`` (exact inner product) up to FLAT_MAX_IMAGES images, ``hnsw`` above; or what was asked."""
    if requested not in INDEX_TYPES:
        raise ValueError(f"index type must be one of {INDEX_TYPES}, got {requested!r}")
    if requested != "auto":
        return requested
    return "flat" if num_images <= FLAT_MAX_IMAGES else "hnsw"


def search_params(index: faiss.Index, k: int) -> faiss.SearchParameters | None:
    """Per-query breadth of a FAISS index (kept for callers of the FAISS-only API)."""
    return faiss_search_params(index, k)


# --------------------------------------------------------------------------------------------------
# The index folder
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRecord:
    row: int
    image_id: str
    caption: str | None
    thumbnail: str | None  # path relative to the index folder
    store: str  # feature store the image's regions come from


@dataclass(frozen=True)
class BuildReport:
    added: int
    already_indexed: int
    total: int
    index_type: str
    without_thumbnail: int
    captions_for_unknown_images: int
    non_finite: tuple[str, ...] = ()  # ids left out this run: their embedding holds NaN or inf


def _connect(folder: Path, read_only: bool = False) -> sqlite3.Connection:
    path = folder / METADATA
    if read_only:  # shared by the service's worker threads: Python's sqlite3 is built serialized (threadsafety 3)
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    connection = sqlite3.connect(path)
    connection.executescript(SCHEMA)
    return connection


def _thumbnail_name(image_id: str) -> str:
    # A hash, not the id: ids may hold characters that are unsafe in file names.
    return f"{THUMBNAILS}/{hashlib.sha1(image_id.encode()).hexdigest()[:20]}.jpg"


def find_image_file(folder: Path, image_id: str) -> Path | None:
    """``folder/<image_id>.<suffix>``, or None when there is none.

    Image ids come from the data, and the thumbnail made from this file is served to anyone who can reach
    the service: an id that leads outside ``folder`` ("../x", an absolute path, a link pointing out) is
    refused with a :class:`DataError`, never followed."""
    root = folder.resolve()
    for suffix in THUMBNAIL_SUFFIXES:
        for name in (f"{image_id}{suffix}", f"{image_id}{suffix.upper()}"):
            # Normalised with the suffix on ("a/.." + ".jpg" is the file "...jpg" inside a/); an absolute id
            # makes the join drop root, which the containment check then sees.
            candidate = Path(os.path.normpath(root / name))
            if not candidate.is_relative_to(root):
                raise DataError(f"image id {image_id!r} points outside the thumbnail folder {folder} "
                                f"(to {candidate}); thumbnails are only read from inside it")
            if candidate.is_file():
                target = candidate.resolve()
                if not target.is_relative_to(root):
                    raise DataError(f"image id {image_id!r}: {candidate} is a link to {target}, outside the "
                                    f"thumbnail folder {folder}; thumbnails are only read from inside it")
                return candidate
    return None


# --------------------------------------------------------------------------------------------------
# What an index folder may name: it is data from wherever the folder came from, never trusted with paths
# --------------------------------------------------------------------------------------------------
def recorded_path(folder: Path, recorded: object, what: str) -> Path:
    """A path that the folder's index.json or meta.sqlite records (the model, a feature store, a milvus-lite
    file), as the service may open it.

    Absolute paths are taken as they are: that is what ``index build`` records (where the model and the
    stores were on the machine that built the folder), they are only ever opened as a model or a feature
    store, never served, and ``--model`` overrides the model. A relative path is read against the folder
    (not the working directory) and, symlinks resolved, must stay inside it."""
    where = f"{folder / MANIFEST}" if what != "feature store" else f"{folder / METADATA}"
    if not isinstance(recorded, str) or not recorded or "\0" in recorded:
        raise DataError(f"{where}: the {what} path must be a non-empty string, got {recorded!r}")
    path = Path(recorded)
    if path.is_absolute():
        return path
    root = folder.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise DataError(f"{where}: the {what} path {recorded!r} leads outside the index folder (to {target}); "
                        f"relative paths in an index folder are read inside it")
    return target


def path_to_record(folder: Path, path: Path) -> str:
    """How ``folder`` records ``path`` (the model, a feature store): relative to the folder (POSIX separators)
    when it lies inside it, so that the folder keeps working wherever it is moved or copied with what it
    holds; else the absolute path, as before (read back by :func:`recorded_path`)."""
    target, root = Path(path).resolve(), Path(folder).resolve()
    if target != root and target.is_relative_to(root):
        return target.relative_to(root).as_posix()
    return str(target)


MODEL_COPY, FEATURES_COPIES = "model", "features"


def copy_model_into(out: Path, model_dir: Path) -> tuple[Path, Path | None]:
    """``model_dir`` copied to ``out/model`` (written whole or not at all), unless it already lies inside
    ``out``; a copy left by an earlier run is kept when its weights are the same. Returns (the model inside
    ``out``, what this call created or None)."""
    if model_dir.resolve().is_relative_to(out.resolve()):
        return model_dir, None
    target = out / MODEL_COPY
    if target.exists():
        if weights_fingerprint(target) != weights_fingerprint(model_dir):
            raise UsageError(f"--copy-model: {target} already holds another model (other weights than {model_dir}); "
                             f"remove it or build into another folder")
        return target, None
    replace_folder(target, lambda tmp: shutil.copytree(model_dir, tmp, dirs_exist_ok=True))
    return target, target


def copy_features_into(out: Path, features: Path) -> tuple[Path, Path | None]:
    """The feature store ``features`` (a file or a folder) copied to ``out/features/<its name>`` (``<name>-2``,
    ... when another store holds that name), written whole or not at all, unless it already lies inside
    ``out``; a copy with the same content (sha256) is reused. Returns (the store inside ``out``, what this
    call created or None)."""
    if features.resolve().is_relative_to(out.resolve()):
        return features, None
    copies = out / FEATURES_COPIES
    new_folder = not copies.exists()
    copies.mkdir(parents=True, exist_ok=True)
    remove_leftover_temporaries(copies)
    wanted, number = None, 1
    while True:
        target = copies / (features.name if number == 1 else f"{features.stem}-{number}{features.suffix}")
        if not target.exists():
            break
        wanted = wanted or source_fingerprint(features)["sha256"]
        if source_fingerprint(target)["sha256"] == wanted:
            return target, None
        number += 1
    if features.is_dir():
        replace_folder(target, lambda tmp: shutil.copytree(features, tmp, dirs_exist_ok=True))
    else:
        with atomic_path(target) as tmp:
            shutil.copyfile(features, tmp)
    return target, copies if new_folder else target


def thumbnail_shape_ok(thumbnail: str) -> bool:
    """``thumbnails/<one file name>``, as :func:`_thumbnail_name` writes it: no absolute path, no ``..``,
    no subfolder (a pure string check, no file system access)."""
    prefix = f"{THUMBNAILS}/"
    name = thumbnail[len(prefix):] if isinstance(thumbnail, str) and thumbnail.startswith(prefix) else ""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def write_thumbnail(source: Path, target: Path) -> None:
    from PIL import Image

    with Image.open(source) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, "JPEG", quality=85)


class ImageIndex:
    """A built index folder, opened for search (read-only). Its vectors are searched by the engine its
    manifest records (FAISS by default), or by ``engine`` when given: the same vectors reached another way,
    e.g. the Milvus cluster's address as seen from this machine."""

    def __init__(self, folder: str | Path, engine: str | None = None):
        self.folder = Path(folder)
        if str(folder).startswith("milvus:"):
            raise UsageError(f"{folder} names a Milvus engine, not an index folder: give the folder made by "
                             f"`interbert index build --engine {folder}` (and --engine {folder} to search it there)")
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.folder} is not an index folder: {MANIFEST} is missing (run `interbert index build`)")
        self.manifest: dict = read_manifest(manifest)
        # Everything the folder names is checked before anything is opened: the folder may come from anyone.
        self.engine: Engine = trusted_engine(self.folder, engine, self.manifest.get("engine"))
        if not vectors_exist(self.engine, self.folder) or "index_type" not in self.manifest:
            raise FileNotFoundError(f"{self.folder / FAISS_FILE} is missing: the last build did not finish; run it again")
        if not (self.folder / METADATA).is_file():
            raise FileNotFoundError(f"{self.folder / METADATA} is missing: this index folder is incomplete")
        self._db = _connect(self.folder, read_only=True)
        try:
            self._store_paths = {recorded: recorded_path(self.folder, recorded, "feature store")
                                 for recorded in self.feature_stores()}
            self.thumbnail_root = self._checked_thumbnails()
            self.vectors: VectorIndex = open_vectors(self.engine, self.folder, self.manifest["index_type"],
                                                     int(self.manifest["embedding_dim"]), self.manifest.get("num_images"))
        except sqlite3.DatabaseError as error:  # not SQLite, or not this schema
            self._db.close()
            raise DataError(f"{self.folder / METADATA}: not an index database ({error})") from None
        except BaseException:
            self._db.close()
            raise

    def model_path(self) -> Path:
        """The model the folder was built with, as the service may load it (see :func:`recorded_path`)."""
        return recorded_path(self.folder, self.manifest.get("model"), "model")

    def store_path(self, recorded: str) -> Path:
        """Where the feature store that meta.sqlite records as ``recorded`` is opened (checked at start)."""
        return self._store_paths[recorded]

    def _checked_thumbnails(self) -> Path:
        """The resolved ``thumbnails/`` folder, after checking every row's thumbnail stays inside it.

        Checked at start, so a crafted folder is refused with one line naming the image, and again per
        request in :meth:`thumbnail_file` (a file may change after start). The start check stays cheap for
        big galleries: the shape of every row's path (``thumbnails/<name>``: no absolute path, no ``..``, no
        subfolder) is one SQL scan, and links are found by one listing of the folder (the entry types come
        with it: no stat per file); only links are resolved."""
        root = self.folder.resolve()
        thumbnails = (root / THUMBNAILS).resolve()
        bad = self._db.execute(
            "SELECT row, image_id, thumbnail FROM images WHERE thumbnail IS NOT NULL AND NOT ("
            "  typeof(thumbnail) = 'text' AND thumbnail GLOB ? AND substr(thumbnail, ?) NOT GLOB '*/*'"
            "  AND substr(thumbnail, ?) NOT IN ('.', '..')) ORDER BY row LIMIT 1",
            (f"{THUMBNAILS}/?*", len(THUMBNAILS) + 2, len(THUMBNAILS) + 2),
        ).fetchone()
        if bad is None:  # SQLite's text functions stop at a NUL character; Python's check does not
            bad = next(((r, i, t) for r, i, t in self._db.execute(
                "SELECT row, image_id, thumbnail FROM images WHERE instr(CAST(thumbnail AS BLOB), X'00') > 0")
                if not thumbnail_shape_ok(t)), None)
        if bad is not None:
            row, image_id, thumbnail = bad
            raise DataError(f"{self.folder / METADATA}: row {row} (image {image_id!r}) names the thumbnail "
                            f"{thumbnail!r}, which is not a file of the index's {THUMBNAILS}/ folder; "
                            f"thumbnails are only served from there")
        if not thumbnails.is_relative_to(root) or thumbnails == root:
            if self._db.execute("SELECT 1 FROM images WHERE thumbnail IS NOT NULL LIMIT 1").fetchone():
                raise DataError(f"{self.folder / THUMBNAILS} is a link to {thumbnails}, outside the index folder; "
                                f"thumbnails are only served from inside it")
        if thumbnails.is_dir():
            with os.scandir(thumbnails) as entries:
                for entry in entries:
                    if not entry.is_symlink() or Path(entry.path).resolve().is_relative_to(thumbnails):
                        continue
                    found = self._db.execute("SELECT row, image_id FROM images WHERE thumbnail = ?",
                                             (f"{THUMBNAILS}/{entry.name}",)).fetchone()
                    if found is not None:  # a link no row names is never served
                        raise DataError(
                            f"{self.folder / METADATA}: row {found[0]} (image {found[1]!r}): its thumbnail "
                            f"{THUMBNAILS}/{entry.name} is a link to {Path(entry.path).resolve()}, outside "
                            f"{self.folder / THUMBNAILS}; thumbnails are only served from inside it")
        return thumbnails

    def thumbnail_file(self, record: ImageRecord) -> Path | None:
        """The file to serve as ``record``'s thumbnail, or None when there is none (or it would lead outside
        ``thumbnails/``: a file swapped for a link after start is not followed). The one place a stored
        thumbnail path becomes a file path."""
        if record.thumbnail is None or not thumbnail_shape_ok(record.thumbnail):
            return None
        try:
            target = (self.thumbnail_root / record.thumbnail[len(THUMBNAILS) + 1:]).resolve(strict=True)
        except (OSError, ValueError):  # missing, a link loop, a name the file system refuses
            return None
        if not target.is_relative_to(self.thumbnail_root) or not target.is_file():
            logger.warning("%s: the thumbnail of image %r leads to %s, outside %s; not served",
                           self.folder, record.image_id, target, self.thumbnail_root)
            return None
        return target

    @property
    def faiss(self) -> faiss.Index:
        """The FAISS index (FAISS engine only)."""
        if self.engine.kind != "faiss":
            raise AttributeError(f"{self.folder} is searched by {self.engine.uri}, not FAISS")
        return self.vectors.faiss

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def index_type(self) -> str:
        return self.manifest["index_type"]

    def feature_stores(self) -> list[str]:
        """Paths of the feature stores the indexed images' regions come from (for re-ranking)."""
        return [r[0] for r in self._db.execute("SELECT path FROM stores ORDER BY store_id")]

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each queries x k; rows are -1 where the index had fewer than k images."""
        k = min(k, len(self))
        if k == 0:
            empty = np.zeros((len(query_vectors), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        return self.vectors.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)

    def records(self, rows: Iterable[int]) -> list[ImageRecord]:
        """Metadata of ``rows``, in the given order."""
        rows = [int(r) for r in rows]
        if not rows:
            return []
        marks = ",".join("?" * len(rows))
        found = {
            r[0]: ImageRecord(*r)
            for r in self._db.execute(
                f"SELECT i.row, i.image_id, i.caption, i.thumbnail, s.path FROM images i JOIN stores s USING (store_id) "
                f"WHERE i.row IN ({marks})",
                rows,
            )
        }
        return [found[r] for r in rows]

    def record(self, image_id: str) -> ImageRecord | None:
        row = self._db.execute(
            "SELECT i.row, i.image_id, i.caption, i.thumbnail, s.path FROM images i JOIN stores s USING (store_id) "
            "WHERE i.image_id = ?",
            (image_id,),
        ).fetchone()
        return None if row is None else ImageRecord(*row)

    def close(self) -> None:
        self.vectors.close()
        self._db.close()


# --------------------------------------------------------------------------------------------------
# Building and appending
# --------------------------------------------------------------------------------------------------
def _new_manifest(model_dir: Path, search_model: SearchModel, max_regions: int, out: Path) -> dict:
    return {
        "format": 1,
        "model": path_to_record(out, model_dir),
        "model_architecture": search_model.architecture,
        "weights_sha256": weights_fingerprint(model_dir),
        "model_config": search_model.config.to_dict(),
        "embedding_dim": search_model.embedding_dim,
        "max_regions": max_regions,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _check_same_model(manifest: dict, model_dir: Path, folder: Path) -> None:
    if weights_fingerprint(model_dir) != manifest["weights_sha256"]:
        raise ValueError(
            f"{folder} was built with the model at {manifest['model']} (weights sha256 "
            f"{manifest['weights_sha256'][:12]}...); {model_dir} holds different weights. Embeddings of two models "
            f"cannot share an index: build a new one in another folder."
        )


def build_index(
    model_dir: str | Path,
    features: str | Path,
    out: str | Path,
    captions: str | Path | None = None,
    thumbnails: str | Path | None = None,
    split: str | None = None,
    index_type: str = "auto",
    batch_size: int = 64,
    max_regions: int = DEFAULT_MAX_REGIONS,
    append: bool = False,
    search_model: SearchModel | None = None,
    progress: bool = True,
    engine: str | None = None,
    device: str = "cpu",
    copy_model: bool = False,
    copy_features: bool = False,
) -> BuildReport:
    """Embed every image of the feature store ``features`` into the index folder ``out``.

    A new folder is created; an existing one built with the same model is continued (the ids it holds
    are skipped), which is both the restart of an interrupted build and ``index add`` (``append=True``
    requires the folder to exist). ``split`` keeps only the images that ``captions`` puts in that split.
    Then the engine's index (FAISS by default) is rebuilt over all stored embeddings. ``engine``
    (see :mod:`interbert.serve.engines`) is recorded in the folder; a later run keeps the recorded one
    unless given another, which moves the vectors there. ``device``: where the model embeds.
    ``copy_model`` / ``copy_features`` copy the model folder / the feature store into ``out`` (recorded by
    relative paths): the folder can then be moved or copied to another machine and served there.

    Long because its checks must all run before the folder is touched (a refused build leaves it as it was)
    and its clean-up must undo exactly what it created; splitting it is the next change here.
    """
    if split is not None and captions is None:
        raise ValueError(f"choosing the images of split {split!r} needs the captions file that names the splits")
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index type must be one of {INDEX_TYPES}, got {index_type!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    model_dir, out, features = Path(model_dir), Path(out), Path(features)
    manifest_path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not an index folder: give a folder (new or made by index build)")
    if append and not manifest_path.is_file():
        raise FileNotFoundError(f"{out} is not an index folder ({MANIFEST} is missing): build it first")
    # A bad engine URI, a missing pymilvus or an unreachable server fails now, not after the embedding.
    chosen_engine = trusted_engine(out, engine, _recorded_engine(manifest_path))
    check_engine(chosen_engine)

    # Everything that can be checked is checked before the folder is touched: a refused build leaves it as
    # it was (or not there at all).
    search_model = search_model or SearchModel(model_dir, device=device, need_tokenizer=False)
    manifest = read_manifest(manifest_path) if manifest_path.is_file() else None
    if manifest is not None:
        _check_same_model(manifest, model_dir, out)
        if max_regions != manifest["max_regions"]:  # one index, one region cap: embeddings must be comparable
            logger.warning("%s was built with max_regions=%d; using that, not %d", out, manifest["max_regions"], max_regions)
        max_regions = manifest["max_regions"]
    store = open_features(features)
    if store.feature_dim != search_model.config.region_feature_size:
        raise ValueError(f"feature store {features} holds {store.feature_dim}-d region features, but the model "
                         f"takes {search_model.config.region_feature_size}-d (config.region_feature_size)")
    if not store.ids():
        raise DataError(f"{features}: no image could be read from this feature store; nothing was indexed")
    caption_of = first_captions(captions, split) if captions else {}
    thumbnail_dir = Path(thumbnails) if thumbnails else None
    if thumbnail_dir is not None and not thumbnail_dir.is_dir():
        raise FileNotFoundError(f"thumbnail folder {thumbnail_dir} does not exist")

    # What this run creates, removed again if it fails before its first image is committed.
    ancestor = _missing_ancestor(out)
    created_here = [ancestor] if ancestor else [out / name for name in (MANIFEST, METADATA, THUMBNAILS)
                                                if not (out / name).exists()]
    remove_leftover_temporaries(out)  # of a writer killed in an earlier run (index.json, index.faiss)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model_dir, features, copied = _bring_inside(out, model_dir, features, copy_model, copy_features)
    except BaseException:
        _remove(created_here)
        raise
    created_here += [path for path in copied if ancestor is None]
    if manifest is None:
        manifest = _new_manifest(model_dir, search_model, max_regions, out)
        atomic_write_json(manifest_path, manifest, indent=2)
    elif copy_model:  # a folder begun without the copy names the copy from this run's manifest write on
        manifest["model"] = path_to_record(out, model_dir)

    committed = []  # ids of the batches committed by this run
    db = _connect(out)
    try:
        store_path = path_to_record(out, features)
        done = {r[0] for r in db.execute("SELECT image_id FROM images")}
        image_ids = [i for i in store.ids() if split is None or i in caption_of]
        todo = [i for i in image_ids if i not in done]
        if done and len(todo) < len(image_ids):
            logger.info("%s: %d of %d images of %s are already indexed; embedding the other %d",
                        out, len(image_ids) - len(todo), len(image_ids), features, len(todo))
        # Every id is looked up before any is embedded: an id that leads out of the folder stops the build
        # before it has done any work.
        sources = {i: find_image_file(thumbnail_dir, i) for i in todo} if thumbnail_dir else {}
        without_thumbnail, non_finite = 0, []
        batches = range(0, len(todo), batch_size)
        for start in tqdm(batches, desc=f"embedding {features.name}", unit="batch", disable=not progress):
            ids = todo[start : start + batch_size]
            missing, bad = _index_batch(db, out, search_model, store, ids, store_path, caption_of, sources, max_regions)
            if len(bad) < len(ids):
                committed.append(start)
            without_thumbnail += missing
            non_finite += bad
        added = len(todo) - len(non_finite)
        if non_finite:
            _refuse_mostly_non_finite(non_finite, len(image_ids), features, model_dir)
            logger.warning("%s: %d images not indexed, their embeddings hold NaN or inf (NaN/inf in their region "
                           "features, or a broken model): %s", features, len(non_finite), _some(non_finite))
        unknown_captions = sum(1 for i in caption_of if i not in store)
        if unknown_captions:
            logger.warning("%s: %d captioned image ids are not in the feature store %s", captions, unknown_captions, features)
        if thumbnail_dir is not None and without_thumbnail:
            logger.warning("%d images have no thumbnail in %s", without_thumbnail, thumbnail_dir)

        # `index add` keeps the folder's choice unless told otherwise; `auto` re-decides on the new size.
        requested = manifest.get("requested_index_type", "auto") if append and index_type == "auto" else index_type
        total = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        up_to_date = (not added and vectors_exist(chosen_engine, out) and manifest.get("num_images") == total
                      and manifest.get("index_type") == choose_index_type(total, requested)
                      and manifest.get("engine", "faiss") == chosen_engine.uri)
        chosen = manifest["index_type"] if up_to_date else _rebuild_vectors(db, out, requested, chosen_engine)
        recorded_stores = {r[0] for r in db.execute("SELECT path FROM stores")}
    except BaseException:
        db.close()
        if not committed:  # nothing of this run is worth keeping: the folder goes back to how it was
            _remove(created_here)
        raise
    db.close()
    manifest.update(engine=chosen_engine.uri, index_type=chosen, requested_index_type=requested, num_images=total,
                    updated=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    # Listed as meta.sqlite records it: a store none of whose images is in the index is not one of its stores.
    manifest["feature_stores"] = sorted((set(manifest.get("feature_stores", [])) | {store_path}) & recorded_stores)
    # Per store, as of its latest run: the ids are never stored, so every run over the store meets them again.
    left_out = manifest.pop("not_indexed_non_finite", {})
    left_out.pop(store_path, None)
    if non_finite:
        left_out[store_path] = {"count": len(non_finite), "image_ids": non_finite[:NAMED_IN_MANIFEST]}
    if left_out:
        manifest["not_indexed_non_finite"] = left_out
    atomic_write_json(manifest_path, manifest, indent=2)
    return BuildReport(added, len(image_ids) - len(todo), total, chosen, without_thumbnail, unknown_captions,
                       tuple(non_finite))


def _remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def _bring_inside(out: Path, model_dir: Path, features: Path, copy_model: bool,
                  copy_features: bool) -> tuple[Path, Path, list[Path]]:
    """The model and the feature store as the build records them: copied into ``out`` when asked (see
    :func:`copy_model_into`, :func:`copy_features_into`), else where they are. Also returns what it created;
    if the second copy fails, the first one made here is removed again."""
    copied: list[Path] = []
    try:
        if copy_model:
            model_dir, created = copy_model_into(out, model_dir)
            copied += [created] if created else []
        if copy_features:
            features, created = copy_features_into(out, features)
            copied += [created] if created else []
    except BaseException:
        _remove(copied)
        raise
    return model_dir, features, copied


def _some(image_ids: list[str], named: int = 5) -> str:
    shown = ", ".join(repr(i) for i in image_ids[:named])
    return shown + (f" and {len(image_ids) - named} more" if len(image_ids) > named else "")


def _refuse_mostly_non_finite(non_finite: list[str], considered: int, features: Path, model_dir: Path) -> None:
    if len(non_finite) > MAX_NON_FINITE_SHARE * considered:
        raise DataError(
            f"{features}: {len(non_finite)} of {considered} images have embeddings with NaN or inf "
            f"({_some(non_finite)}); an index missing that many images is not built. Check the store's region "
            f"features for NaN/inf, and the model {model_dir}."
        )


def _index_batch(
    db: sqlite3.Connection,
    out: Path,
    search_model: SearchModel,
    store: FeatureStore,
    ids: list[str],
    store_path: str,
    caption_of: dict[str, str],
    sources: dict[str, Path | None],
    max_regions: int,
) -> tuple[int, list[str]]:
    """Embed one batch and commit it with its metadata in one transaction; the feature store is recorded in
    the transaction of its first image (a store none of whose images is indexed is never recorded, so no
    later start depends on it). Returns the number of images without a thumbnail (of those with a thumbnail
    folder, ``sources``) and the ids left out because their embedding is not finite."""
    vectors = search_model.embed_images(region_batch([(store, i) for i in ids], max_regions)).astype(np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    missing = 0
    rows = []
    new_files: list[Path] = []  # thumbnails this batch added: removed again if its commit does not happen
    try:
        for image_id, vector, ok in zip(ids, vectors, finite):
            if not ok:
                continue
            thumbnail = None
            source = sources.get(image_id)
            # Not an atomic write: the thumbnail exists before its row is committed, so a torn file is never
            # referenced, and the next run rewrites it (its id is still to do).
            if source is not None:
                thumbnail = _thumbnail_name(image_id)
                if not (out / thumbnail).exists():
                    new_files.append(out / thumbnail)
                write_thumbnail(source, out / thumbnail)
            elif image_id in sources:
                missing += 1
            rows.append((image_id, caption_of.get(image_id), thumbnail, vector.tobytes()))
        if rows:
            with db:  # one transaction: the batch is either fully indexed (its store with it) or not at all
                db.execute("INSERT OR IGNORE INTO stores (path) VALUES (?)", (store_path,))
                store_id = db.execute("SELECT store_id FROM stores WHERE path = ?", (store_path,)).fetchone()[0]
                db.executemany("INSERT INTO images (image_id, caption, thumbnail, store_id, embedding) "
                               "VALUES (?, ?, ?, ?, ?)", [(i, c, t, store_id, e) for i, c, t, e in rows])
    except BaseException:
        for path in new_files:
            path.unlink(missing_ok=True)
        raise
    return missing, [i for i, ok in zip(ids, finite) if not ok]


def read_manifest(path: Path) -> dict:
    """index.json, with the keys search relies on checked (a crafted or damaged file is one error line)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not an index manifest ({error})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: not an index manifest (a JSON object)")
    expected = {"model": str, "weights_sha256": str, "embedding_dim": int, "max_regions": int,
                "index_type": str, "engine": str, "num_images": int}
    for key, kind in expected.items():
        if key in manifest and (not isinstance(manifest[key], kind) or isinstance(manifest[key], bool)):
            raise DataError(f"{path}: {key} must be {'a string' if kind is str else 'an integer'}, got {manifest[key]!r}")
    if manifest.get("index_type", "flat") not in INDEX_TYPES or manifest.get("index_type") == "auto":
        raise DataError(f"{path}: index_type must be flat, hnsw or ivf, got {manifest['index_type']!r}")
    # What the first write of a build records (index_type and num_images come when it finishes).
    missing = [key for key in ("model", "weights_sha256", "embedding_dim", "max_regions") if key not in manifest]
    if missing:
        raise DataError(f"{path}: not an index manifest (it lacks {', '.join(missing)})")
    return manifest


TRUSTED_MILVUS_ENV = "INTERBERT_MILVUS_SERVERS"


def trusted_milvus_servers() -> set[str]:
    """Milvus servers the operator named in the environment (comma-separated ``milvus://HOST:PORT/COLLECTION``):
    folders recording one of these are searched there without ``--engine`` (``serve --arm`` takes no
    ``--engine``: each arm's folder says where its vectors are)."""
    return {uri.strip() for uri in os.environ.get(TRUSTED_MILVUS_ENV, "").split(",") if uri.strip()}


def trusted_engine(folder: Path, given: str | None, recorded: str | None) -> Engine:
    """The engine that searches ``folder``'s vectors: ``given`` (``--engine``: the command line decides), else
    the one the folder records, if it keeps the vectors on this machine or is a server the environment
    names (:func:`trusted_milvus_servers`).

    A folder never decides alone that the service connects to a server: a copied folder naming
    ``milvus://ANY-HOST`` would send it every query and ``$MILVUS_TOKEN``. A milvus-lite file it names is
    read as :func:`recorded_path` says, and must exist (opening one would create it)."""
    if given:
        return parse_engine(given, folder)
    if recorded is None or recorded in ("faiss", "milvus"):
        return parse_engine(recorded, folder)
    if recorded.startswith("milvus://"):
        chosen = parse_engine(recorded, folder)  # a malformed URI is named as such
        if recorded in trusted_milvus_servers():
            return chosen
        raise UsageError(f"{folder / MANIFEST} names the Milvus server {recorded}; an index folder alone never "
                         f"decides which server gets the queries (and $MILVUS_TOKEN): pass --engine {recorded} "
                         f"explicitly (or list it in ${TRUSTED_MILVUS_ENV}, e.g. for serve --arm)")
    if recorded.startswith("milvus:"):
        path = recorded_path(folder, recorded[len("milvus:"):], "milvus-lite file")
        if not path.exists():  # milvus-lite 3 keeps its database as a folder, earlier ones as a file
            raise DataError(f"{folder / MANIFEST}: the milvus-lite database {path} it names does not exist")
        return parse_engine(f"milvus:{path}", folder)
    return parse_engine(recorded, folder)  # unknown: parse_engine says what is accepted


def _recorded_engine(manifest_path: Path) -> str | None:
    return read_manifest(manifest_path).get("engine") if manifest_path.is_file() else None


def _rebuild_vectors(db: sqlite3.Connection, out: Path, requested: str, engine: Engine) -> str:
    total = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    rows = np.empty(total, dtype=np.int64)
    vectors = None
    for i, (row, blob) in enumerate(db.execute("SELECT row, embedding FROM images ORDER BY row")):
        vector = np.frombuffer(blob, dtype=np.float32)
        if vectors is None:
            vectors = np.empty((total, len(vector)), dtype=np.float32)
        rows[i], vectors[i] = row, vector
    if vectors is None:
        raise ValueError(f"{out}: no images to index (the feature store was empty)")
    chosen = choose_index_type(total, requested)
    build_vectors(engine, out, vectors, rows, chosen)
    return chosen


def _missing_ancestor(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what ``mkdir(parents=True)`` would create)."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return missing
