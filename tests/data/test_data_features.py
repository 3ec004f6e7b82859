"""Every feature store format, written here from the real 1024-d detector output, gives the same
regions; the project's store is restartable; corrupt inputs name their place."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from conftest import shared_path
from fixture_writers import write_hdf5, write_vilbert_lmdb

from interbert.data import DataFormatError, RegionStore, RegionStoreWriter, Regions, UnknownImageError, open_features
from interbert.data.captions import read_captions
from interbert.data.features import convert_features, write_npz_folder, write_tsv
from interbert.utils.files import leftover_temporaries


@pytest.fixture(scope="module")
def real():
    store = open_features(shared_path("data", "regions", "features_npz"))
    return store, dict(store.items())


def with_class_probs(items: dict[str, Regions]) -> dict[str, Regions]:
    rng = np.random.default_rng(0)
    out = {}
    for image_id, r in items.items():
        logits = rng.normal(size=(r.num_regions, 7))
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        out[image_id] = Regions(r.features, r.boxes, r.image_w, r.image_h, probs)
    return out


def assert_same(a: Regions, b: Regions, atol: float = 0.0):
    np.testing.assert_allclose(a.features, b.features, atol=atol)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert (a.image_w, a.image_h) == (b.image_w, b.image_h)
    assert (a.class_probs is None) == (b.class_probs is None)
    if a.class_probs is not None:
        np.testing.assert_allclose(a.class_probs, b.class_probs, rtol=1e-6)


def test_real_npz_folder_with_its_captions(real):
    store, items = real
    assert len(store) == 12 and store.feature_dim == 1024
    r = store["1016887272"]
    assert r.features.shape == (48, 1024) and r.boxes.shape == (48, 4) and (r.image_w, r.image_h) == (333, 500)
    assert (r.boxes[:, 2] <= r.image_w + 1).all() and (r.boxes[:, 3] <= r.image_h + 1).all()
    captions = read_captions(shared_path("data", "regions", "DERIVED_flickr30k_captions_for_fixture_images.json"))
    assert {c.image_id for c in captions} & set(store.ids()) == {"1016887272"}


@pytest.mark.parametrize("fmt", ["tsv", "tsv_cls_prob", "npz", "hdf5", "hdf5_flat", "lmdb", "store", "store_fp16"])
def test_every_format_gives_identical_regions(real, tmp_path, fmt):
    _, items = real
    if fmt in ("tsv_cls_prob", "hdf5", "hdf5_flat", "store"):  # these layouts carry class distributions: round-trip them too
        items = with_class_probs(items)
    path = tmp_path / fmt
    if fmt.startswith("tsv"):
        write_tsv(path, items.items(), with_class_probs=fmt == "tsv_cls_prob")
    elif fmt == "npz":
        write_npz_folder(path, items.items())
    elif fmt.startswith("hdf5"):
        write_hdf5(path, items.items(), layout="flat" if fmt == "hdf5_flat" else "groups")
    elif fmt == "lmdb":
        write_vilbert_lmdb(path, items.items())
    else:
        source = open_features(shared_path("data", "regions", "features_npz")) if fmt == "store_fp16" else None
        with RegionStoreWriter(path, "float16" if fmt == "store_fp16" else "float32", chunk_size=5) as w:
            for image_id, r in (source.items() if source else items.items()):
                w.add(image_id, r)
    store = open_features(path, trust_pickle=fmt == "lmdb")
    assert sorted(store.ids()) == sorted(items) and store.feature_dim == 1024
    for image_id, r in items.items():
        assert_same(store[image_id], r, atol=2e-3 * max(1.0, float(np.abs(r.features).max())) if fmt == "store_fp16" else 0)
    assert "1339" in store and 1339 in store and "nope" not in store


def test_lxmert_tsv_layout(real, tmp_path):
    _, items = real
    b64 = lambda a: base64.b64encode(np.ascontiguousarray(a, np.float32).tobytes()).decode()  # noqa: E731
    with open(tmp_path / "lx.tsv", "w") as f:
        for image_id, r in items.items():  # LXMERT: img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, ...
            n = r.num_regions
            f.write("\t".join([image_id, str(r.image_h), str(r.image_w), b64(np.zeros(n)), b64(np.ones(n)),
                               b64(np.zeros(n)), b64(np.ones(n)), str(n), b64(r.boxes), b64(r.features)]) + "\n")
    store = open_features(tmp_path / "lx.tsv")
    for image_id, r in items.items():
        assert_same(store[image_id], r)


def _bottom_up_vqa_hdf5(path, items):
    """bottom-up-attention-vqa's detection_features_converter layout: 36 regions per image, no ids and
    no sizes in the file; spatial_features = boxes / image size (+ normalised width, height)."""
    import h5py

    k = 36
    with h5py.File(path, "w") as f:
        features = f.create_dataset("image_features", (len(items), k, 1024), "f")
        boxes = f.create_dataset("image_bb", (len(items), k, 4), "f")
        spatial = f.create_dataset("spatial_features", (len(items), k, 6), "f")
        for row, r in enumerate(items.values()):
            features[row], boxes[row] = r.features[:k], r.boxes[:k]
            scaled = r.boxes[:k] / np.array([r.image_w, r.image_h, r.image_w, r.image_h], np.float32)
            spatial[row] = np.concatenate([scaled, scaled[:, 2:] - scaled[:, :2]], 1)
    return {int(i) if i.isdigit() else i: row for row, i in enumerate(items)}  # the original keys ints


def test_hdf5_bottom_up_vqa_layout_with_its_id_map(real, tmp_path):
    import json
    import pickle

    _, items = real
    items = {i: r for i, r in items.items() if r.num_regions >= 36}
    id_map = _bottom_up_vqa_hdf5(tmp_path / "train36.hdf5", items)
    with open(tmp_path / "train36_imgid2idx.pkl", "wb") as handle:
        pickle.dump(id_map, handle)
    with pytest.raises(PermissionError, match="train36_imgid2idx.pkl"):
        open_features(tmp_path / "train36.hdf5")
    store = open_features(tmp_path / "train36.hdf5", trust_pickle=True)
    (tmp_path / "train36_imgid2idx.json").write_text(json.dumps(id_map))  # the safe twin needs no trust
    for opened in (store, open_features(tmp_path / "train36.hdf5")):
        assert sorted(opened.ids()) == sorted(items) and opened.feature_dim == 1024
        for image_id, r in items.items():
            got = opened[image_id]
            np.testing.assert_array_equal(got.features, r.features[:36])
            np.testing.assert_array_equal(got.boxes, r.boxes[:36])
            assert (got.image_w, got.image_h) == (r.image_w, r.image_h)  # recovered from spatial_features


def test_hdf5_flat_layout_errors_name_the_file_and_the_image(real, tmp_path):
    import h5py

    _, items = real
    path = tmp_path / "flat.h5"
    write_hdf5(path, items.items(), layout="flat")
    first = next(iter(items))
    with h5py.File(path, "a") as f:
        f["num_boxes"][0] = 999
    with pytest.raises(DataFormatError, match=rf"flat.h5.*image {first}: num_boxes 999"):
        open_features(path)
    write_hdf5(path, list(items.items())[:2] * 2, layout="flat")
    with pytest.raises(DataFormatError, match="occur more than once"):
        open_features(path)
    _bottom_up_vqa_hdf5(tmp_path / "val36.hdf5", {i: r for i, r in items.items() if r.num_regions >= 36})
    with pytest.raises(DataFormatError, match="val36_imgid2idx.json or val36_imgid2idx.pkl"):
        open_features(tmp_path / "val36.hdf5")


def test_lmdb_refuses_pickle_unless_trusted(real, tmp_path):
    write_vilbert_lmdb(tmp_path / "feat.lmdb", list(real[1].items())[:2])
    with pytest.raises(PermissionError, match="trust_pickle=True"):
        open_features(tmp_path / "feat.lmdb")


def test_convert_resumes_a_partial_store(real, tmp_path):
    source, items = real
    dst = tmp_path / "store"
    with RegionStoreWriter(dst, chunk_size=4) as w:  # an interrupted run: 5 added, only one chunk of 4 complete
        for image_id in source.ids()[:5]:
            w.add(image_id, items[image_id])
        w._pending.clear()  # simulate the crash before the second chunk was flushed
    assert len(RegionStore(dst)) == 4
    written, skipped = convert_features(source, dst, chunk_size=4, progress=False)
    assert (written, skipped) == (8, 4)
    store = RegionStore(dst)
    assert len(store) == 12 and leftover_temporaries(dst) == []
    for image_id, r in items.items():
        assert_same(store[image_id], r)
    assert convert_features(source, dst, progress=False) == (0, 12)


def test_store_survives_pickling_for_dataloader_workers(real, tmp_path):
    import pickle

    write_tsv(tmp_path / "f.tsv", real[1].items())
    for store in (open_features(tmp_path / "f.tsv"), open_features(shared_path("data", "regions", "features_npz"))):
        store["1339"]
        clone = pickle.loads(pickle.dumps(store))
        assert_same(clone["1339"], real[1]["1339"])


def write_one_line(path, fields):
    path.write_text("\t".join(map(str, fields)) + "\n")


def b64(a):
    return base64.b64encode(np.asarray(a, np.float32).tobytes()).decode()


def test_tsv_errors_name_file_line_and_image(tmp_path):
    boxes, feats = b64(np.zeros((2, 4))), b64(np.ones((2, 3)))
    good = ["img1", 10, 10, 2, boxes, feats]
    path = tmp_path / "f.tsv"
    path.write_text("\t".join(map(str, good)) + "\n" + "\t".join(map(str, ["img2", 10, 10, 2, boxes, feats[:-9]])) + "\n")
    store = open_features(path)
    assert store["img1"].features.shape == (2, 3)
    with pytest.raises(DataFormatError, match=r"f.tsv:2: image img2: field 'features' is not valid base64"):
        store["img2"]

    write_one_line(path, ["img1", 10, 10, 2, boxes, "@@@@not base64"])
    with pytest.raises(DataFormatError, match=r"f.tsv:1: image img1: field 'features' is not valid base64"):
        open_features(path)

    write_one_line(path, ["img1", 10, 10, 2, boxes, b64(np.ones(7))])  # 7 floats for 2 boxes
    with pytest.raises(DataFormatError, match=r"f.tsv:1: image img1: .*7 floats, not a multiple of num_boxes=2"):
        open_features(path)

    path.write_text("\t".join(map(str, good)) + "\n" + "\t".join(map(str, ["img2", 10, 10, 2, boxes, b64(np.ones(8))])))
    with pytest.raises(DataFormatError, match=r"f.tsv:2: image img2: 8 feature values for num_boxes=2 .*2 x 3"):
        open_features(path)["img2"]

    path.write_text("\t".join(map(str, good)) + "\n" + "img2\t10\t10\t2\t" + boxes[:5])  # cut mid-line
    with pytest.raises(DataFormatError, match=r"f.tsv:2: 5 tab-separated fields, expected 6 \(truncated line\?\)"):
        open_features(path)

    path.write_text("\t".join(map(str, good)) + "\n")
    store = open_features(path)
    path.write_text("img1\t10\t10\t2\t" + boxes + "\n")  # truncated after it was indexed
    with pytest.raises(DataFormatError, match=r"f.tsv:1: image img1: 5 fields, expected 6"):
        store["img1"]


def test_unknown_id_names_id_and_store(real):
    store = real[0]
    with pytest.raises(UnknownImageError, match=r"'missing' is not in the feature store .*features_npz") as e:
        store["missing"]
    assert isinstance(e.value, KeyError)
