"""`interbert data convert`, `interbert data check` and `interbert tokenizer train` end to end."""

from __future__ import annotations

import argparse
import json

import numpy as np
from conftest import shared_path

from interbert.cli import main
from interbert.data import RegionStore, Regions
from interbert.data.cli import get_data_subparsers
from interbert.data.features import write_npz_folder, write_tsv


def test_convert_then_check_real_regions(tmp_path, capsys):
    src = shared_path("data", "regions", "features_npz")
    assert main(["data", "convert", str(src), str(tmp_path / "store"), "--dtype", "float16", "--chunk-size", "5"]) == 0
    store = RegionStore(tmp_path / "store")
    assert len(store) == 12 and store.manifest["feature_dtype"] == "float16" and len(store.manifest["chunks"]) == 3
    capsys.readouterr()
    assert main(["data", "convert", str(src), str(tmp_path / "store"), "--dtype", "float16"]) == 0
    assert "wrote 0 images, 12 already there" in capsys.readouterr().out
    captions = shared_path("data", "regions", "DERIVED_flickr30k_captions_for_fixture_images.json")
    capsys.readouterr()
    assert main(["data", "check", "--captions", str(captions), "--features", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "captions: 20 for 4 images" in out and "feature dim 1024" in out
    assert "3 images with captions have no features; training skips 15 captions" in out
    assert "11 images in the feature store are not used" in out and "OK" in out


def test_convert_refuses_to_mix_dtypes_on_resume(tmp_path, capsys):
    src = shared_path("data", "regions", "features_npz")
    main(["data", "convert", str(src), str(tmp_path / "s"), "--dtype", "float16"])
    assert main(["data", "convert", str(src), str(tmp_path / "s"), "--dtype", "float32"]) == 2  # a usage error
    assert f"error: {tmp_path / 's'} holds float16 features; resume with that dtype" in capsys.readouterr().err


def test_check_fails_on_data_that_cannot_train(tmp_path, capsys):
    rng = np.random.default_rng(0)
    good = Regions(rng.random((3, 4)), [[0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 3, 3]], 10, 10)
    bad = Regions(np.full((2, 4), np.nan), [[0, 0, 5, 5], [0, 0, 20, 5]], 10, 10)
    outside = Regions(rng.random((1, 4)), [[0, 0, 30, 5]], 10, 10)
    write_tsv(tmp_path / "f.tsv", [("a", good), ("b", bad), ("c", outside)])
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"image_id": i, "caption": "x"}) for i in "abz"))
    code = main(["data", "check", "--captions", str(tmp_path / "c.jsonl"), "--features", str(tmp_path / "f.tsv")])
    out = capsys.readouterr().out
    assert code == 1 and "error: 1 of 2 images cannot train" in out
    assert f"{tmp_path / 'f.tsv'}: image 'b': non-finite values (NaN or inf) in 2 of 2 regions" in out
    assert "1 image with boxes outside the picture (training clips them): 'c'" in out
    assert "1 image with captions has no features; training skips 1 caption: 'z'" in out
    write_npz_folder(tmp_path / "npz", [("q", good)])
    assert main(["data", "check", "--captions", str(tmp_path / "c.jsonl"), "--features", str(tmp_path / "npz")]) == 1
    assert "no image has both captions and features" in capsys.readouterr().out


def test_tokenizer_train_cli(tmp_path):
    captions = shared_path("data", "flickr8k", "DERIVED_dataset_flickr8k_test_karpathy_format.json")
    assert main(["tokenizer", "train", str(captions), str(tmp_path / "tok"), "--vocab-size", "800"]) == 0
    from interbert.data.tokenize import load_tokenizer

    assert 0 < len(load_tokenizer(tmp_path / "tok")) <= 800


def test_other_modules_can_join_the_data_group():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    get_data_subparsers(sub).add_parser("synth").set_defaults(func=lambda a: 0)  # e.g. interbert.synthetic
    from interbert.data import cli

    cli.register(sub)
    assert parser.parse_args(["data", "synth"]).data_command == "synth"
    assert parser.parse_args(["data", "check", "--captions", "c", "--features", "f"]).data_command == "check"


def test_check_lists_every_bad_image_up_to_a_cap_and_reads_past_a_reader_error(tmp_path, capsys):
    rng = np.random.default_rng(0)
    box = [[0, 0, 5, 5]]
    items = [(str(n), Regions(np.full((1, 4), np.nan) if n < 25 else rng.random((1, 4)), box, 10, 10)) for n in range(30)]
    write_tsv(tmp_path / "f.tsv", items)
    lines = (tmp_path / "f.tsv").read_text().splitlines()
    lines[3] = lines[3][:-8]  # image 3: its base64 features cut short, a reader error for that image alone
    (tmp_path / "f.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"image_id": str(n), "caption": "x"}) for n in range(30))
                                      + '\n{"image_id": "5"}\n')
    code = main(["data", "check", "--captions", str(tmp_path / "c.jsonl"), "--features", str(tmp_path / "f.tsv")])
    out = capsys.readouterr().out
    assert code == 1
    assert "error: 25 of 30 images cannot train" in out and "  ... and 5 more" in out
    assert f"{tmp_path / 'f.tsv'}: image '0': non-finite values" in out
    assert f"{tmp_path / 'f.tsv'}:4: image 3: 3 feature values for num_boxes=1" in out
    assert "error: 1 malformed entry" in out and f"{tmp_path / 'c.jsonl'}:31: expected an object" in out
    assert "images_with" not in out and "Traceback" not in out
