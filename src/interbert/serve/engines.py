"""Where an index folder's vectors are searched: one small interface, two engines.

    faiss                          (default) ``index.faiss`` in the index folder: embedded, one machine
    milvus                         a milvus-lite database ``milvus.db`` in the index folder (embedded Milvus)
    milvus:PATH.db                 a milvus-lite database elsewhere on this machine
    milvus://HOST:PORT/COLLECTION  a Milvus server or cluster (token, if needed, from $MILVUS_TOKEN)

The index folder stays the source of truth either way: its SQLite file holds every embedding and the
images' metadata (ids, captions, thumbnails, feature stores), which is what makes builds resumable and
lets the vectors be re-indexed. The engine holds a copy of the vectors (keyed by the SQLite row) and
answers nearest-neighbour queries: exact (``flat``) or approximate (``hnsw``, ``ivf``) inner product over
L2-normalised vectors, so scores are cosine similarities in both engines.

A Milvus rebuild writes a new collection ``COLLECTION__<n>`` and then points the alias ``COLLECTION`` at it:
servers reading the alias see the old vectors until the new ones are complete, and a build that stops
midway leaves the alias where it was (the unfinished collection is dropped by the next build). Every build
or add writes all the vectors again, as FAISS does: simple and always consistent with the SQLite file, at
the cost of re-sending the whole gallery (an incremental insert is not done).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from interbert.errors import UsageError

FAISS_FILE = "index.faiss"
MILVUS_LITE_FILE = "milvus.db"
MILVUS_LITE_COLLECTION = "images"
HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 80
MILVUS_INDEX_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT"}
MILVUS_INSERT_BATCH = 2048  # rows per insert call: ~1 MB of float32 at 128-d, far under gRPC's message cap
MILVUS_CONNECT_TIMEOUT_S = 10
COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")  # Milvus's rule, with room for the __<n> suffix


class VectorIndex(Protocol):
    """What the index folder needs from an engine, once its vectors are built."""

    index_type: str  # flat | hnsw | ivf

    def __len__(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32, rows int64), each queries x k, best first; rows are -1 past the engine's size."""
        ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------------
# Which engine: the --engine value, as recorded in index.json
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Engine:
    uri: str  # as recorded in index.json: faiss | milvus | milvus:PATH | milvus://HOST:PORT/COLLECTION
    kind: str  # faiss | milvus
    client_uri: str | None = None  # what pymilvus connects to: a .db path or http://HOST:PORT
    collection: str | None = None  # the alias that names the current vectors

    @property
    def is_milvus_lite(self) -> bool:
        return self.kind == "milvus" and not self.uri.startswith("milvus://")


def parse_engine(text: str | None, folder: str | Path) -> Engine:
    """The engine named by ``text`` for the index folder ``folder`` (None or "faiss": the default)."""
    text = (text or "faiss").strip()
    folder = Path(folder)
    if text == "faiss":
        return Engine("faiss", "faiss")
    if text == "milvus":
        return Engine("milvus", "milvus", str(folder.resolve() / MILVUS_LITE_FILE), MILVUS_LITE_COLLECTION)
    if text.startswith("milvus://"):
        match = re.fullmatch(r"milvus://([^/:\s]+):(\d{1,5})/([^/\s]+)", text)
        if not match:
            raise UsageError(f"engine {text!r}: a Milvus server is named milvus://HOST:PORT/COLLECTION")
        host, port, collection = match.groups()
        if not COLLECTION_NAME.match(collection):
            raise UsageError(f"engine {text!r}: collection names are letters, digits and '_' (not starting with a "
                             f"digit), at most 200 characters")
        return Engine(text, "milvus", f"http://{host}:{port}", collection)
    if text.startswith("milvus:"):
        path = Path(text[len("milvus:"):]).expanduser()
        if not path.name.endswith(".db"):
            raise UsageError(f"engine {text!r}: a milvus-lite database is a file named *.db (milvus:PATH.db)")
        # Recorded absolute: the folder's manifest must name the same file from any working directory.
        path = path if path.is_absolute() else (Path.cwd() / path)
        return Engine(f"milvus:{path.resolve()}", "milvus", str(path.resolve()), MILVUS_LITE_COLLECTION)
    raise UsageError(f"unknown index engine {text!r}: use faiss, milvus (milvus-lite in the index folder), "
                     f"milvus:PATH.db or milvus://HOST:PORT/COLLECTION")


def build_vectors(engine: Engine, folder: Path, vectors: np.ndarray, rows: np.ndarray, index_type: str) -> None:
    """(Re)build the engine's copy of ``vectors`` (ids ``rows``) with an index of ``index_type``."""
    if engine.kind == "faiss":
        _build_faiss_file(folder, vectors, rows, index_type)
    else:
        MilvusVectors.build(engine, vectors, rows, index_type)


def check_engine(engine: Engine) -> None:
    """Stop now if the engine cannot be used: pymilvus (or milvus-lite) missing, the server unreachable."""
    if engine.kind == "milvus":
        _milvus_client(engine).close()


def vectors_exist(engine: Engine, folder: Path) -> bool:
    """Whether a finished build's vectors are there (a cheap check; opening verifies them)."""
    if engine.kind == "faiss":
        return (folder / FAISS_FILE).is_file()
    return True  # a Milvus collection is checked against the manifest when opened (count, dimension)


def open_vectors(engine: Engine, folder: Path, index_type: str, dim: int, num_images: int | None) -> VectorIndex:
    if engine.kind == "faiss":
        return FaissVectors(folder / FAISS_FILE, index_type)
    return MilvusVectors(engine, index_type, dim, num_images)


# --------------------------------------------------------------------------------------------------
# FAISS: one file in the index folder
# --------------------------------------------------------------------------------------------------
def ivf_lists(num_images: int) -> int:
    # ~4 sqrt(n) lists, each with enough points (>= 39, FAISS's rule of thumb) to train its centroid.
    return max(1, min(int(4 * np.sqrt(num_images)), num_images // 39))


def ivf_probes(lists: int) -> int:
    return min(lists, max(16, lists // 8))


def hnsw_ef_search(k: int) -> int:
    return max(128, 2 * k)


def build_faiss_index(vectors: np.ndarray, ids: np.ndarray, index_type: str):
    """An inner-product index over L2-normalised ``vectors`` (so scores are cosine similarities)."""
    import faiss

    dim = vectors.shape[1]
    if index_type == "flat":
        base = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        base = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    elif index_type == "ivf":
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, ivf_lists(len(vectors)), faiss.METRIC_INNER_PRODUCT)
        base.train(vectors)
    else:
        raise ValueError(f"index type must be one of {tuple(MILVUS_INDEX_TYPES)}, got {index_type!r}")
    index = faiss.IndexIDMap2(base)
    if len(vectors):
        index.add_with_ids(vectors, ids.astype(np.int64))
    return index


def faiss_search_params(index, k: int):
    """Per-query breadth for approximate indexes (passed per call: no shared state between threads)."""
    import faiss

    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(base, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=hnsw_ef_search(k))
    if isinstance(base, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=ivf_probes(base.nlist))
    return None


def _build_faiss_file(folder: Path, vectors: np.ndarray, rows: np.ndarray, index_type: str) -> None:
    import faiss

    from interbert.utils.files import atomic_path

    index = build_faiss_index(vectors, rows, index_type)
    with atomic_path(folder / FAISS_FILE) as tmp:
        faiss.write_index(index, str(tmp))


class FaissVectors:
    def __init__(self, path: Path, index_type: str):
        import faiss

        self.index_type = index_type
        self.faiss = faiss.read_index(str(path))
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.faiss.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # One search at a time: each FAISS call starts its own OpenMP team, and concurrent teams from the
        # service's worker threads oversubscribe the cores (measured: half the throughput at concurrency 8).
        with self._lock:
            return self.faiss.search(queries, k, params=faiss_search_params(self.faiss, k))

    def close(self) -> None:  # an in-process FAISS index holds no connection or file handle
        pass


# --------------------------------------------------------------------------------------------------
# Milvus: milvus-lite (a local .db) or a server, through pymilvus's MilvusClient
# --------------------------------------------------------------------------------------------------
def _milvus_client(engine: Engine):
    from interbert.extras import MissingExtraError

    try:
        from pymilvus import MilvusClient
    except ModuleNotFoundError as error:
        raise MissingExtraError("milvus", error.name or "pymilvus", f"the index engine {engine.uri}") from None
    if engine.is_milvus_lite:
        import importlib.util

        if importlib.util.find_spec("milvus_lite") is None:
            raise MissingExtraError("milvus", "milvus_lite", f"the index engine {engine.uri}",
                                    hint="or name a Milvus server: milvus://HOST:PORT/COLLECTION")
        Path(engine.client_uri).parent.mkdir(parents=True, exist_ok=True)
    # pymilvus logs every failed call at ERROR with its traceback; the error we raise says it in one line.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    options, token = {}, os.environ.get("MILVUS_TOKEN", "")
    if engine.is_milvus_lite:
        # milvus-lite's in-process gRPC server logs each call it does not implement (pymilvus's
        # AllocTimestamp while it waits for an index) with a traceback, and every segment flush at INFO.
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
        logging.getLogger("milvus_lite").setLevel(logging.WARNING)
        # pymilvus pings every 10 s; milvus-lite's server allows one ping per 5 minutes and answers more with
        # GOAWAY "too_many_pings", which gRPC prints on stderr. Locally there is no idle connection to keep alive.
        options, token = {"grpc_options": {"grpc.keepalive_time_ms": 2**31 - 1}}, ""
    lite_log = logging.getLogger("milvus_lite")
    level = lite_log.level
    lite_log.setLevel(logging.CRITICAL)  # a failed start is logged with its traceback; our error says it in one line
    try:
        return MilvusClient(uri=engine.client_uri, token=token, timeout=MILVUS_CONNECT_TIMEOUT_S, **options)
    except Exception as error:  # pymilvus raises MilvusException or grpc errors; either way: unreachable
        hint = (f"; a milvus-lite file is open in one process at a time: is another interbert command using "
                f"{engine.client_uri}? (several processes need a Milvus server)" if engine.is_milvus_lite else "")
        raise UsageError(f"index engine {engine.uri}: cannot connect to Milvus ({_reason(error)}){hint}") from None
    finally:
        lite_log.setLevel(level)


def _reason(error: Exception) -> str:
    return str(getattr(error, "message", "") or error).strip() or type(error).__name__


def _alias_target(client, alias: str) -> str | None:
    try:
        return client.describe_alias(alias)["collection_name"]
    except Exception:  # MilvusException "alias ... does not exist"
        return None


class MilvusVectors:
    """The vectors in a Milvus collection (fields ``row`` INT64 primary key, ``embedding`` FLOAT_VECTOR),
    read through the alias ``engine.collection``. Safe to share between threads (gRPC client)."""

    def __init__(self, engine: Engine, index_type: str, dim: int, num_images: int | None):
        self.engine, self.index_type = engine, index_type
        self.client = _milvus_client(engine)
        self.collection = engine.collection
        try:
            description = self.client.describe_collection(self.collection)
        except Exception as error:
            raise UsageError(f"index engine {engine.uri}: collection {self.collection!r} is not there "
                             f"({_reason(error)}); build it with `interbert index build --engine {engine.uri}`") from None
        stored_dim = next((f.get("params", {}).get("dim") for f in description["fields"] if f["name"] == "embedding"), None)
        if stored_dim is None or int(stored_dim) != dim:
            raise UsageError(f"index engine {engine.uri}: collection {self.collection!r} holds {stored_dim}-d vectors, "
                             f"the index folder's model embeds {dim}-d: it belongs to another index")
        try:
            self.client.load_collection(self.collection)
            self._size = int(self.client.get_collection_stats(self.collection)["row_count"])
        except Exception as error:
            raise UsageError(f"index engine {engine.uri}: cannot load collection {self.collection!r} "
                             f"({_reason(error)})") from None
        if num_images is not None and self._size != num_images:
            raise UsageError(f"index engine {engine.uri}: collection {self.collection!r} holds {self._size} vectors, the "
                             f"index folder {num_images}: run the `interbert index build` of this folder again")
        lists = ivf_lists(self._size)
        self._ivf_probes = ivf_probes(lists)

    def __len__(self) -> int:
        return self._size

    def _search_params(self, k: int) -> dict:
        params = {"hnsw": {"ef": hnsw_ef_search(k)}, "ivf": {"nprobe": self._ivf_probes}}.get(self.index_type, {})
        return {"metric_type": "IP", "params": params}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            hits = self.client.search(self.collection, data=[q for q in queries], limit=k, anns_field="embedding",
                                      search_params=self._search_params(k), output_fields=["row"])
        except Exception as error:
            raise UsageError(f"index engine {self.engine.uri}: search failed ({_reason(error)})") from None
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for q, found in enumerate(hits):
            for j, hit in enumerate(found[:k]):
                scores[q, j], rows[q, j] = hit["distance"], hit["row"]
        return scores, rows

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a connection that is already gone
            pass

    @staticmethod
    def build(engine: Engine, vectors: np.ndarray, rows: np.ndarray, index_type: str) -> None:
        from pymilvus import DataType

        client = _milvus_client(engine)
        alias = engine.collection
        try:
            existing = set(client.list_collections())
            if alias in existing:
                raise UsageError(f"index engine {engine.uri}: {alias!r} is a collection not made by interbert "
                                 f"(interbert's is an alias of {alias}__<n>); name another collection")
            current = _alias_target(client, alias)
            versions = [int(name.rsplit("__", 1)[1]) for name in existing
                        if name.startswith(f"{alias}__") and name.rsplit("__", 1)[1].isdigit()]
            target = f"{alias}__{max(versions, default=0) + 1}"

            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("row", DataType.INT64, is_primary=True)
            schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=int(vectors.shape[1]))
            index_params = client.prepare_index_params()
            build_params = {"hnsw": {"M": HNSW_NEIGHBOURS, "efConstruction": HNSW_EF_CONSTRUCTION},
                            "ivf": {"nlist": ivf_lists(len(vectors))}}.get(index_type, {})
            # pymilvus 3 sends the build parameters as separate key/values, which milvus-lite 3.2 ignores (it
            # reads only the older nested "params" JSON, which servers also read): send both, same values.
            index_params.add_index(field_name="embedding", index_type=MILVUS_INDEX_TYPES[index_type],
                                   metric_type="IP", params={**build_params, "params": build_params})
            # Bulk-load order: insert and seal the rows, then index them, then load. (A collection created
            # with its index is loaded at once; milvus-lite then answers from unindexed rows until a
            # background build catches up, and a server indexes segment by segment as they seal.)
            client.create_collection(target, schema=schema)
            for start in range(0, len(vectors), MILVUS_INSERT_BATCH):
                chunk = slice(start, start + MILVUS_INSERT_BATCH)
                client.insert(target, [{"row": int(r), "embedding": v} for r, v in zip(rows[chunk], vectors[chunk])])
            client.flush(target)
            client.create_index(target, index_params)
            client.load_collection(target)
            # The switch: readers of the alias move from the previous vectors to these in one step.
            if current is None:
                client.create_alias(target, alias)
            else:
                client.alter_alias(target, alias)
            for name in existing:  # the previous vectors, and any build that stopped before its switch
                if name.startswith(f"{alias}__") and name != target:
                    client.drop_collection(name)
        except UsageError:
            raise
        except Exception as error:
            raise UsageError(f"index engine {engine.uri}: writing the vectors failed ({_reason(error)})") from None
        finally:
            client.close()
