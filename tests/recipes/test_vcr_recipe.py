"""VCR fine-tuning and evaluation: the Q->AR rule, the choice score from pretraining, the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO

from interbert.cli import main
from interbert.config import preset
from interbert.convert import retrieval_from_pretraining
from interbert.data import model_inputs
from interbert.data.vcr import VcrDataset, collate_choices, read_vcr
from interbert.modeling import InterBertForMultipleChoice, InterBertForPreTraining
from interbert.recipes.vcr import vcr_accuracies


def test_q_to_ar_counts_an_item_only_when_answer_and_rationale_are_right():
    answers, answer_labels = [0, 1, 2, 3, 0], [0, 1, 0, 3, 1]  # right: items 0, 1, 3
    rationales, rationale_labels = [1, 1, 2, 0, 0], [1, 0, 2, 0, 0]  # right: items 0, 2, 3, 4
    scores = vcr_accuracies(answers, answer_labels, rationales, rationale_labels)
    assert scores == {"Q->A": 60.0, "QA->R": 80.0, "Q->AR": 40.0}  # both right: items 0 and 3 only


def test_q_to_ar_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        vcr_accuracies([0, 1], [0, 1], [0], [0])


# A model small enough that the CLI test measures plumbing, not arithmetic.
MICRO = ("hidden_size: 32, num_attention_heads: 2, intermediate_size: 64, image_num_attention_heads: 2, "
         "image_intermediate_size: 64, pooled_size: 32, num_single_stream_layers: 1, num_text_stream_layers: 1, "
         "num_image_stream_layers: 1")


def _write_vcr(root, n: int = 8) -> None:
    """Scenes of two objects; the question asks which kind the tagged object is."""
    images = root / "images"
    images.mkdir(parents=True)
    kinds = ["cup", "dog", "car", "tree"]
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        a, b = rng.choice(4, size=2, replace=False)
        meta = {"boxes": [[0, 0, 30, 30, 0.9], [40, 40, 90, 90, 0.9]], "names": [kinds[a], kinds[b]],
                "width": 100, "height": 100}
        (images / f"{i}.json").write_text(json.dumps(meta))
        order = rng.permutation(4)
        answers = [[[0], "is", "a", kinds[k], "."] for k in order]
        lines.append(json.dumps({
            "question": ["What", "is", [0], "?"], "answer_choices": answers,
            "rationale_choices": [["it", "looks", "like", "one", str(k)] for k in range(4)],
            "answer_label": int(np.flatnonzero(order == a)[0]), "rationale_label": i % 4,
            "objects": meta["names"], "img_fn": f"{i}.png", "metadata_fn": f"{i}.json", "annot_id": f"t-{i}"}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")


def test_finetune_and_evaluate_vcr_from_the_command_line(tmp_path):
    _write_vcr(tmp_path)
    out = tmp_path / "run"
    code = main(["finetune", "vcr", "--config", str(REPO / "configs" / "finetune_vcr_tiny.yaml"),
                 f"data.train={tmp_path / 'train.jsonl'}", f"data.val={tmp_path / 'train.jsonl'}",
                 f"data.images_root={tmp_path / 'images'}", "data.feature_dim=16", "data.vocab_size=60",
                 f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=4", "train.progress_bar=false",
                 "model.overrides={" + MICRO + "}"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"Q->A", "QA->R", "Q->AR", "items"} and metrics["items"] == 8
    assert metrics["Q->AR"] <= min(metrics["Q->A"], metrics["QA->R"])

    result_file = tmp_path / "eval.json"
    predictions_file = tmp_path / "predictions.json"
    code = main(["evaluate", "vcr", "--model", str(out / "model"), "--annotations", str(tmp_path / "train.jsonl"),
                 "--images-root", str(tmp_path / "images"), "--out", str(result_file), "--predictions", str(predictions_file)])
    assert code == 0
    evaluated = json.loads(result_file.read_text())
    assert {k: evaluated[k] for k in ("Q->A", "QA->R", "Q->AR")} == {k: metrics[k] for k in ("Q->A", "QA->R", "Q->AR")}
    predictions = json.loads(predictions_file.read_text())
    assert [p["annot_id"] for p in predictions] == [f"t-{i}" for i in range(8)]


def test_choice_score_starts_as_the_pretraining_itm_margin(tmp_path):
    _write_vcr(tmp_path, n=2)
    items = read_vcr(tmp_path / "train.jsonl", tmp_path / "images")

    class Words:
        def __call__(self, firsts, seconds, truncation, max_length):
            ids = [[1] + [3 + len(w) for w in (a + " " + b).split()] + [2] for a, b in zip(firsts, seconds)]
            return {"input_ids": ids, "token_type_ids": [[0] * len(x) for x in ids]}

    config = preset("tiny", vocab_size=50, region_feature_size=16, num_single_stream_layers=1,
                    num_text_stream_layers=1, num_image_stream_layers=1)
    pretrained = InterBertForPreTraining(config).eval()
    choice = retrieval_from_pretraining(pretrained, InterBertForMultipleChoice).eval()
    batch = collate_choices([VcrDataset(items, Words(), feature_dim=16)[0]])
    with torch.no_grad():
        scores = choice(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits[0]
        for k in range(4):
            itm = pretrained(input_ids=batch["input_ids"][:, k], attention_mask=batch["attention_mask"][:, k],
                             token_type_ids=batch["token_type_ids"][:, k], region_features=batch["region_features"],
                             region_boxes=batch["region_boxes"], region_mask=batch["region_mask"]).itm_logits[0]
            assert torch.allclose(scores[k], itm[1] - itm[0], atol=1e-5)
