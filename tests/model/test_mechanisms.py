"""Issue 28's mechanism measurements (interbert.mechanisms, `interbert evaluate mechanisms`) on a micro model and
generated data: they run through the model's own heads and respond to what they measure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from interbert.cli import main
from interbert.config import preset
from interbert.data.batches import PretrainingDataset, collate, prepare_regions
from interbert.data.captions import read_captions, read_karpathy_twins
from interbert.data.errors import DataFormatError
from interbert.data.features import open_features
from interbert.data.tokenize import encode_caption, load_tokenizer, train_wordpiece
from interbert.mechanisms import itm_twins, mrm_leakage
from interbert.modeling import InterBertForPreTraining
from interbert.recipes.mechanisms import evaluate_mechanisms
from interbert.retrieval import RegionInput
from interbert.synthetic import generate

from conftest import single_torch_thread

SMALL = dict(feature_dim=16, num_classes=8, render_images=False, workers=1)
MICRO = dict(hidden_size=32, num_attention_heads=2, image_num_attention_heads=2, intermediate_size=64,
             image_intermediate_size=64, pooled_size=32, num_single_stream_layers=1, num_text_stream_layers=1,
             num_image_stream_layers=1, region_feature_size=16, num_region_classes=8, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mech") / "data"
    generate(out, images=60, seed=0, twin_share=0.5, **SMALL)  # 48 train images, 12 twin pairs among them
    return out


def _model_folder(data: Path, folder: Path, **config) -> Path:
    tokenizer = train_wordpiece([c.text for c in read_captions(data / "captions.json")], folder, vocab_size=200)
    torch.manual_seed(0)
    InterBertForPreTraining(preset("tiny", vocab_size=len(tokenizer), **MICRO, **config)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def untrained(data, tmp_path_factory) -> Path:
    return _model_folder(data, tmp_path_factory.mktemp("models") / "untrained")


@pytest.fixture(scope="module")
def leaky_mrm(data, tmp_path_factory, untrained) -> Path:
    """The micro model trained 200 steps on MRM alone with plain per-region masking on the train split: it
    learns to read a masked region's class off its unmasked neighbours (~10 s on 2 cores)."""
    folder = tmp_path_factory.mktemp("models") / "leaky"
    tokenizer = load_tokenizer(untrained)
    config = dict(msm_loss_weight=0.0, itm_loss_weight=0.0, itc_loss_weight=0.0)
    torch.manual_seed(0)
    model = InterBertForPreTraining(preset("tiny", vocab_size=len(tokenizer), **MICRO, **config))
    train = [c for c in read_captions(data / "captions.json") if c.split == "train"]
    dataset = PretrainingDataset(train, open_features(data / "regions.tsv"), tokenizer, max_tokens=32, max_regions=24,
                                 mrm="region", hard_negatives=None, p_positive=1.0, region_cache=True)
    optimizer, rng = torch.optim.AdamW(model.parameters(), lr=3e-3), np.random.default_rng(0)
    model.train()
    with single_torch_thread():
        _train(model, dataset, optimizer, rng)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _train(model, dataset, optimizer, rng) -> None:
    for step in range(200):
        dataset.set_epoch(step)
        batch = collate([dataset[int(i)] for i in rng.integers(0, len(dataset), 16)])
        loss = model(**{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _measure(model_dir: Path, data: Path, split: str = "train") -> dict:
    with single_torch_thread():
        return evaluate_mechanisms(model_dir, data / "captions.json", data / "regions.tsv", split=split, max_tokens=32,
                                   max_regions=24)


def test_a_model_trained_to_read_neighbours_loses_that_answer_under_group_masking(data, untrained, leaky_mrm):
    before, after = _measure(untrained, data)["mrm_leakage"], _measure(leaky_mrm, data)["mrm_leakage"]
    assert after["anchors"] == before["anchors"] > 500  # every detector region of the 48 train images, once
    assert 0.5 < after["grouped_share"] < 1 and 2 < after["mean_group_size"] < 4  # objects' groups, background alone
    # trained with its neighbours visible, it predicts much better when they are (plain) than when the whole
    # group is hidden; an untrained model gains next to nothing from them
    assert after["plain"]["accuracy"] > after["group"]["accuracy"]
    assert after["leak"]["loss"] > 0.05 > 5 * abs(before["leak"]["loss"])
    assert after["plain"]["loss"] < before["plain"]["loss"] - 0.3  # and it did learn MRM


def test_without_overlapping_proposals_group_and_plain_masking_are_the_same_task(tmp_path, leaky_mrm):
    """--proposals-per-object 1: no anchor has a neighbour in its group, so nothing can leak: equal results."""
    data = tmp_path / "one"
    generate(data, images=40, seed=3, proposals_per_object=(1, 1), **SMALL)
    result = _measure(leaky_mrm, data)["mrm_leakage"]
    assert result["grouped_share"] == 0.0 and result["mean_group_size"] == 1.0
    assert result["group"] == result["plain"]
    assert result["leak"] == {"accuracy": 0.0, "loss": 0.0}


def test_itm_on_twins_counts_a_negative_indistinguishable_from_the_positive_as_never_chosen(data, untrained,
                                                                                            one_torch_thread):
    """A 'twin' whose regions are the own image's exactly: the same score, so its choice is 0 (ties count
    against) and the thresholded accuracy exactly chance; random negatives are drawn from the other images."""
    model = InterBertForPreTraining.from_pretrained(untrained).eval()
    tokenizer = load_tokenizer(untrained)
    store = open_features(data / "regions.tsv")
    captions = [c for c in read_captions(data / "captions.json") if c.split == "test"]
    image_ids = list(dict.fromkeys(c.image_id for c in captions))
    images = [RegionInput(r["region_features"], r["region_boxes"]) for r in
              (prepare_regions(store[i], 24) for i in image_ids)]
    copies = images + images  # image k + len(image_ids) is a copy of image k
    twin_of = {k: k + len(image_ids) for k in range(len(image_ids))}
    ids = [encode_caption(tokenizer, c.text, 32).input_ids for c in captions]
    result = itm_twins(model, ids, [image_ids.index(c.image_id) for c in captions], copies, twin_of, seed=1)
    assert result["captions"] == len(captions) == 30
    assert result["twin"]["choice"] == 0.0 and result["twin"]["accuracy"] == 0.5
    assert result["twin"]["negative_accuracy"] == 1 - result["positive_accuracy"]
    with pytest.raises(ValueError, match="no caption belongs to an image with a twin"):
        itm_twins(model, ids, [image_ids.index(c.image_id) for c in captions], copies, {}, seed=1)


def test_the_command_measures_twins_of_the_split_and_says_when_it_has_none(data, untrained, tmp_path, one_torch_thread):
    out = tmp_path / "m.json"
    args = ["evaluate", "mechanisms", "--model", str(untrained), "--captions", str(data / "captions.json"),
            "--features", str(data / "regions.tsv"), "--max-tokens", "32", "--max-regions", "24"]
    assert main([*args, "--split", "train", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["itm_twins"]["twin_pairs"] == 12 and result["itm_twins"]["captions"] == 5 * 24
    for kind in ("twin", "random"):
        assert 0 <= result["itm_twins"][kind]["accuracy"] <= 1 and 0 <= result["itm_twins"][kind]["choice"] <= 1
    assert main([*args, "--split", "val", "--out", str(tmp_path / "val.json")]) == 0
    skipped = json.loads((tmp_path / "val.json").read_text())["itm_twins"]  # val has no twins: said, not hidden
    assert set(skipped) == {"skipped"} and "'val'" in skipped["skipped"]


def test_twins_that_do_not_name_each_other_are_one_error_naming_the_entry(data, tmp_path):
    captions = json.loads((data / "captions.json").read_text())
    first = next(n for n, e in enumerate(captions["images"]) if "twin_of" in e)
    captions["images"][first]["twin_of"] = 10_000
    broken = tmp_path / "captions.json"
    broken.write_text(json.dumps(captions))
    with pytest.raises(DataFormatError, match=rf"images\[{first}\].*twin_of 10000 names no other image"):
        read_karpathy_twins(broken)
    assert len(read_karpathy_twins(data / "captions.json")) == 2 * (12 + 3)  # train and test twins, both ways


def test_a_model_that_is_not_a_pretraining_model_is_one_error_line(data, tmp_path, capsys, monkeypatch):
    from interbert.modeling import InterBertModel

    monkeypatch.delenv("INTERBERT_DEBUG", raising=False)
    folder = tmp_path / "encoder"
    InterBertModel(preset("tiny", vocab_size=50, **MICRO)).save_pretrained(folder)
    capsys.readouterr()
    code = main(["evaluate", "mechanisms", "--model", str(folder), "--captions", str(data / "captions.json"),
                 "--features", str(data / "regions.tsv")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [err] and err.startswith("error: ") and str(folder) in err
