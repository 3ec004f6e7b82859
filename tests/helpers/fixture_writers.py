"""Writers only the tests use: a generated gallery folder for the search service, and the two feature
layouts the project reads but never writes itself (HDF5, ViLBERT's pickled LMDB). They lived in
``src/interbert`` until issue 25 took test-only code out of the package."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from interbert.data.features import Regions
from interbert.serve.synthetic_gallery import generated_regions
from interbert.utils.files import atomic_path, replace_folder


def write_gallery(
    folder: str | Path,
    num_images: int,
    feature_dim: int,
    max_regions: int = 6,
    seed: int = 0,
    images: bool = True,
    id_prefix: str = "img",
) -> list[str]:
    """Write ``folder/features/<id>.npz`` (and ``folder/images/<id>.png`` when ``images``); return the ids."""
    from PIL import Image

    folder = Path(folder)
    (folder / "features").mkdir(parents=True, exist_ok=True)
    if images:
        (folder / "images").mkdir(parents=True, exist_ok=True)
    colours = np.random.default_rng(seed + 1)
    ids = []
    for image_id, r in generated_regions(num_images, feature_dim, max_regions, seed, id_prefix):
        np.savez(folder / "features" / f"{image_id}.npz", features=r.features, boxes=r.boxes, image_w=r.image_w,
                 image_h=r.image_h)
        if images:
            colour = tuple(int(c) for c in colours.integers(0, 256, 3))
            Image.new("RGB", (r.image_w // 4, r.image_h // 4), colour).save(folder / "images" / f"{image_id}.png")
        ids.append(image_id)
    return ids


def write_hdf5(path: str | Path, items: Iterable[tuple[str, Regions]], layout: str = "groups") -> None:
    """``groups``: one group per image. ``flat``: padded N x K arrays with ``image_ids`` and ``num_boxes``.
    The file appears complete or not at all, as with :func:`write_tsv`."""
    import h5py

    if layout not in ("groups", "flat"):
        raise ValueError(f"layout must be 'groups' or 'flat', not {layout!r}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        if layout == "groups":
            for image_id, r in items:
                g = f.create_group(image_id)
                g.create_dataset("features", data=r.features)
                g.create_dataset("boxes", data=r.boxes)
                if r.class_probs is not None:
                    g.create_dataset("class_probs", data=r.class_probs)
                g.attrs["image_w"], g.attrs["image_h"] = r.image_w, r.image_h
            return
        items = list(items)
        n, k = len(items), max(r.num_regions for _, r in items)
        dim = items[0][1].features.shape[1]

        def padded(get, width: int) -> np.ndarray:
            out = np.zeros((n, k, width), dtype=np.float32)
            for row, (_, r) in enumerate(items):
                out[row, : r.num_regions] = get(r)
            return out

        f.create_dataset("features", data=padded(lambda r: r.features, dim))
        f.create_dataset("boxes", data=padded(lambda r: r.boxes, 4))
        f.create_dataset("image_ids", data=np.array([i.encode() for i, _ in items]))
        f.create_dataset("num_boxes", data=np.array([r.num_regions for _, r in items]))
        f.create_dataset("image_w", data=np.array([r.image_w for _, r in items]))
        f.create_dataset("image_h", data=np.array([r.image_h for _, r in items]))
        if all(r.class_probs is not None for _, r in items):
            f.create_dataset("class_probs", data=padded(lambda r: r.class_probs, items[0][1].class_probs.shape[1]))


def write_vilbert_lmdb(path: str | Path, items: Iterable[tuple[str, Regions]]) -> None:
    """Write ViLBERT's pickled layout (the original code's feature store, to test its reader). The
    environment folder is written beside ``path`` and takes its name only when complete."""
    import lmdb
    import pickle

    items = list(items)
    size = sum(r.features.nbytes * 2 + r.boxes.nbytes * 2 + 4096 for _, r in items) + (1 << 20)

    def write(folder: Path) -> None:
        env = lmdb.open(str(folder), map_size=size * 2)
        try:
            with env.begin(write=True) as txn:
                for image_id, r in items:
                    item = {"image_id": image_id, "image_h": r.image_h, "image_w": r.image_w,
                            "num_boxes": r.num_regions, "features": base64.b64encode(r.features.tobytes()),
                            "boxes": base64.b64encode(r.boxes.tobytes())}
                    txn.put(image_id.encode(), pickle.dumps(item))
                txn.put(b"keys", pickle.dumps([image_id.encode() for image_id, _ in items]))
        finally:
            env.close()

    replace_folder(path, write)
