"""Several caption + feature sources in one run: namespaced ids, routing, weights, the recipe and `data check`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from interbert.data.captions import Caption
from interbert.data.features import open_features
from interbert.data.sources import SourceStore, WeightedSources, sources_from_config
from interbert.errors import DataError, UsageError

CONFIG = Path(__file__).parents[2] / "configs" / "pretrain_tiny.yaml"
WORDS = "a man woman dog cat red blue bus horse street table plate sits runs on under near with".split()


def write_source(folder: Path, offset: float, images: int = 6, dim: int = 8, classes: int | None = None,
                 split: str = "train") -> tuple[Path, Path]:
    """A caption file and an npz feature folder whose images are numbered 0.. (so two sources collide);
    every feature of image k is ``offset + k``, which tells a batch row's source and image apart."""
    rng = np.random.default_rng(int(offset))
    (folder / "regions").mkdir(parents=True)
    lines = []
    for k in range(images):
        x1, y1 = rng.uniform(0, 40, (2, 5))
        boxes = np.stack([x1, y1, x1 + rng.uniform(10, 50, 5), y1 + rng.uniform(10, 50, 5)], 1)
        extra = {} if classes is None else {"class_probs": np.full((5, classes), 1 / classes)}
        np.savez(folder / "regions" / f"{k}.npz", features=np.full((5, dim), offset + k, np.float32), boxes=boxes,
                 image_w=100, image_h=100, **extra)
        for n in range(2):
            text = " ".join(rng.choice(WORDS, 6))
            lines.append(json.dumps({"image_id": k, "caption": text, "split": split}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "captions.jsonl", folder / "regions"


@pytest.fixture
def two_sources(tmp_path):
    coco = write_source(tmp_path / "coco", 100.0)
    vg = write_source(tmp_path / "vg", 200.0, images=4)
    return {"coco": coco, "vg": vg}


def sources_setting(sources, **weights) -> str:
    entries = [{"name": name, "captions": str(c), "features": str(f), **({"weight": weights[name]} if name in weights else {})}
               for name, (c, f) in sources.items()]
    return "data.sources=" + json.dumps(entries)


def test_source_store_routes_namespaced_ids_to_each_store(two_sources):
    store = SourceStore({name: open_features(f) for name, (_, f) in two_sources.items()})
    assert float(store["coco/3"].features[0, 0]) == 103.0 and float(store["vg/3"].features[0, 0]) == 203.0
    assert "coco/5" in store and "vg/5" not in store and "3" not in store and "zz/1" not in store
    assert len(store) == 10 and sorted(store.ids())[:2] == ["coco/0", "coco/1"]
    with pytest.raises(DataError, match="'vg/5'"):
        store["vg/5"]


def test_sources_that_disagree_on_regions_are_refused_naming_both(tmp_path):
    a = open_features(write_source(tmp_path / "a", 1.0)[1])
    b = open_features(write_source(tmp_path / "b", 2.0, dim=16)[1])
    with pytest.raises(DataError, match=r"a \(.*\): 8-d features.*b \(.*\): 16-d features"):
        SourceStore({"a": a, "b": b})
    c = open_features(write_source(tmp_path / "c", 3.0, classes=4)[1])
    with pytest.raises(DataError, match="no class distributions.*4 class distributions"):
        SourceStore({"a": a, "c": c})


@pytest.mark.parametrize("data, message", [
    ({"sources": [{"name": "a", "captions": "x", "features": "y"}], "captions": "x"}, "either data.sources or"),
    ({"sources": [{"name": "a", "captions": "x"}]}, r"data.sources\[0\] needs 'features'"),
    ({"sources": [{"name": "a", "captions": "x", "feature": "y"}]}, r"unknown key\(s\) feature"),
    ({"sources": [{"name": "a", "captions": "x", "features": "y"}, {"name": "a", "captions": "z", "features": "w"}]},
     "name 'a' is used twice"),
    ({"sources": [{"name": "a/b", "captions": "x", "features": "y"}]}, "may not hold '/'"),
    ({"sources": [{"name": "a", "captions": "x", "features": "y", "weight": 0}]}, "weight must be a number > 0"),
    ({"sources": {"name": "a"}}, "must be a list"),
    ({"captions": "x"}, "data.features required"),
])
def test_bad_source_settings_are_refused_by_name(data, message):
    with pytest.raises(UsageError, match=message):
        sources_from_config(data, "run.yaml")


def test_single_path_form_is_one_unnamed_source():
    (source,) = sources_from_config({"captions": "c.json", "features": "f"})
    assert source.name is None and source.captions == Path("c.json") and source.weight == 1.0


class _Captions:
    """Stands in for a caption dataset: item i is (the epoch it was built in, i)."""

    def __init__(self, image_ids):
        self.captions = [Caption(i, f"{i}#0", "x") for i in image_ids]
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        return self.epoch, index


def test_weights_draw_each_source_by_its_share_and_copies_get_their_own_seed():
    inner = _Captions([f"big/{k}" for k in range(10)] + [f"small/{k}" for k in range(3)])
    weighted = WeightedSources(inner, {"big": 0.5, "small": 2.0}, seed=1)
    assert len(weighted) == 5 + 6
    items = [weighted[p] for p in range(len(weighted))]
    big = [i for _, i in items if i < 10]
    assert len(big) == 5 == len(set(big))  # half of the large source, no repeats
    small = [(e, i) for e, i in items if i >= 10]
    assert sorted(i for _, i in small) == [10, 10, 11, 11, 12, 12]
    assert len(set(small)) == 6  # the two copies of an example are built under different epochs (seeds)
    first = list(weighted.draws)
    weighted.set_epoch(1)
    assert len(weighted) == 11 and weighted.draws != first  # another sample of the large source ...
    weighted.set_epoch(0)
    assert weighted.draws == first  # ... and the same one again for the same epoch (resume)


def test_pretraining_on_two_sources_with_colliding_ids_feeds_each_row_its_own_features(two_sources, tmp_path,
                                                                                        monkeypatch):
    from interbert.recipes import pretrain
    from interbert.recipes.common import load_recipe_config

    seen = []

    class RecordingTrainer(pretrain.Trainer):
        def _forward_backward(self, batch, sync_gradients):
            seen.append((list(batch["meta"]["image_ids"]), batch["region_features"][:, 0, 0].tolist()))
            return super()._forward_backward(batch, sync_gradients)

    monkeypatch.setattr(pretrain, "Trainer", RecordingTrainer)
    cfg = load_recipe_config(CONFIG, [
        sources_setting(two_sources, vg=2.0), "data.vocab_size=120", f"train.output_dir={tmp_path / 'run'}",
        "train.progress_bar=false", "train.tensorboard=false", "train.max_steps=4", "train.batch_size=6",
        "train.save_every=null", "model.overrides.itc_loss_weight=0.0"])
    result = pretrain.run(cfg)
    assert result["steps"] == 4 and result["images"] == 10 and result["examples"] == 20
    assert len(seen) == 4
    rows = [(image_id, value) for ids, values in seen for image_id, value in zip(ids, values)]
    assert {image_id.split("/")[0] for image_id, _ in rows} == {"coco", "vg"}
    # the global region (position 0, never masked) is the mean of the image's features: offset + k
    for image_id, value in rows:
        name, k = image_id.split("/")
        assert value == pytest.approx({"coco": 100.0, "vg": 200.0}[name] + int(k)), image_id
    assert all(np.isfinite(v) for v in result["history"]["loss"])


def test_pretraining_refuses_sources_and_single_paths_together(two_sources, tmp_path, capsys):
    from interbert.cli import main

    coco_captions, coco_features = two_sources["coco"]
    code = main(["pretrain", "--config", str(CONFIG), sources_setting(two_sources), f"data.captions={coco_captions}",
                 f"train.output_dir={tmp_path / 'run'}"])
    assert code == 2 and "give either data.sources or data.captions + data.features" in capsys.readouterr().err


def test_data_check_reads_the_sources_of_a_training_config(two_sources, tmp_path, capsys):
    from interbert.cli import main

    entries = [{"name": n, "captions": str(c), "features": str(f)} for n, (c, f) in two_sources.items()]
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"data": {"sources": entries}}))  # JSON is YAML
    assert main(["data", "check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "== source 'coco' ==" in out and "== source 'vg' ==" in out
    assert "OK: the 2 sources can train together" in out

    # a source whose features are another size can train alone but not with the others
    odd = write_source(tmp_path / "odd", 300.0, dim=16)
    entries.append({"name": "odd", "captions": str(odd[0]), "features": str(odd[1])})
    config.write_text(json.dumps({"data": {"sources": entries}}))
    assert main(["data", "check", "--config", str(config)]) == 1
    assert "16-d features" in capsys.readouterr().out

    # a broken caption file is reported under its source's heading, with file and line
    (tmp_path / "vg" / "captions.jsonl").write_text('{"image_id": 1, "caption": "a bus"}\n{"image_id": 2}\n')
    assert main(["data", "check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "captions.jsonl:2" in out and out.index("captions.jsonl:2") > out.index("== source 'vg' ==")


def test_validation_captions_come_from_every_source_namespaced(tmp_path):
    from interbert.recipes.settings import PretrainDataSettings
    from interbert.recipes.validation import validation_captions
    from interbert.utils.config_files import ConfigError

    a = write_source(tmp_path / "a", 1.0, images=3, split="val")
    b = write_source(tmp_path / "b", 2.0, images=2, split="val")
    data = {"sources": [{"name": "a", "captions": str(a[0]), "features": str(a[1])},
                        {"name": "b", "captions": str(b[0]), "features": str(b[1])}], "val_images": 2}
    captions = validation_captions(PretrainDataSettings(**data), "run.yaml")
    assert sorted({c.image_id for c in captions}) == ["a/0", "a/1", "b/0", "b/1"]  # the first 2 images of each
    assert all(c.caption_id.split("/")[0] == c.image_id.split("/")[0] for c in captions)
    c = write_source(tmp_path / "c", 3.0, images=2, split="train")
    data["sources"].append({"name": "c", "captions": str(c[0]), "features": str(c[1])})
    with pytest.raises(ConfigError, match=r"run.yaml: .*c/captions.jsonl has no 'val' split"):
        validation_captions(PretrainDataSettings(**data), "run.yaml")
