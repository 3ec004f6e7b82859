"""Same seed, same thread count, fresh processes: the same vocabulary, losses and weights (issue #13:
two ``make demo`` runs must print the same table). Each check runs its work in two subprocesses, since
what differed between runs (the WordPiece trainer's hash order, torch's per-process default seed) is
the same within one process."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from interbert.data.tokenize import SPECIAL_TOKENS, load_tokenizer, wordpiece_vocabulary

REPO = Path(__file__).resolve().parents[2]
COLOURS = ["red", "blue", "green", "gray", "brown", "pink", "cyan", "tan"]
SHAPES = ["cube", "ball", "cone", "disc", "ring", "star", "bowl", "vase"]
# every word about equally frequent: many merges tie, which the tokenizers trainer breaks in hash order
TEXTS = [f"a {c} {s} left of the {c2} {s2}." for (c, s), (c2, s2) in itertools.product(
    itertools.product(COLOURS, SHAPES), [("gold", "box"), ("teal", "cup")])]


def run_fresh(code: str, *args: str, hash_seed: int, threads: int = 1) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "PYTHONHASHSEED": str(hash_seed), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


VOCAB_SCRIPT = """
import json, sys
from interbert.data.tokenize import train_wordpiece
for size in (60, 120):
    train_wordpiece(json.loads(sys.argv[1]), f"{sys.argv[2]}/{size}", vocab_size=size, min_frequency=1)
"""


def test_wordpiece_vocabulary_is_byte_identical_across_processes(tmp_path):
    # before the fix each of 4 processes trained a different vocab.txt from these captions, at either size
    for n in range(2):
        run_fresh(VOCAB_SCRIPT, json.dumps(TEXTS), str(tmp_path / str(n)), hash_seed=n)
    for size in (60, 120):
        first, second = ((tmp_path / str(n) / str(size) / "vocab.txt").read_bytes() for n in range(2))
        assert first == second, size
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the folder BERT users expect
        assert (tmp_path / "0" / "60" / name).exists()


def test_wordpiece_vocabulary_keeps_the_bert_layout():
    vocab = wordpiece_vocabulary(TEXTS, 120, min_frequency=1)
    assert vocab[:len(SPECIAL_TOKENS)] == SPECIAL_TOKENS and len(vocab) == len(set(vocab)) <= 120
    chars = sorted({c for text in TEXTS for c in text.lower() if not c.isspace()})
    assert vocab[len(SPECIAL_TOKENS):len(SPECIAL_TOKENS) + len(chars)] == chars  # the alphabet, by code point
    rest = vocab[len(SPECIAL_TOKENS) + len(chars):]
    continuations = [t for t in rest if t.startswith("##") and len(t) == 3]
    assert continuations == sorted(continuations) and rest[:len(continuations)] == continuations
    # the most frequent words became whole tokens: "left", "of", "the" appear in every caption
    assert {"a", "left", "of", "the"} <= set(vocab)
    # ties: the order depends on the texts only, not on the order they come in
    assert wordpiece_vocabulary(list(reversed(TEXTS)), 120, min_frequency=1) == vocab


def test_trained_vocabulary_encodes_without_unknowns(tmp_path):
    from interbert.data.tokenize import train_wordpiece

    tokenizer = train_wordpiece(TEXTS, tmp_path / "tok", vocab_size=60, min_frequency=1)
    ids = tokenizer("A tan Ring left of the teal cup.")["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert load_tokenizer(tmp_path / "tok")("a tan ring")["input_ids"] == tokenizer("a tan ring")["input_ids"]
    # min_frequency stops merging: with a high one only the alphabet and its continuations remain
    assert all(len(t.removeprefix("##")) == 1 for t in wordpiece_vocabulary(TEXTS, 400, min_frequency=10**6)
               if t not in SPECIAL_TOKENS)


PRETRAIN_SCRIPT = """
import sys
from interbert.cli import main
data, out, threads = sys.argv[1], sys.argv[2], sys.argv[3]
sys.exit(main(["pretrain", "--config", sys.argv[4], f"data.captions={data}/captions.json",
               f"data.features={data}/regions.tsv", "data.vocab_size=120", f"train.output_dir={out}",
               "train.max_steps=6", "train.batch_size=8", "train.progress_bar=false", "train.tensorboard=false",
               "train.seed=3", f"threads={threads}", "model.overrides.itc_loss_weight=1.0",
               "model.overrides.embedding_size=32"]))
"""


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory) -> Path:
    from interbert.cli import main

    data = tmp_path_factory.mktemp("repro") / "data"
    assert main(["data", "synth", str(data), "--images", "40", "--feature-dim", "32", "--num-classes", "12",
                 "--no-images", "--workers", "1"]) == 0
    return data


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_pretraining_twice_gives_the_same_losses_and_weights(tiny_benchmark, tmp_path, threads):
    # the pretraining path of the demo: a vocabulary trained from the captions, a new model, TF-IDF
    # negatives, group masking, the loop; with the same seed and thread count every loss and weight repeats
    for n in range(2):
        run_fresh(PRETRAIN_SCRIPT, str(tiny_benchmark), str(tmp_path / str(n)), str(threads),
                  str(REPO / "configs" / "pretrain_tiny.yaml"), hash_seed=n, threads=threads)
    runs = [tmp_path / str(n) for n in range(2)]
    assert (runs[0] / "tokenizer" / "vocab.txt").read_bytes() == (runs[1] / "tokenizer" / "vocab.txt").read_bytes()
    histories = [json.loads((run / "loss_history.json").read_text()) for run in runs]
    assert len(histories[0]["loss"]) == 6 and histories[0] == histories[1]
    assert (runs[0] / "model" / "model.safetensors").read_bytes() == (runs[1] / "model" / "model.safetensors").read_bytes()
