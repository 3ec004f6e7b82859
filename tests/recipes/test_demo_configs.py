"""The demo's configs (configs/demo/, issue 25) hand every stage what the demo's own DemoPlan handed it.

tests/data/demo_configs.json holds, for several `interbert demo` command lines and every ablation, each
stage's call as the code before the configs made it (recorded at deca2ed by the script of that commit,
tests/data/record_demo_configs.py, with every stage replaced by a recorder). Here the same command lines run
with the same recorders: the training recipes' settings must resolve to the same typed settings, the
evaluations to the same arguments (defaults included), the benchmark, VCR and index calls to the same
values. That is what makes `make demo` print the same table without running it.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

import interbert.recipes.vcr as vcr_module
import interbert.serve.index as index_module
import interbert.synthetic as synthetic
from interbert.cli import main
from interbert.errors import UsageError
from interbert.recipes import demo, demo_stages, finetune_retrieval, pretrain
from interbert.recipes.demo_ablations import load_ablations
from interbert.recipes.demo_settings import DROPOUTS, load_demo, plan_view, same_config
from interbert.recipes.evaluate_retrieval import evaluate_retrieval
from interbert.recipes.settings import PretrainSettings, RetrievalSettings

RECORDED = json.loads((Path(__file__).resolve().parents[1] / "data" / "demo_configs.json").read_text())
COMMANDS = sorted(name for name, value in RECORDED.items() if isinstance(value, dict) and "calls" in value)
SCHEMA = {"pretrain": PretrainSettings, "finetune": RetrievalSettings}


def plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def resolved(call: dict) -> dict:
    """A call as what it does: a recipe's settings through its schema, an evaluation's arguments with their defaults."""
    call = plain(call)
    if call["stage"] in SCHEMA:
        return {"stage": call["stage"], "config": SCHEMA[call["stage"]].coerce(call["config"]).to_dict()}
    if call["stage"] == "evaluate":
        kw = {k: v for k, v in call.items() if k != "stage"}
        bound = inspect.signature(evaluate_retrieval).bind(**kw)
        bound.apply_defaults()
        return {"stage": "evaluate", **plain(dict(bound.arguments))}
    return call


@pytest.fixture
def recorded_calls(monkeypatch, tmp_path):
    """Every stage of the demo replaced by a recorder (nothing trains); the calls, in order."""
    calls: list[dict] = []

    def generate(data_dir, **kw):
        calls.append({"stage": "generate", "data_dir": data_dir, **kw})
        return {"files": {"captions": "captions.json", "regions": "regions"}, "settings": kw,
                "splits": {"train": 1, "val": 1, "test": 1, "test_twin_pairs": 1}}

    def trained(stage):
        def run(cfg):
            settings = SCHEMA[stage].coerce(cfg)
            calls.append({"stage": stage, "config": settings.to_dict()})
            Path(settings.train.output_dir).mkdir(parents=True, exist_ok=True)
            return {"model_dir": str(Path(settings.train.output_dir) / "model"), "history": {"loss": [1.0]}, "seconds": 1.0}
        return run

    def evaluate(model_dir, captions, features, **kw):
        calls.append({"stage": "evaluate", "model_dir": model_dir, "captions": captions, "features": features, **kw})
        return {"image_retrieval": {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0, "median_rank": 1, "mean_rank": 1.0},
                "num_captions": 1, "num_images": 1}

    def demo_vcr(*args):
        calls.append({"stage": "vcr", "args": list(args[:2]) + list(args[3:])})
        return {"Q->A": 1.0, "QA->R": 1.0, "Q->AR": 1.0}

    monkeypatch.setattr(synthetic, "generate", generate)
    monkeypatch.setattr(pretrain, "run", trained("pretrain"))
    monkeypatch.setattr(finetune_retrieval, "run", trained("finetune"))
    monkeypatch.setattr(demo, "evaluate_retrieval", evaluate)
    monkeypatch.setattr(demo_stages, "evaluate_retrieval", evaluate)
    monkeypatch.setattr(vcr_module, "demo_vcr", demo_vcr)
    monkeypatch.setattr(index_module, "build_index", lambda *args, **kw: calls.append({"stage": "index", "args": list(args), **kw}))
    monkeypatch.setattr(demo, "write_plots", lambda summary, out: None)
    monkeypatch.setattr(demo, "check_bert", lambda settings: None)  # "bert/folder" is not there: the calls are compared
    monkeypatch.chdir(tmp_path)
    return calls


@pytest.mark.parametrize("command", COMMANDS)
def test_each_stage_gets_what_it_got_before_the_configs(command, recorded_calls):
    argv = RECORDED[command]["argv"]
    assert main(["demo", *argv]) == 0
    got = [resolved(call) for call in recorded_calls]
    want = [resolved(call) for call in RECORDED[command]["calls"]]
    assert [c["stage"] for c in got] == [c["stage"] for c in want]
    for n, (new, old) in enumerate(zip(got, want)):
        assert new == old, f"{command}: call {n} ({old['stage']})"


def test_the_ablations_are_the_recorded_ones():
    table = load_ablations()
    assert {name: a.label for name, a in table.variants.items()} == RECORDED["ablation_labels"]
    assert table.default == RECORDED["default_ablations"] and table.seeds == [0, 1, 2]


def test_print_config_lists_the_settings_and_each_recipes(capsys):
    assert main(["demo", "--print-config", "--quick", "pretrain.data.msm=token", "--out", "somewhere"]) == 0
    printed = capsys.readouterr().out
    import yaml

    docs = list(yaml.safe_load_all(printed))
    assert docs[0]["pretrain"]["data"]["msm"] == "token" and docs[0]["pretrain"]["train"]["max_steps"] == 6
    assert "seed" not in docs[0]["pretrain"]["train"] and "captions" not in docs[0]["finetune"]["data"]  # the demo's own
    pretraining, from_pretrained, scratch = (PretrainSettings.coerce(docs[1]), RetrievalSettings.coerce(docs[2]),
                                             RetrievalSettings.coerce(docs[3]))
    assert pretraining.data.msm == "token" and pretraining.train.output_dir == str(Path("somewhere") / "pretrain")
    assert from_pretrained.model.from_checkpoint == str(Path("somewhere") / "pretrain" / "model")
    assert scratch.model.from_checkpoint is None and scratch.data.tokenizer == from_pretrained.model.from_checkpoint
    assert not Path("somewhere").exists()


@pytest.mark.parametrize("override, said", [
    ("pretrain.train.seed=3", "pretrain.train.seed is set by the demo (the demo's seed)"),
    ("finetune.data.max_tokens=40", "finetune.data.max_tokens is set by the demo (data.max_tokens)"),
    ("pretrain.model.preset=small", "unknown config key 'pretrain.model'"),
    ("pretrain.data.msm=spans", "pretrain.yaml: pretrain.data.msm must be one of span, geometric, token"),
    ("model.overrides.hidden_dropout_prob=0.2", "model.dropout sets every dropout of the model"),
    ("data.test_images=0", "data.yaml: data.test_images must be a whole number >= 1"),
    ("pretrain.data=5", "pretrain.yaml: pretrain.data must be a mapping"),
])
def test_a_bad_override_is_one_error_naming_its_key(override, said, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1 and err.startswith("error:")
    assert not (tmp_path / "demo").exists()


def test_an_unknown_ablation_is_refused_before_any_run(tmp_path, capsys):
    with pytest.raises(UsageError, match="unknown ablation"):
        demo.run_ablations(tmp_path, [], {}, tmp_path, ["interbert", "no_such_variant"])
    assert not any(tmp_path.iterdir())
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--ablation-variants", "interbert", "nope"]) == 2
    assert "unknown ablation(s) ['nope']" in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_a_run_is_reused_only_under_the_same_settings():
    planned = load_demo(["model.dropout=null"])
    recorded = json.loads(json.dumps(planned.to_dict()))
    assert same_config(recorded, planned)
    assert not same_config(recorded, load_demo(["model.dropout=null", "pretrain.data.msm=token"]))
    # a setting added since the record counts as its default; one since removed, or no record, is not the same
    del recorded["pretrain"]["train"]["log_every"]
    assert same_config(recorded, planned)
    assert not same_config({**recorded, "gone": 1}, planned) and not same_config(None, planned)
    # a run recorded before the configs (a flat DemoPlan) is not recognised: it runs again
    assert not same_config(plan_view(planned), planned)


def test_the_dropout_setting_reaches_every_dropout_and_the_flat_plan():
    shipped = load_demo()
    assert all(shipped.model.recipe_model()["overrides"][name] == 0.0 for name in DROPOUTS)
    assert DROPOUTS and load_demo(["model.dropout=null"]).model.recipe_model()["overrides"].keys().isdisjoint(DROPOUTS)
    plan = plan_view(load_demo(["model.overrides.num_single_stream_layers=1",
                                "model.overrides.num_text_stream_layers=2", "model.overrides.num_image_stream_layers=1"]))
    assert plan["layers"] == [1, 2, 1] and plan["dropout"] == 0.0 and plan["pretrain_steps"] == 800
    assert plan["itm_inputs"] == "clean" and plan["hard_ratio"] == 0.5 and plan_view(shipped)["layers"] is None


def test_the_benchmark_knobs_reach_data_synth_and_a_benchmark_of_other_knobs_is_not_reused(tmp_path, monkeypatch):
    """Issue 28: `interbert demo data.feature_noise=1.5` generates its own benchmark; at the defaults the call is
    the one recorded before the knobs (test above), and a folder generated with other knobs is regenerated."""
    from interbert.recipes.demo_settings import generate_arguments

    assert "feature_noise" not in generate_arguments(load_demo())
    noisy = load_demo(["data.feature_noise=1.5", "data.proposals_per_object=[1, 1]"])
    assert generate_arguments(noisy)["feature_noise"] == 1.5 and generate_arguments(noisy)["proposals_per_object"] == [1, 1]
    calls = []
    monkeypatch.setattr(synthetic, "generate", lambda data_dir, **kw: calls.append(kw) or {"settings": kw})
    (tmp_path / "synth.json").write_text(json.dumps({"settings": {**generate_arguments(noisy), "group_iou": 0.5,
                                                                  "twin_share": 0.0}}))
    demo_stages.generate_data(noisy, tmp_path)
    assert calls == []  # the same knobs: reused
    demo_stages.generate_data(load_demo(), tmp_path)
    assert len(calls) == 1 and "feature_noise" not in calls[0]  # the default benchmark is not the noisy one


@pytest.mark.parametrize("override, said", [
    ("data.group_iou=2", "data.group_iou must be an IoU in [0.1, 1)"),
    ("data.proposals_per_object=[6, 8]", "data.max_regions 24 would drop proposals"),
    ("data.twin_share=-0.1", "data.twin_share must be a share"),
])
def test_a_bad_knob_is_one_error_naming_its_key(override, said, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1 and err.startswith("error:")
