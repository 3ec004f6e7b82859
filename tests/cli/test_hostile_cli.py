"""Hostile inputs and hostile files through the real CLI (issue 23: the command-line, data and training cases).

Each case ends in one ``error:`` line naming the file, key or id (or a warning with a count where the data can
still be used), the exit code of its error path (2 usage, 1 data), no traceback, and no change to what was
there before the failed command: every file of the folder it pointed at hashes the same afterwards.
Tiny synthetic data and one-step runs keep each case to a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from interbert.cli import main
from interbert.data.features import Regions, open_features, write_tsv

PRETRAIN_CONFIG = REPO / "configs" / "pretrain_tiny.yaml"
RUN_SETTINGS = ["train.max_steps=1", "train.batch_size=8", "train.progress_bar=false", "train.tensorboard=false",
                "train.save_every=1", "data.vocab_size=200"]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("INTERBERT_DEBUG", raising=False)  # errors must print as one line, not re-raise


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """40 images, 16-d features, 5 Karpathy captions each (as tests/data/test_corrupt_inputs.py)."""
    from interbert.synthetic import generate

    out = tmp_path_factory.mktemp("clean")
    generate(out, images=40, seed=0, feature_dim=16, num_classes=8, workers=1, render_images=False)
    return out


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """Another dataset of the same shape (another seed): other captions, other features."""
    from interbert.synthetic import generate

    out = tmp_path_factory.mktemp("other")
    generate(out, images=24, seed=7, feature_dim=16, num_classes=8, workers=1, render_images=False)
    return out


def pretrain_args(data: Path, out: Path, *more: str) -> list[str]:
    return ["pretrain", "--config", str(PRETRAIN_CONFIG), f"data.captions={data / 'captions.json'}",
            f"data.features={data / 'regions.tsv'}", f"train.output_dir={out}", *RUN_SETTINGS, *more]


@pytest.fixture(scope="module")
def finished_run(clean, tmp_path_factory) -> Path:
    """A pretraining run (one step) with its checkpoint, tokenizer and model: what a failed command must not touch."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(pretrain_args(clean, out)) == 0
    assert (out / "checkpoint.pt").is_file() and (out / "tokenizer" / "vocab.txt").is_file()
    return out


@pytest.fixture(scope="module")
def model_64d(clean, tmp_path_factory) -> Path:
    """A saved pretraining model for 64-d region features, with a tokenizer (the clean store's are 16-d)."""
    from interbert.config import preset
    from interbert.data.captions import read_captions
    from interbert.data.tokenize import train_wordpiece
    from interbert.modeling import InterBertForPreTraining

    folder = tmp_path_factory.mktemp("models") / "m64"
    tokenizer = train_wordpiece([c.text for c in read_captions(clean / "captions.json")], folder, vocab_size=200)
    model = InterBertForPreTraining(preset("tiny", vocab_size=len(tokenizer), region_feature_size=64,
                                           num_region_classes=8))
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


# ------------------------------------------------------------------------------------------ helpers
def hashes(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones too) -> its SHA-256."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(code: int, expected: int, err: str, *needles: str) -> str:
    """The one ``error:`` line (the last of stderr), after checking the exit code and that no traceback was shown."""
    assert "Traceback" not in err, err
    assert code == expected, f"exit {code}, expected {expected}\n{err}"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], f"{needle!r} is not named in {errors[0]!r}"
    return errors[0]


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------ tracebacks
def test_a_symlink_loop_given_as_captions_is_one_line(clean, tmp_path, capsys):
    loop = tmp_path / "LOOP"
    loop.symlink_to(loop)
    code, _, err = run_cli(capsys, ["data", "check", "--captions", str(loop), "--features", str(clean / "regions.tsv")])
    one_error(code, 2, err, str(loop), "symbolic links")


def test_a_name_too_long_is_one_line(clean, tmp_path, capsys):
    long_name = tmp_path / ("x" * 300 + ".json")
    code, _, err = run_cli(capsys, ["data", "check", "--captions", str(long_name),
                                    "--features", str(clean / "regions.tsv")])
    one_error(code, 2, err, "x" * 50)


@pytest.mark.parametrize("override, key", [
    ("train.learning_rate=.nan", "train.learning_rate"),
    ("train.weight_decay=-.inf", "train.weight_decay"),
    ("model.overrides.hidden_dropout_prob=.nan", "model.overrides.hidden_dropout_prob"),
    ("data.hard_ratio=.inf", "data.hard_ratio"),
    ("train.lr_multipliers.interbert.embeddings.*=.nan", "train.lr_multipliers"),
])
def test_settings_refuse_nan_and_inf_naming_the_key(override, key, clean, finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = hashes(run)
    code, _, err = run_cli(capsys, pretrain_args(clean, run, override))
    one_error(code, 2, err, str(PRETRAIN_CONFIG), key, "finite")
    assert hashes(run) == before


BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def _bomb_under_overrides() -> str:
    lines = BOMB.splitlines()
    nested = "\n".join("    " + line for line in lines)
    return PRETRAIN_CONFIG.read_text() + "\nbombs:\n" + nested + "\n"


@pytest.mark.parametrize("where", ["top level", "model.overrides"])
def test_a_yaml_alias_bomb_is_refused_quickly_naming_the_file(where, tmp_path, capsys):
    config = tmp_path / "bomb.yaml"
    if where == "top level":
        config.write_text(BOMB)
    else:  # the anchors in a key of their own, the expansion under model.overrides
        config.write_text(_bomb_under_overrides().replace("bombs:", "x:") + "model:\n  overrides:\n    hidden_act: *i\n")
    start = time.perf_counter()
    code, _, err = run_cli(capsys, ["pretrain", "--config", str(config)])
    one_error(code, 2, err, str(config), "aliases expand it to more than")
    assert time.perf_counter() - start < 10
    assert len(err) < 1000


def test_an_alias_bomb_in_an_override_is_refused(tmp_path, capsys):
    bomb = "{" + ", ".join(line.replace(":", ":", 1) for line in BOMB.splitlines()) + "}"
    code, _, err = run_cli(capsys, ["pretrain", f"model.overrides.hidden_act={bomb}"])
    one_error(code, 2, err, "override", "aliases expand it to more than")


def test_a_recursive_alias_is_refused(tmp_path, capsys):
    config = tmp_path / "loop.yaml"
    config.write_text("train: &t {learning_rate: 1.0e-4, again: *t}\n")
    code, _, err = run_cli(capsys, ["pretrain", "--config", str(config)])
    one_error(code, 2, err, str(config), "an alias refers to a node that contains it")


def test_a_huge_wrong_value_is_quoted_short(capsys):
    # 20,000 values where a whole number belongs: the message quotes the start of it, not all of it
    huge = "[" + ", ".join(["123456789"] * 20_000) + "]"
    code, _, err = run_cli(capsys, ["pretrain", f"data.max_tokens={huge}"])
    line = one_error(code, 2, err, "data.max_tokens")
    assert len(line) < 400


def test_evaluate_retrieval_with_features_of_another_size_names_store_and_dims(clean, model_64d, capsys):
    code, _, err = run_cli(capsys, ["evaluate", "retrieval", "--model", str(model_64d), "--captions",
                                    str(clean / "captions.json"), "--features", str(clean / "regions.tsv"),
                                    "--split", "test", "--zero-shot"])
    one_error(code, 2, err, "regions.tsv", "64-d", "16-d", str(model_64d))


def test_a_truncated_safetensors_is_one_line_naming_it(clean, model_64d, tmp_path, capsys):
    folder = tmp_path / "truncated"
    shutil.copytree(model_64d, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = hashes(folder)
    code, _, err = run_cli(capsys, ["evaluate", "retrieval", "--model", str(folder), "--captions",
                                    str(clean / "captions.json"), "--features", str(clean / "regions.tsv"),
                                    "--zero-shot"])
    one_error(code, 1, err, str(weights))
    assert hashes(folder) == before


class _RunsCode:
    """A pickle that would create ``marker`` when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_with_code_as_weights_is_refused_naming_it(clean, model_64d, tmp_path, capsys):
    folder, marker = tmp_path / "evil", tmp_path / "PWNED"
    shutil.copytree(model_64d, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _RunsCode(marker)}))
    code, _, err = run_cli(capsys, ["evaluate", "retrieval", "--model", str(folder), "--captions",
                                    str(clean / "captions.json"), "--features", str(clean / "regions.tsv"),
                                    "--zero-shot"])
    one_error(code, 1, err, str(folder / "pytorch_model.bin"), "pickled objects other than tensors")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "pickle with code"])
def test_a_damaged_resume_checkpoint_is_one_line_and_the_run_is_unchanged(damage, clean, finished_run, tmp_path,
                                                                          capsys):
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(finished_run, run)
    checkpoint = run / "checkpoint.pt"
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    else:
        checkpoint.write_bytes(pickle.dumps({"format": _RunsCode(marker)}))
    before = hashes(run)
    code, _, err = run_cli(capsys, [*pretrain_args(clean, run, "train.max_steps=2"), "--resume"])
    one_error(code, 1, err, str(checkpoint), "cannot resume")
    assert hashes(run) == before and not marker.exists()


def test_convert_into_a_regular_file_is_one_line(clean, tmp_path, capsys):
    target = tmp_path / "store"
    target.write_bytes(b"not a store")
    code, _, err = run_cli(capsys, ["data", "convert", str(clean / "regions.tsv"), str(target)])
    one_error(code, 2, err, str(target), "not a store folder")
    assert target.read_bytes() == b"not a store"


# ------------------------------------------------------------------------------------------ damage
def test_a_run_refused_before_training_leaves_the_run_folder_resumable(clean, other, finished_run, model_64d,
                                                                       tmp_path, capsys):
    # other captions train another vocabulary; the run is refused after the vocabulary was built (the
    # checkpoint it continues from expects 64-d features): the earlier run's tokenizer must stay, or its
    # --resume crashes with a size mismatch of the word embeddings
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = hashes(run)
    code, _, err = run_cli(capsys, pretrain_args(other, run, f"model.from_checkpoint={model_64d}"))
    one_error(code, 2, err, "64-d", "16-d")
    assert hashes(run) == before

    code, _, err = run_cli(capsys, [*pretrain_args(clean, run, "train.max_steps=2"), "--resume"])
    assert code == 0, err

    # the other captions' run itself, once it trains, writes its own vocabulary
    vocab_before = (run / "tokenizer" / "vocab.txt").read_bytes()
    assert main(pretrain_args(other, run)) == 0
    assert (run / "tokenizer" / "vocab.txt").read_bytes() != vocab_before


# ------------------------------------------------------------------------------------------ silent cases
def test_blank_captions_are_counted_by_check_and_skipped_by_training(clean, tmp_path, capsys, caplog):
    data = json.loads((clean / "captions.json").read_text())
    data["images"][2]["sentences"][1]["raw"] = ""
    data["images"][5]["sentences"][0]["raw"] = "   \t "
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps(data))
    code, out, err = run_cli(capsys, ["data", "check", "--captions", str(captions),
                                      "--features", str(clean / "regions.tsv")])
    assert code == 0 and "Traceback" not in err
    warning = next(line for line in out.splitlines() if "blank caption" in line)
    assert warning.startswith("warning: ") and str(captions) in warning and "2 blank captions" in warning
    assert "of image '2'" in warning and "of image '5'" in warning

    caplog.set_level(logging.WARNING)
    args = ["pretrain", "--config", str(PRETRAIN_CONFIG), f"data.captions={captions}",
            f"data.features={clean / 'regions.tsv'}", f"train.output_dir={tmp_path / 'run'}", *RUN_SETTINGS]
    code, _, err = run_cli(capsys, args)
    assert code == 0, err
    assert "skipping" in caplog.text and "2 blank captions" in caplog.text and str(captions) in caplog.text


def test_convert_warns_of_nan_features_with_count_and_ids(clean, tmp_path, capsys):
    store = open_features(clean / "regions.tsv")
    poisoned = {"3", "17"}

    def poison(r: Regions) -> Regions:
        features = r.features.copy()
        features[0, 0] = np.nan
        return Regions(features, r.boxes, r.image_w, r.image_h, r.class_probs)

    write_tsv(tmp_path / "nan.tsv", [(i, poison(r) if i in poisoned else r) for i, r in store.items()],
              with_class_probs=True)
    code, out, err = run_cli(capsys, ["data", "convert", str(tmp_path / "nan.tsv"), str(tmp_path / "store")])
    assert code == 0 and "Traceback" not in err
    warning = next(line for line in err.splitlines() if line.startswith("warning:"))
    assert "2 image(s) with non-finite" in warning and "'3'" in warning and "'17'" in warning
    assert str(tmp_path / "store") in warning


def test_a_different_source_into_an_existing_store_is_refused(clean, other, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["data", "convert", str(clean / "regions.tsv"), str(store)]) == 0
    before = hashes(store)
    code, _, err = run_cli(capsys, ["data", "convert", str(other / "regions.tsv"), str(store)])
    one_error(code, 2, err, str(store), str(clean / "regions.tsv"), str(other / "regions.tsv"))
    assert hashes(store) == before

    # the same source again (also as a copy elsewhere): nothing to do, as before
    copy = tmp_path / "copy.tsv"
    shutil.copyfile(clean / "regions.tsv", copy)
    code, out, err = run_cli(capsys, ["data", "convert", str(copy), str(store)])
    assert code == 0 and "wrote 0 images, 40 already there" in out, err
    assert hashes(store) == before


KILLED_WRITE = """
import sys, time
from pathlib import Path
from interbert.utils.files import atomic_path

with atomic_path(Path(sys.argv[1])) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"x" * 1_000_000)
        f.flush()
        print("writing", flush=True)
        time.sleep(120)  # killed here, mid-write
"""


def killed_write(target: Path) -> Path:
    """A real process killed (SIGKILL) while it writes ``target`` through the project's atomic writer:
    the temporary file it leaves, named as the project names them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, str(target)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    left = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.tmp-")]
    assert len(left) == 1 and left[0].stat().st_size == 1_000_000
    return left[0]


def test_a_killed_checkpoint_write_is_removed_at_the_next_run(clean, finished_run, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    leftover = killed_write(run / "checkpoint.pt")
    # a temporary of a process that still runs (this one) and a file that only looks alike stay
    alive = run / f".history.json.tmp-{os.getpid()}-1"
    alive.write_bytes(b"in progress")
    lookalike = run / ".notes.tmp-mine"
    lookalike.write_bytes(b"keep")
    caplog.set_level(logging.WARNING)
    code, _, err = run_cli(capsys, [*pretrain_args(clean, run, "train.max_steps=2"), "--resume"])
    assert code == 0, err
    assert not leftover.exists() and alive.exists() and lookalike.exists()
    assert "removed 1 temporary file(s)" in caplog.text and str(run) in caplog.text


def test_a_killed_chunk_write_is_removed_at_the_next_convert(clean, tmp_path, capsys, caplog):
    store = tmp_path / "store"
    assert main(["data", "convert", str(clean / "regions.tsv"), str(store), "--chunk-size", "16"]) == 0
    before = hashes(store)
    leftover = killed_write(store / "chunk-00003.features.npy")
    caplog.set_level(logging.WARNING)
    code, out, err = run_cli(capsys, ["data", "convert", str(clean / "regions.tsv"), str(store)])
    assert code == 0 and "already there" in out, err
    assert not leftover.exists() and hashes(store) == before
    assert "removed 1 temporary file(s)" in caplog.text
