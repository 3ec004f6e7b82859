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
    path = write_model_card(tmp_path, model, recipe=recipe, steps=11, history=history,
                            metrics={"R@1": 41.5, "split": "test"}, validation={"step": 10, "loss": 2.5, "itm_loss": 0.4})
    card = path.read_text()
    from huggingface_hub import ModelCard

    data = ModelCard.load(path).data  # the header as the Hub reads it
    assert (data.license, data.library_name, data.pipeline_tag) == ("apache-2.0", "transformers", "feature-extraction")
    assert {"interbert", "custom_code"} <= set(data.tags)
    assert data.training_data == {"captions": "data/captions.json", "features": "data/regions", "split": "train"}
    assert data.training_steps == 11 and data.validation == {"step": 10, "metrics": {"loss": 2.5, "itm_loss": 0.4}}
    assert {(r.metric_type, r.metric_value, r.dataset_name, r.dataset_split) for r in data.eval_results} == {
        ("loss", 2.5, "captions.json", "validation"), ("itm_loss", 0.4, "captions.json", "validation"),
        ("R@1", 41.5, "captions.json", "validation")}
    assert getattr(data, "selected_by", None) is None  # only model_best/ says what chose it
    for line in ("| single-stream / text-stream / image-stream layers | 2 / 1 / 2 |", "| region feature size | 24 |",
                 "| search embedding size | 8 |", f"| parameters | {sum(p.numel() for p in model.parameters()):,} |",
                 "- started from BERT `bert-base-uncased`", "- captions: `data/captions.json`", "- split: `train`",
                 "- train.batch_size: `16`", "- optimizer updates: 11", "| loss | 2.0000 |", "| itm_loss | 0.6000 |",
                 "| R@1 | 41.5 |", "model = interbert.load_model(\"path/to/this/folder\", task=\"pretraining\")",
                 "model = AutoModelForPreTraining.from_pretrained(\"path/to/this/folder\", trust_remote_code=True)",
                 "## Validation (at update 10)", "| itm_loss | 0.4 |"):
        assert line in card, line
    assert "msm" not in card and "split | `test`" not in card  # masking settings and non-numeric results stay out


# --------------------------------------------------------------------------------------------------
# The processor, the feature methods and the Auto classes after `import interbert` (issue 27)
# --------------------------------------------------------------------------------------------------
FEATURE_DIM = 16
MAX_POSITIONS = 24  # small, so that truncation is easy to reach


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The built-in benchmark (tiny), and a retrieval and a pretraining folder as the recipes write them:
    weights, then the processor (tokenizer with model_max_length, processor_config.json)."""
    from conftest import minilm_vocab
    from interbert.data import open_features
    from interbert.data.tokenize import load_tokenizer
    from interbert.processing import save_processor
    from interbert.serve.synthetic_gallery import save_tiny_model
    from interbert.synthetic import generate

    root = tmp_path_factory.mktemp("bench")
    manifest = generate(root / "data", images=12, val_images=2, test_images=4, feature_dim=FEATURE_DIM, num_classes=8,
                        fmt="store", render_images=False, workers=1)
    folders = {}
    for architecture in ("retrieval", "pretraining"):
        folder = save_tiny_model(root / architecture, minilm_vocab(), FEATURE_DIM, architecture=architecture,
                                 max_position_embeddings=MAX_POSITIONS, embedding_size=8)
        config = InterBertForPreTraining.config_class.from_pretrained(folder)
        save_processor(folder, load_tokenizer(minilm_vocab()), config, {"config": {"data": {"max_regions": 10}}})
        folders[architecture] = folder
    store = open_features(root / "data" / manifest["files"]["regions"])
    return folders, store


def test_the_processor_round_trips_through_save_pretrained(bench, tmp_path):
    from transformers import AutoProcessor

    from interbert.processing import InterBertProcessor

    folders, store = bench
    saved = InterBertProcessor.from_pretrained(folders["retrieval"])
    assert saved.max_regions == 10 and saved.tokenizer.model_max_length == MAX_POSITIONS  # the recipe's, the model's
    saved.save_pretrained(tmp_path)
    again, auto = InterBertProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(folders["retrieval"])
    assert type(auto) is InterBertProcessor
    ids = store.ids()[:3]
    texts = ["a red ball", "two small blue cubes near a green sphere", "x"]
    want = saved(text=texts, regions=[store[i] for i in ids])
    assert sorted(want) == ["attention_mask", "input_ids", "region_boxes", "region_features", "region_mask",
                            "token_type_ids"]
    for other in (again, auto):
        assert other.max_regions == 10 and other.tokenizer.model_max_length == MAX_POSITIONS
        got = other(text=texts, regions=[store[i] for i in ids])
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_truncation_stops_at_the_models_positions(bench):
    from interbert.processing import InterBertProcessor

    folders, _ = bench
    proc = InterBertProcessor.from_pretrained(folders["retrieval"])
    model = InterBertForImageTextRetrieval.from_pretrained(folders["retrieval"]).eval()
    long_text = "a red ball on a blue cube " * 20
    inputs = proc(text=[long_text, "a cube"])
    assert inputs["input_ids"].shape == (2, MAX_POSITIONS) and inputs["attention_mask"][1].sum() < MAX_POSITIONS
    assert model.get_text_features(**inputs).shape == (2, 8)
    untruncated = proc(text=[long_text], truncation=False)
    assert untruncated["input_ids"].shape[1] > MAX_POSITIONS  # what the model refuses
    with pytest.raises(ValueError, match=f"exceed max_position_embeddings={MAX_POSITIONS}"):
        model.get_text_features(**untruncated)


def test_every_form_of_regions_gives_the_services_region_batch(bench, tmp_path):
    import numpy as np

    from interbert.processing import InterBertProcessor
    from interbert.serve._data import region_batch

    folders, store = bench
    proc = InterBertProcessor.from_pretrained(folders["retrieval"])
    ids = store.ids()[:4]
    want = region_batch([(store, i) for i in ids], max_regions=10)  # what the index embeds
    entries = [store[i] for i in ids]
    for n, r in enumerate(entries):
        np.savez(tmp_path / f"{n}.npz", features=r.features, boxes=r.boxes, image_w=r.image_w, image_h=r.image_h)
    five_d = [want["region_boxes"][n, 1:int(want["region_mask"][n].sum())].numpy() for n in range(len(ids))]
    forms = {
        "store entries": entries,
        ".npz paths": [tmp_path / f"{n}.npz" for n in range(len(ids))],
        "dicts": [{"features": r.features, "boxes": r.boxes, "image_w": r.image_w, "image_h": r.image_h} for r in entries],
        "pixel tuples": [(r.features, r.boxes, (r.image_w, r.image_h)) for r in entries],
        # the detector's first 9 regions (max_regions counts the global one), boxes already in the 5-d form
        "5-d tuples": [(r.features[:9], b) for r, b in zip(entries, five_d)],
    }
    for form, regions in forms.items():
        got = proc(regions=regions)
        assert sorted(got) == ["region_boxes", "region_features", "region_mask"], form
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-7, msg=f"{form}: {key}")
    one = proc(regions=entries[0])  # one image, not in a list
    assert one["region_features"].shape[0] == 1


def test_the_processor_names_what_is_wrong_with_its_input(bench, tmp_path):
    import numpy as np

    from interbert.errors import DataError
    from interbert.processing import InterBertProcessor

    folders, store = bench
    proc = InterBertProcessor.from_pretrained(folders["retrieval"])
    good = store[store.ids()[0]]
    features = np.ones((3, FEATURE_DIM), np.float32)
    with pytest.raises(UsageError, match=r"regions\[1\]: boxes must be N x 4 .* got shape \(3, 3\)"):
        proc(regions=[good, (features, np.ones((3, 3)), (10, 10))])
    with pytest.raises(UsageError, match=r"regions\[0\]: pixel boxes \(N x 4\) need the image size"):
        proc(regions=[(features, np.ones((3, 4)))])
    with pytest.raises(UsageError, match="5th box column is not the box's area"):
        proc(regions=(features, np.array([[0, 0, 0.5, 0.5, 1.0]] * 3)))
    with pytest.raises(DataError, match=f"{tmp_path / 'absent.npz'}: no such file"):
        proc(regions=tmp_path / "absent.npz")
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataError, match="cut.npz: image cut: not a readable .npz"):
        proc(regions=str(tmp_path / "cut.npz"))
    with pytest.raises(UsageError, match="2 texts and 3 images"):
        proc(text=["a", "b"], regions=[good] * 3)
    with pytest.raises(UsageError, match="give text=..., regions=..., or both"):
        proc()
    with pytest.raises(UsageError, match="max_regions must be a whole number >= 1"):
        InterBertProcessor(proc.tokenizer, max_regions=0)


@pytest.mark.parametrize("architecture", ["retrieval", "pretraining"])
def test_feature_methods_give_the_services_embeddings_and_scores(bench, architecture):
    from transformers import AutoModel

    from interbert.processing import InterBertProcessor
    from interbert.serve._data import region_batch
    from interbert.serve.model import SearchModel

    folders, store = bench
    folder = folders[architecture]
    service = SearchModel(folder)
    proc = InterBertProcessor.from_pretrained(folder)
    texts = ["a red ball", "two blue cubes left of a sphere", "green"]
    ids = store.ids()[:5]
    want_text = torch.from_numpy(service.embed_texts(texts))
    want_images = torch.from_numpy(service.embed_images(region_batch([(store, i) for i in ids], max_regions=10)))
    for model in (AutoModel.from_pretrained(folder).eval(), load_model(folder).eval()):
        with torch.no_grad():
            got_text = model.get_text_features(**proc(text=texts))
            got_images = model.get_image_features(**proc(regions=[store[i] for i in ids]))
        torch.testing.assert_close(got_text, want_text, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_images, want_images, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_text.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-6)

    # scores: one caption against every image, as the service re-ranks
    model = load_model(folder).eval()
    with torch.no_grad():
        scores = model.score_pairs(**proc(text=texts[1], regions=[store[i] for i in ids]))
        pairs = proc(text=[texts[1]] * len(ids), regions=[store[i] for i in ids])
        # the retrieval model's forward logits; for a pretraining folder, the retrieval model it becomes
        retrieval = load_model(folder, task="retrieval").eval()
        torch.testing.assert_close(scores, retrieval(**pairs).logits, rtol=0, atol=1e-5 if architecture == "pretraining" else 0)
    want_scores = service.pair_scores(texts[1], region_batch([(store, i) for i in ids], max_regions=10))
    torch.testing.assert_close(scores, torch.from_numpy(want_scores), rtol=0, atol=1e-5)
    assert scores.shape == (len(ids),) and len(set(scores.tolist())) > 1


def test_auto_classes_load_a_folder_after_import_interbert_alone(bench):
    # a fresh interpreter that imports nothing of interbert but the package: no warning, the InterBERT classes
    folders, _ = bench
    code = (
        "import sys, interbert\n"
        "assert not {'torch', 'transformers'} & set(sys.modules)\n"
        "from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer\n"
        f"folder = {str(folders['retrieval'])!r}\n"
        "tokenizer = AutoTokenizer.from_pretrained(folder)\n"
        "proc, model = AutoProcessor.from_pretrained(folder), AutoModel.from_pretrained(folder)\n"
        "print(type(AutoConfig.from_pretrained(folder)).__name__, type(proc).__name__, type(model).__name__,\n"
        "      tokenizer.model_max_length, tuple(model.get_text_features(**proc(text=['a red ball'])).shape))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["InterBertConfig", "InterBertProcessor", "InterBertModel", str(MAX_POSITIONS), "(1,", "8)"]
    assert "model of type" not in run.stderr  # AutoTokenizer's "instantiate a model of type ``" warning


def test_save_processor_keeps_the_runs_region_count_and_the_callers_tokenizer(bench, tmp_path):
    from conftest import minilm_vocab
    from interbert.data.tokenize import load_tokenizer
    from interbert.processing import DEFAULT_MAX_REGIONS, InterBertProcessor, save_processor

    tokenizer = load_tokenizer(minilm_vocab())
    unset = tokenizer.model_max_length
    save_processor(tmp_path, tokenizer, small_config(max_position_embeddings=40), recipe={"recipe": "finetune_text"})
    assert tokenizer.model_max_length == unset  # the recipe's own tokenizer is not changed
    proc = InterBertProcessor.from_pretrained(tmp_path)
    assert proc.max_regions == DEFAULT_MAX_REGIONS and proc.tokenizer.model_max_length == 40
