"""A corpus of corrupt inputs, each run through ``interbert data check`` and through training
(``interbert pretrain``; ``interbert finetune vcr`` for VCR lines).

Each case corrupts one thing in a small valid generated dataset. For every case: no traceback, the exit
code the user should see (1 for data that cannot train, 2 for a usage problem, 0 where training is
legitimately possible), and the message names the file and the line or the image id. Training must fail
before it starts, so the failing cases cost no training step. Most cases run in-process through
``interbert.cli.main`` (fast); a few run as real subprocesses, as a user would.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from interbert.cli import main
from interbert.data.features import Regions, open_features, write_npz_folder, write_tsv

PRETRAIN_CONFIG = REPO / "configs" / "pretrain_tiny.yaml"
VCR_CONFIG = REPO / "configs" / "finetune_vcr_tiny.yaml"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """40 images (32 train, ids '0'..'39' in TSV order), 16-d features, 5 Karpathy captions each, VCR lines."""
    from interbert.synthetic import generate

    out = tmp_path_factory.mktemp("clean")
    generate(out, images=40, seed=0, feature_dim=16, num_classes=8, workers=1, render_images=False)
    return out


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("INTERBERT_DEBUG", raising=False)  # errors must print as one line, not re-raise


# ------------------------------------------------------------------------------------------ building
@dataclass
class Inputs:
    """What a case hands to the commands, and what their messages must name."""

    captions: Path | None = None
    features: Path | None = None
    vcr: Path | None = None
    images_root: Path | None = None
    needles: list[str] = field(default_factory=list)  # each must appear in the error output
    train_overrides: list[str] = field(default_factory=list)


def _copy(clean: Path, d: Path) -> Inputs:
    (d / "captions.json").write_bytes((clean / "captions.json").read_bytes())
    (d / "regions.tsv").write_bytes((clean / "regions.tsv").read_bytes())
    return Inputs(d / "captions.json", d / "regions.tsv")


def _tsv_lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write_tsv_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def _line_of(lines: list[bytes], image_id: str) -> int:
    """The 1-based line of ``image_id`` in a TSV."""
    return next(n for n, line in enumerate(lines, 1) if line.split(b"\t", 1)[0] == image_id.encode())


def _edit_tsv_field(inputs: Inputs, image_id: str, column: int, edit: Callable[[bytes], bytes]) -> int:
    lines = _tsv_lines(inputs.features)
    n = _line_of(lines, image_id)
    fields = lines[n - 1].split(b"\t")
    fields[column] = edit(fields[column])
    lines[n - 1] = b"\t".join(fields)
    _write_tsv_lines(inputs.features, lines)
    return n


def _karpathy(inputs: Inputs) -> dict:
    return json.loads(inputs.captions.read_text())


def _save_karpathy(inputs: Inputs, data: dict, indent: int | None = None) -> None:
    inputs.captions.write_text(json.dumps(data, indent=indent))


def _rewrite_regions(inputs: Inputs, image_id: str, change: Callable[[Regions], Regions]) -> None:
    store = open_features(inputs.features)
    items = [(i, change(r) if i == image_id else r) for i, r in store.items()]
    write_tsv(inputs.features, items, with_class_probs=True)


# ------------------------------------------------------------------------------------------ the corpus
def truncated_base64_in_tsv(clean, d):
    inputs = _copy(clean, d)
    n = _edit_tsv_field(inputs, "7", 5, lambda b64: b64[:-5])  # the features field, cut mid-character
    inputs.needles = [f"regions.tsv:{n}: image 7: field 'features'"]
    return inputs


def num_boxes_disagrees_with_data(clean, d):
    inputs = _copy(clean, d)
    n = _edit_tsv_field(inputs, "12", 3, lambda count: str(int(count) + 1).encode())
    inputs.needles = [f"regions.tsv:{n}: image 12:"]
    return inputs


def num_boxes_wrong_on_the_first_line(clean, d):
    inputs = _copy(clean, d)
    _edit_tsv_field(inputs, "0", 3, lambda count: str(int(count) + 1).encode())
    inputs.needles = ["regions.tsv:1: image 0:"]
    return inputs


def nan_features(clean, d):
    inputs = _copy(clean, d)
    _rewrite_regions(inputs, "5", lambda r: Regions(np.where(np.arange(r.features.size).reshape(r.features.shape) % 7,
                                                             r.features, np.nan), r.boxes, r.image_w, r.image_h,
                                                    r.class_probs))
    inputs.needles = ["regions.tsv: image '5': non-finite values (NaN or inf)"]
    return inputs


def missing_column_in_tsv(clean, d):
    inputs = _copy(clean, d)
    lines = _tsv_lines(inputs.features)
    n = _line_of(lines, "9")
    lines[n - 1] = lines[n - 1].rsplit(b"\t", 1)[0]  # the cls_prob column gone
    _write_tsv_lines(inputs.features, lines)
    inputs.needles = [f"regions.tsv:{n}:", "6 tab-separated fields, expected 7"]
    return inputs


def wrong_feature_dim_in_tsv(clean, d):
    inputs = _copy(clean, d)
    _rewrite_regions(inputs, "20", lambda r: Regions(r.features[:, :15], r.boxes, r.image_w, r.image_h, r.class_probs))
    lines = _tsv_lines(inputs.features)
    inputs.needles = [f"regions.tsv:{_line_of(lines, '20')}: image 20:"]
    return inputs


def wrong_feature_dim_in_npz(clean, d):
    # the npz reader does not compare sizes across images: the check must
    inputs = _copy(clean, d)
    store = open_features(inputs.features)
    items = [(i, Regions(r.features[:, :15], r.boxes, r.image_w, r.image_h, r.class_probs) if i == "20" else r)
             for i, r in store.items()]
    write_npz_folder(d / "regions_npz", items)
    inputs.features = d / "regions_npz"
    inputs.needles = ["regions_npz: image '20': 15-d features, but the store's are 16-d"]
    return inputs


def empty_feature_file(clean, d):
    inputs = _copy(clean, d)
    inputs.features.write_bytes(b"")
    inputs.needles = ["regions.tsv: no feature lines"]
    return inputs


def empty_caption_file(clean, d):
    inputs = _copy(clean, d)
    inputs.captions.write_bytes(b"")
    inputs.needles = ["captions.json: empty file"]
    return inputs


def truncated_json(clean, d):
    inputs = _copy(clean, d)
    data = _karpathy(inputs)
    _save_karpathy(inputs, data, indent=1)
    text = inputs.captions.read_text()
    inputs.captions.write_text(text[: len(text) // 2])
    line = text[: len(text) // 2].count("\n") + 1
    inputs.needles = [f"captions.json:{line}: malformed JSON", "truncated?"]
    return inputs


def missing_sentences(clean, d):
    inputs = _copy(clean, d)
    data = _karpathy(inputs)
    del data["images"][3]["sentences"]
    _save_karpathy(inputs, data)
    inputs.needles = ["captions.json: images[3] (id '3'): no 'sentences'"]
    return inputs


def first_image_without_sentences(clean, d):
    # was "unknown caption format": the layout is sniffed from the first image
    inputs = _copy(clean, d)
    data = _karpathy(inputs)
    del data["images"][0]["sentences"]
    _save_karpathy(inputs, data)
    inputs.needles = ["captions.json: images[0] (id '0'): no 'sentences'"]
    return inputs


def sentences_as_string(clean, d):
    inputs = _copy(clean, d)
    data = _karpathy(inputs)
    data["images"][4]["sentences"] = "A red cube left of a blue ring."
    _save_karpathy(inputs, data)
    inputs.needles = ["captions.json: images[4] (id '4'): 'sentences' is a string"]
    return inputs


def sentence_without_raw(clean, d):
    inputs = _copy(clean, d)
    data = _karpathy(inputs)
    del data["images"][6]["sentences"][2]["raw"]
    _save_karpathy(inputs, data)
    inputs.needles = ["captions.json: images[6] (id '6'): sentences[2] has no 'raw'"]
    return inputs


def non_utf8_in_captions(clean, d):
    inputs = _copy(clean, d)
    _save_karpathy(inputs, _karpathy(inputs), indent=1)
    raw = inputs.captions.read_bytes()
    at = raw.index(b'"raw": "', raw.index(b'"filename": "8.png"')) + len(b'"raw": "')
    inputs.captions.write_bytes(raw[:at] + b"caf\xe9 " + raw[at:])  # Latin-1 'é'
    line = raw[:at].count(b"\n") + 1
    inputs.needles = [f"captions.json:{line}: not UTF-8 text: byte 0xe9"]
    return inputs


def non_utf8_in_caption_lines(clean, d):
    inputs = _copy(clean, d)
    captions = [{"image_id": str(n), "caption": f"picture {n}", "split": "train"} for n in range(32)]
    lines = [json.dumps(c).encode() for c in captions]
    lines[2] = lines[2].replace(b"picture", b"pictur\xe9")
    inputs.captions = d / "captions.jsonl"
    inputs.captions.write_bytes(b"\n".join(lines) + b"\n")
    inputs.needles = ["captions.jsonl:3: not UTF-8 text: byte 0xe9"]
    return inputs


def non_utf8_in_tsv(clean, d):
    inputs = _copy(clean, d)
    n = _edit_tsv_field(inputs, "11", 5, lambda b64: b64[:40] + b"\xff" + b64[41:])
    inputs.needles = [f"regions.tsv:{n}:", "11"]
    return inputs


def caption_whose_image_has_no_features(clean, d):
    # training is possible (the image's captions are skipped), but never silently
    inputs = _copy(clean, d)
    lines = _tsv_lines(inputs.features)
    del lines[_line_of(lines, "9") - 1]
    _write_tsv_lines(inputs.features, lines)
    inputs.needles = ["'9'"]
    return inputs


def duplicate_image_id_in_captions(clean, d):
    inputs = _copy(clean, d)
    data = _karpathy(inputs)
    data["images"][5]["filename"] = data["images"][4]["filename"]
    _save_karpathy(inputs, data)
    inputs.needles = ["captions.json: images[5] (id '4'): image id '4' is also images[4]"]
    return inputs


def duplicate_image_id_in_tsv(clean, d):
    inputs = _copy(clean, d)
    n = _edit_tsv_field(inputs, "6", 0, lambda _: b"5")
    inputs.needles = [f"regions.tsv:{n}: image id '5' appears twice"]
    return inputs


def malformed_caption_line(clean, d):
    inputs = _copy(clean, d)
    rows = [json.dumps({"image_id": str(n), "caption": f"picture {n}", "split": "train"}) for n in range(32)]
    rows[3] = json.dumps({"image_id": "3", "text": "no caption key", "split": "train"})
    inputs.captions = d / "captions.jsonl"
    inputs.captions.write_text("\n".join(rows) + "\n")
    inputs.needles = ["captions.jsonl:4: expected an object with 'image_id' and a 'caption' string"]
    return inputs


def malformed_vcr_line(clean, d):
    inputs = _copy(clean, d)
    lines = (clean / "vcr" / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]
    inputs.vcr = d / "train.jsonl"
    inputs.vcr.write_text("\n".join(lines) + "\n")
    inputs.images_root = clean / "images"
    inputs.needles = ["train.jsonl:3: not valid JSON"]
    return inputs


def vcr_image_without_features(clean, d):
    inputs = _copy(clean, d)
    lines = _tsv_lines(inputs.features)
    first = json.loads((clean / "vcr" / "train.jsonl").read_text().splitlines()[0])
    image_id = Path(first["img_fn"]).stem
    del lines[_line_of(lines, image_id) - 1]
    _write_tsv_lines(inputs.features, lines)
    inputs.vcr, inputs.images_root = clean / "vcr" / "train.jsonl", clean / "images"
    inputs.needles = ["train.jsonl:1", f"image id {image_id!r}"]
    return inputs


def missing_caption_file(clean, d):
    inputs = _copy(clean, d)
    inputs.captions = d / "no_such_captions.json"
    inputs.needles = ["no_such_captions.json"]
    return inputs


@dataclass
class Case:
    build: Callable[[Path, Path], Inputs]
    check_exit: int = 1
    train_exit: int = 1
    # what training logs when it legitimately goes on (a warning with a count)
    train_warning: str | None = None

    @property
    def name(self) -> str:
        return self.build.__name__


CASES = [
    Case(truncated_base64_in_tsv),
    Case(num_boxes_disagrees_with_data),
    Case(num_boxes_wrong_on_the_first_line),
    Case(nan_features),
    Case(missing_column_in_tsv),
    Case(wrong_feature_dim_in_tsv),
    Case(wrong_feature_dim_in_npz),
    Case(empty_feature_file),
    Case(empty_caption_file),
    Case(truncated_json),
    Case(missing_sentences),
    Case(first_image_without_sentences),
    Case(sentences_as_string),
    Case(sentence_without_raw),
    Case(non_utf8_in_captions),
    Case(non_utf8_in_caption_lines),
    Case(non_utf8_in_tsv),
    Case(caption_whose_image_has_no_features, check_exit=0, train_exit=0, train_warning="skipping 5 of 160 captions"),
    Case(duplicate_image_id_in_captions),
    Case(duplicate_image_id_in_tsv),
    Case(malformed_caption_line),
    Case(malformed_vcr_line),
    Case(vcr_image_without_features),
    Case(missing_caption_file, check_exit=2, train_exit=2),
]


def _params(cases):
    return [pytest.param(c, id=c.name) for c in cases]


# ------------------------------------------------------------------------------------------ commands
def check_args(inputs: Inputs) -> list[str]:
    args = ["data", "check", "--features", str(inputs.features)]
    if inputs.captions is not None and inputs.vcr is None:
        args += ["--captions", str(inputs.captions)]
    if inputs.vcr is not None:
        args += ["--vcr", str(inputs.vcr), "--images-root", str(inputs.images_root)]
    return args


def train_args(inputs: Inputs, out: Path) -> list[str]:
    common = [f"train.output_dir={out}", "train.max_steps=1", "train.batch_size=8", "train.progress_bar=false",
              "train.tensorboard=false", "data.vocab_size=200"]
    if inputs.vcr is not None:
        return ["finetune", "vcr", "--config", str(VCR_CONFIG), f"data.train={inputs.vcr}",
                f"data.images_root={inputs.images_root}", f"data.features={inputs.features}", "data.max_regions=8",
                *common]
    return ["pretrain", "--config", str(PRETRAIN_CONFIG), f"data.captions={inputs.captions}",
            f"data.features={inputs.features}", *common, *inputs.train_overrides]


def _assert_named(output: str, inputs: Inputs, code: int, expected: int, what: str) -> None:
    assert "Traceback" not in output, f"{what}: a traceback\n{output}"
    assert code == expected, f"{what}: exit {code}, expected {expected}\n{output}"
    for needle in inputs.needles:
        assert needle in output, f"{what}: {needle!r} is not named\n{output}"


def _error_line(err: str) -> str:
    """The one line the CLI prints for a refused run (the last line of stderr)."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), f"no 'error: ...' line at the end of stderr:\n{err}"
    return lines[-1]


@pytest.mark.parametrize("case", _params(CASES))
def test_corrupt_input_is_named_by_check_and_refused_by_training(case, clean, tmp_path, capsys, caplog):
    inputs = case.build(clean, tmp_path)
    capsys.readouterr()
    code = main(check_args(inputs))
    out, err = capsys.readouterr()
    _assert_named(out + err, inputs, code, case.check_exit, "data check")
    if case.check_exit == 1:
        assert "FAILED: the data cannot train" in out or _error_line(err)

    caplog.set_level(logging.WARNING)
    code = main(train_args(inputs, tmp_path / "run"))
    out, err = capsys.readouterr()
    if case.train_exit == 0:
        _assert_named(out + err + caplog.text, inputs, code, 0, "training")
        assert case.train_warning in caplog.text, caplog.text
    else:
        _assert_named(_error_line(err), inputs, code, case.train_exit, "training")
        assert not (tmp_path / "run" / "checkpoint.pt").exists()  # refused before training started


def test_the_check_reads_past_every_bad_entry_and_image_at_once(clean, tmp_path, capsys):
    # several faults in one dataset: all are reported, with their places, in one run
    inputs = _copy(clean, tmp_path)
    data = _karpathy(inputs)
    data["images"][4]["sentences"] = "a string"
    del data["images"][6]["sentences"][2]["raw"]
    _save_karpathy(inputs, data)
    _rewrite_regions(inputs, "5", lambda r: Regions(np.full_like(r.features, np.nan), r.boxes, r.image_w, r.image_h,
                                                    r.class_probs))
    line = _edit_tsv_field(inputs, "7", 5, lambda b64: b64[:-5])
    code = main(check_args(inputs))
    out = capsys.readouterr().out
    assert code == 1
    assert "error: 2 malformed entries" in out and "images[4] (id '4')" in out and "images[6] (id '6')" in out
    assert "error: 2 of 39 images cannot train" in out  # image 4 is not used: its entry is malformed
    assert f"regions.tsv:{line}: image 7:" in out and "image '5': non-finite" in out


def test_missing_settings_name_the_config_and_key(clean, tmp_path, capsys):
    code = main(["pretrain", "--config", str(PRETRAIN_CONFIG), f"data.captions={clean / 'captions.json'}"])
    assert code == 2
    assert _error_line(capsys.readouterr().err) == (
        f"error: {PRETRAIN_CONFIG}: data.features is required (pass data.features=PATH)")
    for argv, key in (
        (["finetune", "retrieval", "--config", str(REPO / "configs" / "finetune_retrieval_tiny.yaml")], "data.captions and data.features are"),
        (["finetune", "vcr", "--config", str(VCR_CONFIG)], "data.train is"),
        (["finetune", "text", "--config", str(REPO / "configs" / "finetune_text_tiny.yaml")], "data.train is"),
        (["pretrain", "--config", str(PRETRAIN_CONFIG), f"data.captions={clean / 'captions.json'}",
          f"data.features={clean / 'regions.tsv'}", f"model.from_checkpoint={tmp_path}"], "model.from_checkpoint="),
    ):
        assert main(argv) == 2, argv
        assert key in _error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------ as a user runs it
# A real process costs seconds (importing torch), so four runs: one case through both commands, two more
# through one each; the in-process runs above cover the whole corpus.
SUBPROCESS_RUNS = [("truncated_base64_in_tsv", "check"), ("truncated_base64_in_tsv", "train"),
                   ("sentences_as_string", "train"), ("non_utf8_in_captions", "check")]


def _interbert(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "INTERBERT_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "interbert.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("name, command", SUBPROCESS_RUNS, ids=[f"{n}-{c}" for n, c in SUBPROCESS_RUNS])
def test_corrupt_input_in_a_real_process(name, command, clean, tmp_path):
    case = next(c for c in CASES if c.name == name)
    inputs = case.build(clean, tmp_path)
    if command == "check":
        run = _interbert(*check_args(inputs))
        _assert_named(run.stdout + run.stderr, inputs, run.returncode, case.check_exit, "data check")
    else:
        run = _interbert(*train_args(inputs, tmp_path / "run"))
        assert "Traceback" not in run.stderr, run.stderr
        _assert_named(_error_line(run.stderr), inputs, run.returncode, case.train_exit, "training")
