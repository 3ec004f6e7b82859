"""Every malformed feature input raises DataFormatError naming the file and the line or the image id, in
every reader: never a bare UnicodeDecodeError, binascii/zipfile/zlib error, numpy ValueError, JSON,
pickle, h5py or lmdb error."""

from __future__ import annotations

import base64
import json
import pickle

import numpy as np
import pytest
from test_data_features_concurrency import synthetic_regions, write_format

from interbert.data import DataFormatError, open_features


def b64(a) -> str:
    return base64.b64encode(np.asarray(a, np.float32).tobytes()).decode()


def tsv_line(image_id="img1", num_boxes=2, boxes=None, features=None) -> str:
    boxes = b64(np.zeros((2, 4))) if boxes is None else boxes
    features = b64(np.ones((2, 3))) if features is None else features
    return "\t".join(map(str, [image_id, 10, 10, num_boxes, boxes, features])) + "\n"


def read_everything(path, **kwargs):
    store = open_features(path, **kwargs)
    for image_id in store.ids():
        store[image_id]


def raises_naming(*parts: str):
    """pytest.raises(DataFormatError) whose message holds each of ``parts`` (a file, ``:line:``, an image id)."""
    class _Check:
        def __enter__(self):
            self.raises = pytest.raises(DataFormatError)
            self.info = self.raises.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.raises.__exit__(*exc)
            message = str(self.info.value)
            missing = [p for p in parts if p not in message]
            assert not missing, f"{message!r} does not name {missing}"
            assert self.info.value.__cause__ is None  # a clean error, not a re-raised library one
            return handled
    return _Check()


# --------------------------------------------------------------------------- TSV
def test_tsv_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "f.tsv"
    path.write_bytes(tsv_line().encode() + tsv_line("img\xff2").encode("latin-1"))  # in the id: found while indexing
    with raises_naming(f"{path}:2:", "not UTF-8"):
        open_features(path)
    path.write_bytes(tsv_line().encode() + tsv_line("img2").replace("\t10\t", "\t1\xe90\t", 1).encode("latin-1"))
    store = open_features(path)  # elsewhere in the line: found when the line is read
    with raises_naming(f"{path}:2:", "not UTF-8", "0xe9"):
        store["img2"]
    path.write_bytes("image_id\timage_w\timage_h\tnum_boxes\tboxes\tfeatures\xff\n".encode("latin-1") + tsv_line().encode())
    with raises_naming(f"{path}:1:", "header line is not UTF-8"):
        open_features(path)


def test_tsv_wrong_num_boxes_on_the_first_line_names_line_1(tmp_path):
    path = tmp_path / "f.tsv"
    for wrong in (1, 3, 4):
        path.write_text(tsv_line("img1", num_boxes=wrong) + tsv_line("img2"))
        with raises_naming(f"{path}:1:", "image img1", f"'boxes' holds 8 floats, expected num_boxes={wrong} x 4"):
            open_features(path)
    path.write_text("image_id\timage_w\timage_h\tnum_boxes\tboxes\tfeatures\n" + tsv_line(num_boxes=3))
    with raises_naming(f"{path}:2:", "image img1"):  # behind a header line the first image is on line 2
        open_features(path)
    path.write_text(tsv_line(num_boxes=0))
    with raises_naming(f"{path}:1:", "num_boxes=0"):
        open_features(path)


def test_tsv_feature_size_mismatch_names_both_lines(tmp_path):
    path = tmp_path / "f.tsv"
    path.write_text(tsv_line("img1", features=b64(np.ones((2, 6)))) + tsv_line("img2"))
    store = open_features(path)  # line 1 alone looks fine: 6-d features
    with raises_naming(f"{path}:2:", "image img2", "the feature size of line 1"):
        store["img2"]


@pytest.mark.parametrize("cut", [1, 3, 6])
def test_tsv_truncated_base64_names_file_and_line(tmp_path, cut):
    path = tmp_path / "f.tsv"
    features = b64(np.ones((2, 3)))
    path.write_text(tsv_line("img1", features=features[:-cut]))
    with raises_naming(f"{path}:1:", "image img1", "'features' is not valid base64 float32"):
        open_features(path)


def test_lxmert_tsv_wrong_num_boxes_names_file_and_line(tmp_path):
    items = synthetic_regions(n=3, dim=4)
    path = tmp_path / "lx.tsv"
    write_format("tsv_lxmert", path, items)
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[1].split("\t")
    fields[7] = str(int(fields[7]) + 1)  # num_boxes is the 8th LXMERT field
    lines[1] = "\t".join(fields)
    path.write_text("".join(lines))
    store = open_features(path)
    with raises_naming(f"{path}:2:", f"image {list(items)[1]}", "'boxes' holds"):
        store[list(items)[1]]


# --------------------------------------------------------------------------- npz folder
@pytest.fixture
def npz_folder(tmp_path):
    items = synthetic_regions(n=3, dim=4)
    write_format("npz", tmp_path / "npz", items)
    return tmp_path / "npz", list(items)


@pytest.mark.parametrize("damage", ["cut", "garbage", "flipped", "pickled"])
def test_a_bad_npz_file_names_file_and_image(npz_folder, damage):
    folder, ids = npz_folder
    file = folder / f"{ids[1]}.npz"
    data = file.read_bytes()
    if damage == "cut":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        file.write_bytes(b"not a zip archive at all")
    elif damage == "flipped":  # a damaged byte inside the stored features: the member's CRC no longer matches
        with np.load(file) as z:
            arrays = {k: z[k] for k in z.files}
        np.savez_compressed(file, **arrays)
        data = bytearray(file.read_bytes())
        data[len(data) // 3] ^= 0xFF
        file.write_bytes(bytes(data))
    else:  # object arrays need pickle, which np.load rightly refuses
        np.savez(file, features=np.array([object()] * 2, dtype=object), boxes=np.zeros((2, 4)), image_w=1, image_h=1)
    store = open_features(folder)
    with raises_naming(str(file), f"image {ids[1]}"):
        store[ids[1]]


def test_npz_with_bad_arrays_names_file_and_image(npz_folder):
    folder, ids = npz_folder
    file = folder / f"{ids[2]}.npz"
    np.savez(file, features=np.ones((3, 4)), boxes=np.zeros((2, 4)), image_w=10, image_h=10)
    with raises_naming(str(file), f"image {ids[2]}", "disagree"):
        open_features(folder)[ids[2]]
    np.savez(file, features=np.ones((2, 4)), boxes=np.zeros((2, 4)), image_w=np.array([1, 2]), image_h=10)
    with raises_naming(str(file), f"image {ids[2]}", "image_w/image_h"):
        open_features(folder)[ids[2]]


# --------------------------------------------------------------------------- HDF5
@pytest.mark.parametrize("layout", ["hdf5", "hdf5_flat"])
def test_a_cut_hdf5_file_names_the_file(tmp_path, layout):
    path = tmp_path / "f.h5"
    write_format(layout, path, synthetic_regions(n=4, dim=4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with raises_naming(str(path)):
        read_everything(path)


def test_hdf5_group_without_boxes_or_size_names_the_image(tmp_path):
    import h5py

    path = tmp_path / "f.h5"
    items = synthetic_regions(n=3, dim=4)
    write_format("hdf5", path, items)
    second, third = list(items)[1:3]
    with h5py.File(path, "a") as f:
        del f[second]["boxes"]
        del f[third].attrs["image_w"]
    store = open_features(path)
    with raises_naming(str(path), f"image {second}", "'boxes'"):
        store[second]
    with raises_naming(str(path), f"image {third}", "'image_w'"):
        store[third]


def test_hdf5_flat_non_utf8_id_and_bad_id_map_are_named(tmp_path):
    import h5py

    path = tmp_path / "flat.h5"
    write_format("hdf5_flat", path, synthetic_regions(n=3, dim=4))
    with h5py.File(path, "a") as f:
        ids = f["image_ids"][()]
        ids[1] = b"\xff\xfe"
        del f["image_ids"]
        f.create_dataset("image_ids", data=ids)
    with raises_naming(str(path), "row 1", "not UTF-8"):
        open_features(path)
    with h5py.File(path, "a") as f:  # no ids inside: a broken id map beside the file is named instead
        del f["image_ids"]
    (tmp_path / "flat_imgid2idx.json").write_text('{"a": 0,\n "b": }')
    with raises_naming(f"{tmp_path / 'flat_imgid2idx.json'}:2:", "not valid JSON"):
        open_features(path)


# --------------------------------------------------------------------------- ViLBERT LMDB
def _lmdb_put(path, key: bytes, value: bytes) -> None:
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(key, value)
    env.close()


@pytest.mark.parametrize("damage", ["not_a_pickle", "cut_pickle", "missing_fields", "bad_base64", "wrong_count"])
def test_a_bad_lmdb_value_names_the_store_and_image(tmp_path, damage):
    path = tmp_path / "feat.lmdb"
    items = synthetic_regions(n=3, dim=4)
    write_format("lmdb", path, items)
    image_id = list(items)[1]
    r = items[image_id]
    good = {"image_id": image_id, "image_h": r.image_h, "image_w": r.image_w, "num_boxes": r.num_regions,
            "features": base64.b64encode(r.features.tobytes()), "boxes": base64.b64encode(r.boxes.tobytes())}
    value, said = {
        "not_a_pickle": (b"\x00\x01garbage", "not a readable pickle"),
        "cut_pickle": (pickle.dumps(good)[:40], "not a readable pickle"),
        "missing_fields": (pickle.dumps({k: v for k, v in good.items() if k != "boxes"}), "lacks ['boxes']"),
        "bad_base64": (pickle.dumps({**good, "features": good["features"][:-3]}), "'features' is not valid base64"),
        "wrong_count": (pickle.dumps({**good, "num_boxes": r.num_regions + 1}),
                        f"'boxes' holds {4 * r.num_regions} floats, expected num_boxes={r.num_regions + 1} x 4"),
    }[damage]
    _lmdb_put(path, image_id.encode(), value)
    store = open_features(path, trust_pickle=True)
    with raises_naming(str(path), f"image {image_id}", said):
        store[image_id]


def test_a_bad_lmdb_keys_entry_or_file_names_the_store(tmp_path):
    path = tmp_path / "feat.lmdb"
    write_format("lmdb", path, synthetic_regions(n=2, dim=4))
    _lmdb_put(path, b"keys", b"\x80\x04garbage")
    with raises_naming(str(path), "b'keys'") as failure:
        open_features(path, trust_pickle=True)
    # while the error (and the half-built reader in its traceback) is still around, the LMDB can be reopened
    _lmdb_put(path, b"keys", pickle.dumps({"not": "a list"}))
    del failure
    with raises_naming(str(path), "b'keys'", "not a list"):
        open_features(path, trust_pickle=True)
    (path / "data.mdb").write_bytes(b"\x00" * 4096)
    with raises_naming(str(path), "not a readable LMDB"):
        open_features(path, trust_pickle=True)


# --------------------------------------------------------------------------- the project's store
@pytest.fixture
def store_dir(tmp_path):
    write_format("store", tmp_path / "store", synthetic_regions(n=40, dim=4))  # chunks 00000..00002
    return tmp_path / "store"


def test_a_store_manifest_or_index_that_is_not_json_is_named(store_dir):
    index = store_dir / "chunk-00001.index.json"
    index.write_text(index.read_text()[:-10])
    with raises_naming(f"{index}:1:", "not valid JSON"):
        open_features(store_dir)
    manifest = store_dir / "manifest.json"
    manifest.write_text('{\n "format": "interbert-regions",\n "chunks": [\n')
    with raises_naming(f"{manifest}:", "not valid JSON"):
        open_features(store_dir)
    manifest.write_bytes(b'{"format": "interbert-regions\xff"}')
    with raises_naming(str(manifest), "not UTF-8"):
        open_features(store_dir)
    manifest.write_text('{"format": "interbert-regions", "chunks": "chunk-00000"}')
    with raises_naming(str(manifest), "'chunks'"):
        open_features(store_dir)


@pytest.mark.parametrize("damage", ["cut", "bad_header", "empty", "missing", "wrong_dim"])
def test_a_bad_store_array_is_named(store_dir, damage):
    array = store_dir / "chunk-00001.features.npy"
    data = array.read_bytes()
    if damage == "cut":
        array.write_bytes(data[: len(data) - 100])
    elif damage == "bad_header":
        array.write_bytes(b"\x93NUMPY\x01\x00garbage" + data[16:])
    elif damage == "empty":
        array.write_bytes(b"")
    elif damage == "missing":
        array.unlink()
    else:
        np.save(array, np.ones((len(np.load(array)), 5), np.float32))
    with raises_naming(str(array)):
        open_features(store_dir)


def test_a_store_listing_an_id_twice_is_named(store_dir):
    first, second = store_dir / "chunk-00000.index.json", store_dir / "chunk-00002.index.json"
    index = json.loads(second.read_text())
    index["ids"][0] = json.loads(first.read_text())["ids"][3]
    second.write_text(json.dumps(index))
    with raises_naming(str(second), f"image {index['ids'][0]} is also in chunk-00000"):
        open_features(store_dir)
