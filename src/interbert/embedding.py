"""Text and image embeddings written to a folder, for FAISS (or any vector store) users: ``interbert embed``.

    OUT/embed.json                  what made it: the model's weights sha256, every input's sha256, the settings
    OUT/texts.npy, texts.ids.json   N x E float32 and the N ids, row for row (or texts.parquet: id, embedding)
    OUT/images.npy, images.ids.json the same for the images
    OUT/chunks/                     the work in progress, ``chunk_size`` rows a file; gone once the run is complete

The vectors are the model's ``get_text_features`` / ``get_image_features`` over the batches that
:class:`~interbert.processing.InterBertProcessor` makes: the embeddings ``interbert index build`` stores and
the search service queries with (L2-normalised: inner product is cosine).

A run is resumable. Each chunk is written atomically (:mod:`interbert.utils.files`) as soon as it is
embedded, so a run that stops (a kill, a full disk, Ctrl-C) keeps every finished chunk and the next run
embeds only the others. It must be the same work: ``embed.json`` records the sha256 of the weights and of
every input, and a folder begun with another model or other inputs is refused in one line (vectors of two
models in one file would be silently wrong). The batch size is not part of the work: a run that ran out of
memory is resumed with a smaller one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from interbert.data.captions import READERS, blank_captions, blank_captions_message, read_captions
from interbert.data.errors import DataFormatError
from interbert.data.features import FeatureStore, open_features, source_fingerprint
from interbert.data.text_files import text_lines
from interbert.errors import DataError, UsageError, shown
from interbert.loading import load_model, weights_fingerprint
from interbert.processing import InterBertProcessor
from interbert.utils.files import atomic_path, atomic_write, atomic_write_json, file_sha256, remove_leftover_temporaries

logger = logging.getLogger(__name__)

MANIFEST, CHUNKS = "embed.json", "chunks"
OUTPUT_FORMATS = ("npy", "parquet")
TEXT_FORMATS = ("auto", "lines", *READERS)
KINDS = ("texts", "images")
DEFAULT_BATCH_SIZE = 64
# Rows per resumable unit: a kill loses at most this much work, and each chunk is one file (a million
# captions make ~250 files, not a million).
DEFAULT_CHUNK_SIZE = 4096


@dataclass(frozen=True)
class EmbedReport:
    """What a run left in ``out``: rows per kind, the files written, and how much work this run did."""

    out: Path
    counts: dict[str, int]
    embedding_dim: int
    files: tuple[Path, ...]
    chunks_embedded: int
    chunks_reused: int
    non_finite: dict[str, list[str]] = field(default_factory=dict)  # ids whose vector holds NaN or inf, per kind


@dataclass
class _Inputs:
    """The rows to embed, per kind, and what identifies them (the work ``embed.json`` records)."""

    ids: dict[str, list[str]] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    store: FeatureStore | None = None
    work: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def looks_like_caption_file(path: Path) -> bool:
    """Whether ``texts`` is one of the caption layouts (JSON, JSON lines, a Flickr8k token file) rather than
    plain text, one text a line: decided on the first line, as :func:`~interbert.data.captions.sniff_caption_format`
    does."""
    if path.suffix in (".json", ".jsonl"):
        return True
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff").lstrip()
    first = head.splitlines()[0] if head else ""
    return first.startswith(("{", "[")) or ("\t" in first and "#" in first.split("\t")[0])


def read_texts(path: str | Path, text_format: str = "auto", split: str | None = None) -> tuple[list[str], list[str]]:
    """``(ids, texts)`` of a texts file: plain text (one text a line; the id is the line number) or any caption
    layout :func:`~interbert.data.read_captions` reads (the id is the caption id). A blank text, a caption id
    given twice, an empty file or an empty split is a :class:`DataError` naming the file."""
    path = Path(path)
    if text_format not in TEXT_FORMATS:
        raise UsageError(f"unknown text format {text_format!r}; choose one of {', '.join(TEXT_FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such texts file")
    if text_format == "lines" or (text_format == "auto" and not looks_like_caption_file(path)):
        if split is not None:
            raise UsageError(f"--split {split} chooses captions of a caption file; {path} is plain text, one text a line")
        lines = list(text_lines(path))
        blank = [n for n, text in lines if not text.strip()]
        if blank:
            listed = ", ".join(map(str, blank[:5])) + (", ..." if len(blank) > 5 else "")
            raise DataFormatError(path, f"{len(blank)} blank line(s) (a text per line; nothing to embed): lines {listed}")
        if not lines:
            raise DataFormatError(path, "empty file: no texts")
        return [str(n) for n, _ in lines], [text for _, text in lines]
    captions = read_captions(path, "auto" if text_format == "auto" else text_format)
    if split is not None:
        captions = [c for c in captions if c.split == split]
        if not captions:
            raise DataFormatError(path, f"no caption of split {split!r}")
    blank = blank_captions(captions)
    if blank:
        raise DataError(blank_captions_message(path, blank))
    ids = [c.caption_id for c in captions]
    _refuse_repeated(ids, path, "caption id")
    return ids, [c.text for c in captions]


def read_image_ids(path: str | Path, store: FeatureStore) -> list[str]:
    """The image ids of ``path`` (one a line), each checked against ``store``: an unknown id names its line."""
    path = Path(path)
    ids = []
    for line, text in text_lines(path):
        image_id = text.strip()
        if not image_id:
            raise DataFormatError(path, "blank line: an image id a line", line)
        if image_id not in store:
            raise DataFormatError(path, f"image id {image_id!r} is not in the feature store {store.path}", line)
        ids.append(image_id)
    if not ids:
        raise DataFormatError(path, "empty file: no image ids")
    _refuse_repeated(ids, path, "image id")
    return ids


def _refuse_repeated(ids: Sequence[str], path: Path, what: str) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise DataFormatError(path, f"{what} {i!r} is given twice: each row of the output needs its own id")
        seen.add(i)


def _gather_inputs(texts, text_format, split, features, image_ids, trust_pickle, max_regions, chunk_size) -> _Inputs:
    """Read and check every input, and hash it, before anything is embedded or written."""
    inputs = _Inputs(work={"chunk_size": chunk_size})
    if texts is not None:
        inputs.ids["texts"], inputs.texts = read_texts(texts, text_format, split)
        inputs.work["texts"] = {"sha256": file_sha256(texts), "format": text_format, "split": split}
        inputs.paths["texts"] = str(Path(texts).resolve())
    if features is not None:
        inputs.store = open_features(features, trust_pickle=trust_pickle)
        ids = read_image_ids(image_ids, inputs.store) if image_ids is not None else inputs.store.ids()
        if not ids:
            raise DataError(f"{features}: no image could be read from this feature store; nothing to embed")
        inputs.ids["images"] = ids
        inputs.work["images"] = {"sha256": source_fingerprint(features)["sha256"], "max_regions": max_regions,
                                 "image_ids_sha256": file_sha256(image_ids) if image_ids is not None else None}
        inputs.paths["features"] = str(Path(features).resolve())
    return inputs


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
def load_embedder(model_dir: str | Path, device: str = "cpu", max_regions: int | None = None):
    """``(model, processor)`` of a saved folder, in eval mode on ``device``; ``max_regions`` replaces the
    processor's (the regions per image an index of this model was built with)."""
    model_dir = Path(model_dir)
    model = load_model(model_dir).to(device).eval()  # names a folder that is missing or not InterBERT's
    if not (model_dir / "vocab.txt").is_file() and not (model_dir / "tokenizer.json").is_file():
        raise UsageError(f"{model_dir} has no tokenizer (vocab.txt or tokenizer.json): save one with the model")
    processor = InterBertProcessor.from_pretrained(model_dir)
    if max_regions is not None:
        if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 1:
            raise UsageError(f"max_regions must be a whole number >= 1 (the global region counts), not {shown(max_regions)}")
        processor.max_regions = max_regions
    return model, processor


@torch.inference_mode()
def embed_batches(model, processor: InterBertProcessor, kind: str, rows: Sequence, batch_size: int,
                  device: str = "cpu") -> Iterator[np.ndarray]:
    """The float32 embeddings of ``rows`` (texts, or :class:`~interbert.data.Regions`), ``batch_size`` at a time."""
    for start in range(0, len(rows), batch_size):
        batch = list(rows[start : start + batch_size])
        if kind == "texts":
            inputs = processor(text=batch).to(device)
            vectors = model.get_text_features(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
        else:
            inputs = processor(regions=batch).to(device)
            vectors = model.get_image_features(inputs["region_features"], inputs["region_boxes"], inputs["region_mask"])
        yield vectors.float().cpu().numpy()


# --------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------
def _check_same_work(out: Path, recorded: dict, work: dict) -> None:
    """Refuse to resume ``out`` with other work than it was begun with, naming what differs."""
    if recorded.get("work") == work:
        return
    before = recorded.get("work") or {}
    if before.get("weights_sha256") != work["weights_sha256"]:
        what = (f"another model (weights sha256 {str(before.get('weights_sha256'))[:12]}..., at {recorded.get('model')}), "
                f"not this one ({work['weights_sha256'][:12]}...)")
    elif before.get("output_format") != work["output_format"]:
        what = f"--format {before.get('output_format')}, not {work['output_format']}"
    elif before.get("chunk_size") != work["chunk_size"]:
        what = f"--chunk-size {before.get('chunk_size')}, not {work['chunk_size']}"
    else:
        what = "other inputs: " + "; ".join(_difference(kind, before.get(kind), work.get(kind))
                                            for kind in KINDS if before.get(kind) != work.get(kind))
    raise UsageError(f"{out} holds embeddings made with {what}; embed into a new folder (or remove {out})")


def _difference(kind: str, before: dict | None, now: dict | None) -> str:
    """``texts: sha256 d5823ac14892... then, 09834d488008... now`` (only the keys that differ)."""
    if before is None or now is None:
        return f"{kind}: {'none' if before is None else 'some'} then, {'none' if now is None else 'some'} now"
    short = lambda key, value: f"{value[:12]}..." if key.endswith("sha256") and isinstance(value, str) else value  # noqa: E731
    return f"{kind}: " + ", ".join(f"{key} {short(key, before.get(key))} then, {short(key, value)} now"
                                   for key, value in now.items() if before.get(key) != value)


def _chunk_file(out: Path, kind: str, number: int) -> Path:
    return out / CHUNKS / f"{kind}-{number:06d}.npy"


def _finished_chunk(path: Path, rows: int, dim: int | None) -> np.ndarray | None:
    """The chunk's vectors when the file holds all its rows; None when it is still to do. A file that cannot
    be read is done again (it was written atomically, so only a damaged disk or a hand edit makes one)."""
    if not path.is_file():
        return None
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        logger.warning("%s: unreadable (%s); embedding its rows again", path, error)
        return None
    if vectors.dtype != np.float32 or vectors.ndim != 2 or len(vectors) != rows or (dim is not None and vectors.shape[1] != dim):
        logger.warning("%s: holds %s %s, not %d rows; embedding them again", path, vectors.shape, vectors.dtype, rows)
        return None
    return vectors


def _embed_chunks(out: Path, model, processor, inputs: _Inputs, batch_size: int, chunk_size: int, device: str,
                  progress: bool) -> tuple[int, int, int]:
    """Embed every chunk not on disk yet; returns (chunks embedded, chunks reused, embedding dim)."""
    embedded = reused = 0
    dim = None
    total = sum(len(ids) for ids in inputs.ids.values())
    with tqdm(total=total, desc=f"embedding -> {out}", unit="row", disable=not progress) as bar:
        for kind, ids in inputs.ids.items():
            for number, start in enumerate(range(0, len(ids), chunk_size)):
                path, count = _chunk_file(out, kind, number), min(chunk_size, len(ids) - start)
                vectors = _finished_chunk(path, count, dim)
                if vectors is None:
                    rows = (inputs.texts[start : start + count] if kind == "texts"
                            else [inputs.store[i] for i in ids[start : start + count]])
                    vectors = np.concatenate(list(embed_batches(model, processor, kind, rows, batch_size, device)))
                    atomic_write(path, lambda handle, v=vectors: np.save(handle, v, allow_pickle=False))
                    embedded += 1
                else:
                    reused += 1
                dim = vectors.shape[1]
                bar.update(count)
    return embedded, reused, dim


def output_files(out: Path, kind: str, output_format: str) -> tuple[Path, ...]:
    """The files a finished run holds for ``kind``."""
    if output_format == "parquet":
        return (out / f"{kind}.parquet",)
    return out / f"{kind}.npy", out / f"{kind}.ids.json"


def _assemble(out: Path, kind: str, ids: list[str], dim: int, chunk_size: int, output_format: str) -> list[str]:
    """Join ``kind``'s chunks into its output files (each written atomically, chunk by chunk: never all
    vectors in memory at once); returns the ids whose vector is not finite."""
    chunks = [(ids[start : start + chunk_size], np.load(_chunk_file(out, kind, n), mmap_mode="r"))
              for n, start in enumerate(range(0, len(ids), chunk_size))]
    non_finite = [i for chunk_ids, vectors in chunks for i, ok in zip(chunk_ids, np.isfinite(vectors).all(1)) if not ok]
    if output_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
        with atomic_path(out / f"{kind}.parquet") as tmp, pq.ParquetWriter(tmp, schema) as writer:
            for chunk_ids, vectors in chunks:
                embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
                writer.write_table(pa.Table.from_arrays([pa.array(chunk_ids, pa.string()), embedding], schema=schema))
        return non_finite
    with atomic_path(out / f"{kind}.npy") as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(ids), dim))
        for n, (_, vectors) in enumerate(chunks):
            array[n * chunk_size : n * chunk_size + len(vectors)] = vectors
        array.flush()
        del array
    atomic_write_json(out / f"{kind}.ids.json", ids, indent=None)
    return non_finite


def read_embeddings(out: str | Path, kind: str = "texts") -> tuple[list[str], np.ndarray]:
    """``(ids, vectors)`` of a finished ``interbert embed`` folder (``kind``: texts or images); row i of the
    N x E float32 vectors is the embedding of ``ids[i]``. Ready for ``faiss.IndexFlatIP(E).add(vectors)``."""
    out = Path(out)
    manifest = _read_manifest(out / MANIFEST)
    if manifest is None or not manifest.get("complete"):
        raise DataError(f"{out}: not a finished `interbert embed` folder ({MANIFEST} missing or the run not complete)")
    if kind not in manifest.get("counts", {}):
        raise UsageError(f"{out} holds no {kind} (it holds {', '.join(manifest.get('counts', {})) or 'nothing'})")
    if manifest["work"]["output_format"] == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(out / f"{kind}.parquet")
        vectors = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
        return table.column("id").to_pylist(), vectors.reshape(len(table), -1)
    from interbert.data.text_files import load_json

    return load_json(out / f"{kind}.ids.json"), np.load(out / f"{kind}.npy")


def _read_manifest(path: Path) -> dict | None:
    from interbert.data.text_files import load_json

    if not path.is_file():
        return None
    manifest = load_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("work"), dict):
        raise DataError(f"{path}: not an `interbert embed` record (a JSON object with its work)")
    return manifest


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------
def embed(model_dir: str | Path, out: str | Path, texts: str | Path | None = None, features: str | Path | None = None,
          *, text_format: str = "auto", split: str | None = None, image_ids: str | Path | None = None,
          trust_pickle: bool = False, output_format: str = "npy", batch_size: int = DEFAULT_BATCH_SIZE,
          chunk_size: int = DEFAULT_CHUNK_SIZE, max_regions: int | None = None, device: str = "cpu",
          progress: bool = True) -> EmbedReport:
    """Embed ``texts`` (a texts or captions file) and/or the images of the feature store ``features`` (all of
    them, or those ``image_ids`` lists) with the model in ``model_dir``, into the folder ``out``.

    Resumes a run begun in ``out`` with the same model and inputs (and refuses other ones); a finished
    folder is left as it is. ``max_regions``: regions per image, the global one included (default: the
    model folder's processor's; give the ``max_regions`` of the index the vectors must match)."""
    out = Path(out)
    _check_settings(texts, features, output_format, batch_size, chunk_size, out)
    if output_format == "parquet":
        _require_pyarrow()
    model, processor = load_embedder(model_dir, device, max_regions)
    inputs = _gather_inputs(texts, text_format, split, features, image_ids, trust_pickle, processor.max_regions, chunk_size)
    inputs.work.update(weights_sha256=weights_fingerprint(model_dir), output_format=output_format)
    recorded = _read_manifest(out / MANIFEST)
    if recorded is not None:
        _check_same_work(out, recorded, inputs.work)
        if recorded.get("complete") and all(p.is_file() for k in inputs.ids for p in output_files(out, k, output_format)):
            files = tuple(p for k in inputs.ids for p in output_files(out, k, output_format))
            return EmbedReport(out, recorded["counts"], recorded["embedding_dim"], files, 0, 0, recorded.get("non_finite", {}))
    if features is not None and inputs.store.feature_dim != model.config.region_feature_size:
        raise UsageError(f"feature store {features} holds {inputs.store.feature_dim}-d region features, but the model "
                         f"{model_dir} takes {model.config.region_feature_size}-d (config.region_feature_size)")
    (out / CHUNKS).mkdir(parents=True, exist_ok=True)
    remove_leftover_temporaries(out / CHUNKS)  # of a writer killed in an earlier run
    remove_leftover_temporaries(out)
    manifest = {"model": str(Path(model_dir).resolve()), **inputs.paths, "work": inputs.work,
                "counts": {kind: len(ids) for kind, ids in inputs.ids.items()}, "complete": False}
    atomic_write_json(out / MANIFEST, manifest, indent=2)
    embedded, reused, dim = _embed_chunks(out, model, processor, inputs, batch_size, chunk_size, device, progress)
    non_finite = {kind: bad for kind, ids in inputs.ids.items()
                  if (bad := _assemble(out, kind, ids, dim, chunk_size, output_format))}
    for kind, bad in non_finite.items():
        logger.warning("%s: %d %s have an embedding with NaN or inf (%s); vector search cannot rank them",
                       out, len(bad), kind, ", ".join(map(repr, bad[:5])) + (", ..." if len(bad) > 5 else ""))
    manifest.update(complete=True, embedding_dim=dim, non_finite={k: v[:20] for k, v in non_finite.items()})
    atomic_write_json(out / MANIFEST, manifest, indent=2)
    _remove_chunks(out)
    files = tuple(p for kind in inputs.ids for p in output_files(out, kind, output_format))
    return EmbedReport(out, manifest["counts"], dim, files, embedded, reused, non_finite)


def _check_settings(texts, features, output_format: str, batch_size: int, chunk_size: int, out: Path) -> None:
    if texts is None and features is None:
        raise UsageError("nothing to embed: give texts (--texts FILE), images (--features STORE), or both")
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    for name, value in (("batch size", batch_size), ("chunk size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a whole number >= 1, not {shown(value)}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: give a folder (new, or one an earlier run began)")


def _require_pyarrow() -> None:
    """Parquet needs pyarrow (the ``parquet`` extra): missing, the run stops before any work, in one line."""
    from interbert.extras import extra_for_missing_module

    try:
        import pyarrow.parquet  # noqa: F401
    except ModuleNotFoundError as error:
        raise extra_for_missing_module(error, needed_by="interbert embed --format parquet") or error from None


def _remove_chunks(out: Path) -> None:
    """The chunks are in the output files now; their folder goes (a missing one is not an error)."""
    import shutil

    shutil.rmtree(out / CHUNKS, ignore_errors=True)


__all__ = ["EmbedReport", "embed", "embed_batches", "load_embedder", "read_embeddings", "read_texts", "read_image_ids"]
