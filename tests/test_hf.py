"""Hugging Face integration: the Auto classes, the package's public names, and the one model loader."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_modeling import batch, small_config

from interbert.errors import UsageError
from interbert.loading import load_model
from interbert.modeling import (
    InterBertForImageTextRetrieval,
    InterBertForMultipleChoice,
    InterBertForPreTraining,
    InterBertForSequenceClassification,
    InterBertModel,
)


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = InterBertForPreTraining(small_config()).eval()
    folder = tmp_path_factory.mktemp("pretrained")
    model.save_pretrained(folder)
    return model, folder


def test_auto_classes_load_a_saved_folder_as_the_loader_and_the_original_do(pretrained_folder):
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

    original, folder = pretrained_folder
    inputs = batch()
    assert type(AutoConfig.from_pretrained(folder)).__name__ == "InterBertConfig"
    auto = AutoModelForPreTraining.from_pretrained(folder).eval()
    ours = load_model(folder, task="pretraining").eval()
    assert type(auto) is InterBertForPreTraining and type(ours) is InterBertForPreTraining
    encoder = AutoModel.from_pretrained(folder).eval()  # the encoder of the pretraining folder
    assert type(encoder) is InterBertModel
    with torch.no_grad():
        want = original(**inputs)
        for got in (auto(**inputs), ours(**inputs)):
            for name in ("msm_logits", "mrm_class_logits", "itm_logits", "text_sequence", "image_pooled"):
                torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
        torch.testing.assert_close(encoder(**inputs).text_pooled, want.text_pooled, rtol=0, atol=0)


def test_auto_classes_load_the_fine_tuning_heads(tmp_path):
    from transformers import AutoModelForMultipleChoice, AutoModelForSequenceClassification

    inputs = batch()
    classifier = InterBertForSequenceClassification(small_config(num_labels=3)).eval()
    classifier.save_pretrained(tmp_path / "text")
    auto = AutoModelForSequenceClassification.from_pretrained(tmp_path / "text").eval()
    ours = load_model(tmp_path / "text", task="sequence_classification", num_labels=3).eval()
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        want = classifier(**text).logits
        assert want.shape == (3, 3)
        torch.testing.assert_close(auto(**text).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(ours(**text).logits, want, rtol=0, atol=0)

    choice = InterBertForMultipleChoice(small_config()).eval()
    choice.save_pretrained(tmp_path / "vcr")
    auto = AutoModelForMultipleChoice.from_pretrained(tmp_path / "vcr").eval()
    choices = {k: v.unsqueeze(0) for k, v in inputs.items()}  # one item, 3 choices
    with torch.no_grad():
        torch.testing.assert_close(auto(**choices).logits, choice(**choices).logits, rtol=0, atol=0)


def test_the_loader_converts_a_pretraining_folder_for_the_fine_tuning_tasks(pretrained_folder):
    original, folder = pretrained_folder
    inputs = batch()
    with torch.no_grad():
        itm = original(**inputs).itm_logits
        retrieval = load_model(folder, task="retrieval").eval()
        assert type(retrieval) is InterBertForImageTextRetrieval
        torch.testing.assert_close(retrieval(**inputs).logits, itm[:, 1] - itm[:, 0], rtol=0, atol=1e-5)
        choice = load_model(folder, task="multiple_choice").eval()
        scores = choice(**{k: v.unsqueeze(0) for k, v in inputs.items()}).logits[0]
        torch.testing.assert_close(scores, itm[:, 1] - itm[:, 0], rtol=0, atol=1e-5)
        classifier = load_model(folder, task="sequence_classification", num_labels=4).eval()
        assert classifier.config.num_labels == 4
        ids = inputs["input_ids"]
        torch.testing.assert_close(classifier.interbert(input_ids=ids).text_sequence,
                                   original.interbert(input_ids=ids).text_sequence, rtol=0, atol=0)
    assert type(load_model(folder)) is InterBertForPreTraining  # no task: as saved
    assert type(load_model(folder, task="scoring")) is InterBertForPreTraining


def test_the_loader_names_the_folder_and_what_it_holds(pretrained_folder, tmp_path):
    _, folder = pretrained_folder
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match=r"not a model folder: no config.json \(it holds notes.txt\)"):
        load_model(tmp_path)
    with pytest.raises(UsageError, match="no such model folder"):
        load_model(tmp_path / "absent", task="retrieval")
    retrieval = tmp_path / "retrieval"
    InterBertForImageTextRetrieval(small_config()).save_pretrained(retrieval)
    with pytest.raises(UsageError, match=f"{retrieval} holds an InterBertForImageTextRetrieval; the pretraining "
                                         "task loads InterBertForPreTraining"):
        load_model(retrieval, task="pretraining")
    with pytest.raises(UsageError, match="holds an InterBertForImageTextRetrieval; the multiple_choice task"):
        load_model(retrieval, task="multiple_choice")
    with pytest.raises(UsageError, match="unknown task 'vqa'"):
        load_model(retrieval, task="vqa")
    # a saved classifier keeps its labels: another label count is a different task
    text = tmp_path / "text"
    InterBertForSequenceClassification(small_config(num_labels=3)).save_pretrained(text)
    with pytest.raises(UsageError, match="classifies into 3 labels, the task has 2"):
        load_model(text, task="sequence_classification", num_labels=2)
    # a folder of another model type
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UsageError, match="holds a 'bert' model \\(BertModel\\), not an InterBERT one; .*model.from_bert"):
        load_model(bert)


def test_the_package_exports_its_classes_lazily():
    # a fresh interpreter: `import interbert` stays light; reaching a class registers the Auto classes
    code = ("import sys, interbert; light = not {'torch', 'transformers'} & set(sys.modules); "
            "from interbert import InterBertModel, load_model, preset; import transformers; "
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
            "print(light, InterBertModel.__name__, 'interbert' in CONFIG_MAPPING, callable(load_model))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "InterBertModel", "True", "True"]
    import interbert

    assert {"InterBertConfig", "InterBertForPreTraining", "InterBertForImageTextRetrieval", "InterBertForMultipleChoice",
            "InterBertForSequenceClassification", "preset", "load_model"} <= set(dir(interbert))
    with pytest.raises(AttributeError, match="no attribute 'InterBertForVQA'"):
        interbert.InterBertForVQA


@pytest.mark.parametrize("model_class, wrong", [
    (InterBertModel, {"output_attentions": True}),
    (InterBertForPreTraining, {"labels": torch.tensor([1, 0, 1])}),  # the pretraining labels are msm_/itm_labels
    (InterBertForImageTextRetrieval, {"group_sizes": 3}),
    (InterBertForSequenceClassification, {"label": torch.tensor([1, 0, 1])}),
])
def test_a_misspelt_forward_argument_is_a_type_error(model_class, wrong):
    model = model_class(small_config()).eval()
    inputs = batch()
    if model_class is InterBertForSequenceClassification:  # text only: regions are not its arguments either
        inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{next(iter(wrong))}'"):
        model(**inputs, **wrong)
    with pytest.raises(TypeError, match="unexpected keyword argument 'image_ids'"):
        InterBertForMultipleChoice(small_config())(**{k: v.unsqueeze(0) for k, v in batch().items()}, image_ids=["a"])


def test_the_training_loop_passes_every_batch_key_but_the_bookkeeping(tmp_path):
    from interbert.data import META
    from interbert.train import Trainer, TrainConfig

    rows = batch(b=4)
    examples = [{k: v[i] for k, v in rows.items()} for i in range(4)]

    def collate(items, misspelt: bool):
        out = {k: torch.stack([e[k] for e in items]) for k in items[0]}
        out["itm_label" if misspelt else "itm_labels"] = torch.ones(len(items), dtype=torch.long)
        out[META] = {"image_ids": [str(i) for i in range(len(items))]}
        return out

    config = TrainConfig(output_dir=str(tmp_path), batch_size=4, max_steps=1, progress_bar=False, tensorboard=False,
                         save_every=None)
    model = InterBertForPreTraining(small_config())
    assert Trainer(model, examples, config, collate_fn=lambda items: collate(items, False)).fit().step == 1
    with pytest.raises(TypeError, match="unexpected keyword argument 'itm_label'"):
        Trainer(model, examples, config, collate_fn=lambda items: collate(items, True)).fit()


def test_the_model_card_says_what_the_folder_holds(tmp_path):
    from interbert.model_card import final_losses, write_model_card

    model = InterBertForPreTraining(small_config(embedding_size=8))
    recipe = {"recipe": "pretrain", "config": {
        "model": {"from_bert": "bert-base-uncased"},
        "data": {"captions": "data/captions.json", "features": "data/regions", "split": "train", "msm": "span"},
        "train": {"batch_size": 16, "learning_rate": 1e-4, "seed": 3}}}
    history = {"loss": [9.0] + [2.0] * 10, "itm_loss": [None, 0.5, 0.7], "lr": [1e-4] * 11}
    assert final_losses(history) == {"loss": 2.0, "itm_loss": pytest.approx(0.6)}
    card = write_model_card(tmp_path, model, recipe=recipe, steps=11, history=history,
                            metrics={"R@1": 41.5, "split": "test"}).read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for line in ("| single-stream / text-stream / image-stream layers | 2 / 1 / 2 |", "| region feature size | 24 |",
                 "| search embedding size | 8 |", f"| parameters | {sum(p.numel() for p in model.parameters()):,} |",
                 "- started from BERT `bert-base-uncased`", "- captions: `data/captions.json`", "- split: `train`",
                 "- train.batch_size: `16`", "- optimizer updates: 11", "| loss | 2.0000 |", "| itm_loss | 0.6000 |",
                 "| R@1 | 41.5 |", "model = interbert.load_model(\"path/to/this/folder\", task=\"pretraining\")",
                 "model = AutoModelForPreTraining.from_pretrained(\"path/to/this/folder\")"):
        assert line in card, line
    assert "msm" not in card and "split | `test`" not in card  # masking settings and non-numeric results stay out
