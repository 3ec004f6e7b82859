"""The recipes evaluate while training (train.eval_every) on `interbert data synth` data: retrieval R@K
per evaluation in TensorBoard, model_best/ at the best evaluation, bad settings as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from interbert.cli import main
from interbert.train import BEST_MODEL_DIR, HISTORY_NAME

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", str(out), "--images", "60", "--feature-dim", "32", "--num-classes", "12",
                 "--no-images", "--workers", "1"]) == 0  # 48 train / 6 val / 6 test images
    return out


def retrieval_args(data: Path, out: Path, *overrides: str) -> list[str]:
    return ["finetune", "retrieval", "--config", str(CONFIGS / "finetune_retrieval_tiny.yaml"),
            f"data.captions={data / 'captions.json'}", f"data.features={data / 'regions.tsv'}", "data.vocab_size=200",
            f"train.output_dir={out}", "train.progress_bar=false", "train.max_steps=8", "train.batch_size=4",
            "train.learning_rate=1e-3", "train.warmup_ratio=0", "train.ema_decay=null", "train.save_every=null",
            *overrides]


def scalars(event_folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_retrieval_fine_tuning_logs_validation_recalls_and_keeps_the_best_model(synth, tmp_path, capsys):
    out = tmp_path / "run"
    # mean rank (lower is better) on 6 images; every evaluation's weights are kept as a checkpoint, so that
    # model_best can be compared with the weights of the evaluation it claims to be, whatever the metrics
    assert main(retrieval_args(synth, out, "train.eval_every=2", "train.best_metric=ir_mean_rank",
                               "train.save_every=2", "train.keep_checkpoints=4")) == 0
    summary = json.loads(capsys.readouterr().out)
    evaluations = json.loads((out / HISTORY_NAME).read_text())["eval"]
    assert [e["step"] for e in evaluations] == [2, 4, 6, 8]
    assert summary["validation"] == evaluations

    # TensorBoard holds every evaluation's recalls under val/
    logged = scalars(out / "tensorboard")
    for name in ("ir_r1", "ir_r5", "ir_r10", "ir_median_rank", "tr_r1", "tr_median_rank", "rsum"):
        assert [step for step, _ in logged[f"val/{name}"]] == [2, 4, 6, 8], name
        assert [value for _, value in logged[f"val/{name}"]] == pytest.approx([e[name] for e in evaluations])
    for e in evaluations:
        assert 0 <= e["ir_r1"] <= e["ir_r5"] <= e["ir_r10"] <= 100 and e["ir_median_rank"] >= 1

    # model_best is the first evaluation with the lowest mean rank ...
    best = min(evaluations, key=lambda e: e["ir_mean_rank"])
    assert summary["best"] == {"metric": "ir_mean_rank", "mode": "min", "value": best["ir_mean_rank"],
                               "step": best["step"]}
    # ... it holds the weights of that step (not those of another evaluation, nor the last ones) ...
    import torch
    from safetensors.torch import load_file

    best_weights = load_file(out / BEST_MODEL_DIR / "model.safetensors")
    saved = {e["step"]: torch.load(out / f"checkpoint-{e['step']}.pt", weights_only=True)["model"]
             for e in evaluations}
    def same(weights):
        return all(torch.equal(best_weights[name], weights[name]) for name in best_weights)
    assert same(saved[best["step"]])
    assert [step for step, weights in saved.items() if same(weights)] == [best["step"]]  # the steps' weights differ
    # ... and re-evaluating the folder gives that evaluation's numbers
    from interbert.recipes.evaluate_retrieval import evaluate_retrieval
    from interbert.recipes.validation import flat_retrieval_metrics

    folder = out / BEST_MODEL_DIR
    assert (folder / "tokenizer.json").exists() and json.loads((folder / "recipe.json").read_text())["recipe"] == \
        "finetune_retrieval"
    # ... with the processor AutoProcessor loads: text truncated at the model's positions, the run's region count
    recipe = json.loads((folder / "recipe.json").read_text())
    for saved in (folder, out / "model"):
        positions = json.loads((saved / "config.json").read_text())["max_position_embeddings"]
        assert json.loads((saved / "tokenizer_config.json").read_text())["model_max_length"] == positions
        assert json.loads((saved / "processor_config.json").read_text()) == {
            "max_regions": recipe["config"]["data"]["max_regions"], "processor_class": "InterBertProcessor"}
    # ... whose card says which update it is and what it scored, as the final model's card says its own
    from huggingface_hub import ModelCard

    best_card = ModelCard.load(folder / "README.md").data
    assert best_card.training_steps == best["step"]
    assert best_card.selected_by == {"metric": "ir_mean_rank", "mode": "min", "value": pytest.approx(best["ir_mean_rank"])}
    assert best_card.validation == {"step": best["step"], "metrics": pytest.approx({k: v for k, v in best.items() if k != "step"})}
    final_card = ModelCard.load(out / "model" / "README.md").data
    assert final_card.training_steps == 8 and final_card.validation["step"] == 8
    assert {r.metric_type: r.metric_value for r in final_card.eval_results} == pytest.approx(
        {k: v for k, v in evaluations[-1].items() if k != "step"})
    for saved in (folder, out / "model"):  # both load where interbert is not installed (test_remote_code.py)
        assert json.loads((saved / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_interbert.InterBertModel"
        assert (saved / "modeling_interbert.py").is_file()
    again = flat_retrieval_metrics(evaluate_retrieval(folder, synth / "captions.json", synth / "regions.tsv",
                                                      split="val", max_images=100, progress=False))
    assert again == pytest.approx({k: v for k, v in best.items() if k != "step"})


def test_pretraining_evaluates_its_losses_on_the_validation_split(synth, tmp_path, capsys):
    out = tmp_path / "pretrain"
    args = ["pretrain", "--config", str(CONFIGS / "pretrain_tiny.yaml"), f"data.captions={synth / 'captions.json'}",
            f"data.features={synth / 'regions.tsv'}", "data.vocab_size=200", f"train.output_dir={out}",
            "train.progress_bar=false", "train.tensorboard=false", "train.max_steps=4", "train.batch_size=8",
            "train.save_every=null", "train.eval_every=2", "train.early_stopping_patience=5"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [e["step"] for e in summary["validation"]] == [2, 4]
    assert {"loss", "msm_loss", "mrm_loss", "itm_loss"} <= set(summary["validation"][0])
    assert summary["best"]["metric"] == "loss" and summary["best"]["mode"] == "min"
    from interbert.modeling import InterBertForPreTraining

    InterBertForPreTraining.from_pretrained(out / BEST_MODEL_DIR)  # a model folder like model/


@pytest.mark.parametrize("overrides, message", [
    (["train.eval_every=2", "train.best_metric=accuracy"],
     "train.best_metric='accuracy' is not a validation metric of this recipe; choose one of ir_r1"),
    (["train.keep_checkpoints=0"], "keep_checkpoints must be >= 1"),
    (["train.early_stopping_patience=2"], "early_stopping_patience needs eval_every"),
    (["train.eval_every=2", "data.val_split=dev"], "no captions in split 'dev'"),
])
def test_bad_watch_settings_are_one_line_usage_errors(synth, tmp_path, capsys, overrides, message):
    assert main(retrieval_args(synth, tmp_path / "run", *overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_text_fine_tuning_keeps_model_best_by_f1_on_a_pair_task(synth, tmp_path, capsys):
    out = tmp_path / "text"
    assert main(["finetune", "text", "--config", str(CONFIGS / "finetune_text_tiny.yaml"),
                 f"data.train={synth / 'glue' / 'train.tsv'}", f"data.dev={synth / 'glue' / 'dev.tsv'}",
                 f"train.output_dir={out}", "train.progress_bar=false", "train.tensorboard=false", "train.max_steps=4",
                 "train.batch_size=8", "train.save_every=null", "train.eval_every=2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [sorted(e) for e in summary["validation"]] == [["accuracy", "f1", "step"]] * 2
    assert summary["best"]["metric"] == "f1" and summary["best"]["mode"] == "max"
    assert (out / BEST_MODEL_DIR / "config.json").is_file()
    assert "# InterBERT: InterBertForSequenceClassification" in (out / BEST_MODEL_DIR / "README.md").read_text()


def vcr_args(synth: Path, out: Path, *overrides: str) -> list[str]:
    return ["finetune", "vcr", "--config", str(CONFIGS / "finetune_vcr_tiny.yaml"),
            f"data.train={synth / 'vcr' / 'train.jsonl'}", f"data.images_root={synth / 'images'}",
            f"data.features={synth / 'regions.tsv'}", f"train.output_dir={out}", "train.progress_bar=false",
            "train.tensorboard=false", "train.max_steps=4", "train.batch_size=4", "train.save_every=null",
            "train.eval_every=2", *overrides]


def test_vcr_fine_tuning_evaluates_q_ar_on_its_val_file(synth, tmp_path, capsys):
    assert main(vcr_args(synth, tmp_path / "vcr", f"data.val={synth / 'vcr' / 'val.jsonl'}")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [sorted(e) for e in summary["validation"]] == [["q_a", "q_ar", "qa_r", "step"]] * 2
    assert summary["best"]["metric"] == "q_ar"
    assert summary["validation"][-1]["q_a"] == summary["val"]["Q->A"]  # the last evaluation is the final one

    assert main(vcr_args(synth, tmp_path / "no_val", "data.val=null")) == 2
    assert "train.eval_every evaluates on data.val" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# LAVIS's separate train / val / test files (issue 27): data.val_captions, data.test_captions
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lavis(synth, tmp_path_factory) -> Path:
    """The benchmark's splits as LAVIS ships COCO: coco_karpathy_train.json (one caption per entry, with
    image_id), coco_karpathy_val.json and _test.json (an image's captions in a list, the id in the file name)."""
    from interbert.data.captions import read_captions

    folder = tmp_path_factory.mktemp("lavis")
    captions = read_captions(synth / "captions.json")
    train = [{"image": f"images/{c.image_id}.jpg", "caption": c.text, "image_id": c.image_id}
             for c in captions if c.split == "train"]
    (folder / "coco_karpathy_train.json").write_text(json.dumps(train))
    for split in ("val", "test"):
        by_image: dict[str, list[str]] = {}
        for c in captions:
            if c.split == split:
                by_image.setdefault(c.image_id, []).append(c.text)
        entries = [{"image": f"images/{image_id}.jpg", "caption": texts} for image_id, texts in by_image.items()]
        (folder / f"coco_karpathy_{split}.json").write_text(json.dumps(entries))
    return folder


def lavis_args(synth: Path, lavis: Path, out: Path, *overrides: str) -> list[str]:
    return [*retrieval_args(synth, out, f"data.captions={lavis / 'coco_karpathy_train.json'}",
                            "train.tensorboard=false", *overrides)]


def test_retrieval_fine_tuning_validates_and_tests_on_lavis_separate_files(synth, lavis, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from interbert.recipes.evaluate_retrieval import evaluate_retrieval
    from interbert.recipes.validation import flat_retrieval_metrics

    out = tmp_path / "run"
    # the training file has no 'val' split: validation can only come from the val file
    assert main(lavis_args(synth, lavis, out, f"data.val_captions={lavis / 'coco_karpathy_val.json'}",
                           f"data.test_captions={lavis / 'coco_karpathy_test.json'}", "train.eval_every=4",
                           "train.max_steps=4")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [e["step"] for e in summary["validation"]] == [4]

    def evaluated(split_file: str) -> dict[str, float]:
        return flat_retrieval_metrics(evaluate_retrieval(out / "model", lavis / split_file, synth / "regions.tsv",
                                                         split=None, max_images=100, progress=False))

    # the evaluation at the last update is the saved model's on the val file; the test numbers its on the test file
    assert {k: v for k, v in summary["validation"][0].items() if k != "step"} == pytest.approx(evaluated("coco_karpathy_val.json"))
    assert summary["test"] == pytest.approx(evaluated("coco_karpathy_test.json"))
    assert summary["test"] != pytest.approx(evaluated("coco_karpathy_val.json"))  # 6 other images, other ranks
    card = ModelCard.load(out / "model" / "README.md").data
    assert card.training_data["val_captions"] == str(lavis / "coco_karpathy_val.json")
    results = {(r.dataset_name, r.dataset_split, r.metric_type): r.metric_value for r in card.eval_results}
    assert results[("coco_karpathy_val.json", "validation", "ir_r1")] == pytest.approx(summary["validation"][0]["ir_r1"])
    assert results[("coco_karpathy_test.json", "test", "ir_r1")] == pytest.approx(summary["test"]["ir_r1"])
    assert json.loads((out / "model" / "recipe.json").read_text())["test"] == pytest.approx(summary["test"])


@pytest.mark.parametrize("overrides, message", [
    (["train.eval_every=2", "data.val_captions={lavis}/coco_karpathy_val.json", "data.val_split=val"],
     "data.val_captions (a file whose every caption is validation) and data.val_split"),
    (["data.val_captions={lavis}/coco_karpathy_val.json"], "data.val_captions is read for validation only: set train.eval_every"),
    (["train.eval_every=2", "data.val_captions={lavis}/coco_karpathy_train.json"],
     "data.val_captions is data.captions ({lavis}/coco_karpathy_train.json): held-out captions must be a file"),
    (["data.test_captions={lavis}/coco_karpathy_val.json", "data.val_captions={lavis}/coco_karpathy_val.json",
      "train.eval_every=2"], "data.test_captions is data.val_captions"),
    (["data.test_captions={synth}/captions.json"],
     "data.test_captions={synth}/captions.json shares 48 images with the training captions"),
])
def test_bad_lavis_split_settings_are_one_line_errors(synth, lavis, tmp_path, capsys, overrides, message):
    overrides = [o.format(lavis=lavis, synth=synth) for o in overrides]
    assert main(lavis_args(synth, lavis, tmp_path / "run", *overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(lavis=lavis, synth=synth) in err[0], err
    assert not (tmp_path / "run" / "model").exists()  # refused before training


def test_pretraining_validates_on_a_lavis_val_file(synth, lavis, tmp_path, capsys):
    out = tmp_path / "pretrain"
    assert main(["pretrain", "--config", str(CONFIGS / "pretrain_tiny.yaml"),
                 f"data.captions={lavis / 'coco_karpathy_train.json'}", f"data.val_captions={lavis / 'coco_karpathy_val.json'}",
                 f"data.features={synth / 'regions.tsv'}", "data.vocab_size=200", f"train.output_dir={out}",
                 "train.progress_bar=false", "train.tensorboard=false", "train.max_steps=2", "train.batch_size=8",
                 "train.save_every=null", "train.eval_every=2", "data.negatives=random"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [e["step"] for e in summary["validation"]] == [2] and summary["validation"][0]["loss"] > 0
