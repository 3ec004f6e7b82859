"""Text-only tasks: GLUE readers on the real files, metrics, the split, the CLI, and a pretrained text path kept."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import REPO, shared_path

from interbert.cli import main
from interbert.config import preset
from interbert.data.errors import DataFormatError
from interbert.data.glue import classification_metrics, read_glue, split_examples
from interbert.modeling import InterBertForPreTraining
from interbert.loading import load_model

MICRO = ("hidden_size: 32, num_attention_heads: 2, intermediate_size: 64, image_num_attention_heads: 2, "
         "image_intermediate_size: 64, pooled_size: 32, num_single_stream_layers: 1, num_text_stream_layers: 1, "
         "num_image_stream_layers: 1")


def test_real_sst2_and_mrpc_are_recognised_and_read_whole():
    task, sst2 = read_glue(shared_path("data", "glue", "SST-2", "dev.tsv"))
    assert task.name == "sst2" and len(sst2) == 872 and sst2[0].text_b is None
    assert sst2[0].text_a == "it 's a charming and often affecting journey ." and sst2[0].label == 1
    task, mrpc = read_glue(shared_path("data", "glue", "MRPC", "train.tsv"))  # starts with a byte-order mark
    assert task.name == "mrpc" and task.f1 and len(mrpc) == 3668
    assert mrpc[0].label == 1 and mrpc[0].text_a.startswith("Amrozi accused his brother, whom he called \"the witness\"")
    assert mrpc[1].label == 0 and mrpc[1].source.endswith("train.tsv:3")
    _, dev = read_glue(shared_path("data", "glue", "MRPC", "dev.tsv"))
    assert len(dev) == 408 and dev[0].text_b.startswith('"The foodservice pie business')  # an unbalanced quote kept


@pytest.mark.parametrize(
    "content, message",
    [
        ("sentence\tlabel\ngood\t1\nbad\n", "1 tab-separated fields, the header has 2"),
        ("sentence\tlabel\ngood\t1\nbad\tmaybe\n", "label 'maybe' is not one of"),
        ("text\tscore\nfine\t1\n", "matches no known task"),
        ("", "no header line"),
        (b"sentence\tlabel\ngood\t1\nna\xefve\t0\n", "bad.tsv:3: not UTF-8 text: byte 0xef at column 3"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataFormatError, match=re.escape(message)) as info:
        read_glue(path)
    assert str(info.value).startswith(f"{path}:")


def test_accuracy_and_f1_of_the_positive_class():
    metrics = classification_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], f1=True)
    assert metrics["accuracy"] == pytest.approx(60.0)
    assert metrics["f1"] == pytest.approx(100 * 2 * 2 / (3 + 3))  # tp 2, predicted 3, actual 3


def test_seeded_split_is_fixed_disjoint_and_complete(tmp_path):
    path = tmp_path / "s.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(50)))
    _, examples = read_glue(path)
    train, test = split_examples(examples, 0.3, seed=0)
    again_train, again_test = split_examples(examples, 0.3, seed=0)
    assert [e.text_a for e in test] == [e.text_a for e in again_test] and len(test) == 15
    assert {e.text_a for e in train} | {e.text_a for e in test} == {e.text_a for e in examples}
    assert not {e.text_a for e in train} & {e.text_a for e in test}


def test_finetune_and_evaluate_text_from_the_command_line(tmp_path):
    rows = [("the cube is red", "a red cube", 1), ("the ball is blue", "a green cone", 0)] * 10
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    (tmp_path / "train.tsv").write_text(header + "".join(f"{y}\t{i}\t{i + 100}\t{a}\t{b}\n" for i, (a, b, y) in enumerate(rows)))
    out = tmp_path / "run"
    assert main(["finetune", "text", "--config", str(REPO / "configs" / "finetune_text_tiny.yaml"),
                 f"data.train={tmp_path / 'train.tsv'}", f"data.dev={tmp_path / 'train.tsv'}", "data.vocab_size=60",
                 f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=4", "train.progress_bar=false",
                 "model.overrides={" + MICRO + "}"]) == 0
    trained = json.loads((out / "metrics.json").read_text())
    assert set(trained) == {"accuracy", "f1"}
    card = (out / "model" / "README.md").read_text()  # the folder explains itself: data, steps, results
    assert "# InterBERT: InterBertForSequenceClassification" in card and f"train: `{tmp_path / 'train.tsv'}`" in card
    assert "optimizer updates: 2" in card and f"| accuracy | {trained['accuracy']:.4g} |" in card
    assert "| loss |" in card and 'task="sequence_classification"' in card
    assert main(["evaluate", "text", "--model", str(out / "model"), "--data", str(tmp_path / "train.tsv"),
                 "--out", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["task"] == "mrpc" and evaluated["examples"] == 20
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"]) and evaluated["f1"] == pytest.approx(trained["f1"])


def test_a_pretraining_checkpoint_keeps_its_text_path_as_a_classifier(tmp_path):
    config = preset("tiny", vocab_size=40, region_feature_size=8, hidden_size=32, num_attention_heads=2,
                    intermediate_size=64, image_num_attention_heads=2, image_intermediate_size=64, pooled_size=32)
    pretrained = InterBertForPreTraining(config).eval()
    pretrained.save_pretrained(tmp_path / "pre")
    classifier = load_model(tmp_path / "pre", task="sequence_classification", num_labels=3).eval()
    assert classifier.config.num_labels == 3
    ids = torch.tensor([[2, 7, 9, 11, 3]])
    with torch.no_grad():
        expected = pretrained.interbert(input_ids=ids).text_sequence
        got = classifier.interbert(input_ids=ids).text_sequence
        assert torch.equal(expected, got)
        assert classifier(input_ids=ids).logits.shape == (1, 3)
