"""Issue 28's study (benchmarks/objectives_study.py): what it plans, what it reuses, and the numbers its tables show.

The runs are the demo's at the `--quick` sizes (a few dozen images, a few steps): the numbers mean nothing, the
plumbing is what is tested. The table math is checked on hand-made run records against scipy's paired t-test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import objectives_study as study_script  # noqa: E402

ESTIMATE = "estimate: {pretrain_step: 100, finetune_step: 50, evaluation: 600, mechanisms: 300, synth_image: 10}\n"
VARIANTS = """variants:
  shipped: {label: group masking}
  plain_masking: {label: plain masking, overrides: [pretrain.data.msm=token, pretrain.data.mrm=region]}
effects:
  RQ1: [shipped, plain_masking]
"""


def write_study(path: Path, seeds: str, series: str) -> Path:
    path.write_text(f"seeds: {seeds}\n" + VARIANTS + "series:\n" + series + ESTIMATE)
    return path


TWO_RUNS = """  noise:
    about: two runs
    knob: data.feature_noise
    variants: [shipped, plain_masking]
    settings: [{value: 1.0}]
"""


def test_dry_run_lists_every_run_cached_or_to_do_with_the_estimate(tmp_path, capsys):
    """A run two series share is planned once (listed under both, counted once); the estimate is the study's
    per-step figures times the runs' steps (--quick: 6 pretraining and 4 fine-tuning steps), data synth per image."""
    series = TWO_RUNS + """  scale:
    about: images at a step budget
    knob: data.pretrain_images
    steps_per_image: 0.1
    variants: [shipped]
    settings: [{value: 60}, {value: 120}]
"""
    study = write_study(tmp_path / "study.yaml", "[0]", series)
    assert study_script.cli(["--study", str(study), "--runs", str(tmp_path / "runs"), "--quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if line.startswith(("noise", "scale"))]
    assert [line[:3] for line in lines] == [["noise", "1", "shipped"], ["noise", "1", "plain_masking"],
                                            ["scale", "60", "shipped"], ["scale", "120", "shipped"]]
    assert all("to do" in " ".join(line) for line in lines)
    # 60 images at 0.1 steps per image: the --quick run's 6 steps; 120 images: 12 steps
    quick = 6 * 100 + 4 * 50 + 600 + 300  # 1,700 s
    assert "4 planned runs, 4 distinct: 0 cached, 4 to do." in out and out.count("~28 min") == 3
    assert f"{(3 * quick + 12 * 100 + 4 * 50 + 900) / 3600:.1f} h of runs" in out  # 2.1
    # three benchmarks (noise 1.0; 60 and 120 pretraining images), each with --quick's 20 + 10 other images
    assert f"{(90 + 90 + 150) * 10 / 60:.0f} min of data synth" in out  # 55
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    shared = write_study(tmp_path / "shared.yaml", "[0]", TWO_RUNS + TWO_RUNS.replace("noise:", "again:"))
    assert study_script.cli(["--study", str(shared), "--runs", str(tmp_path / "runs"), "--quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 planned runs, 2 distinct" in out and out.count("shared  (listed above)") == 2


def test_a_tiny_study_runs_once_and_is_reused_on_the_second_call(tmp_path, monkeypatch, capsys):
    study = write_study(tmp_path / "study.yaml", "[0]", TWO_RUNS)
    argv = ["--study", str(study), "--runs", str(tmp_path / "runs"), "--output", str(tmp_path / "results"), "--quick",
            "data.pretrain_images=24", "data.finetune_images=8", "data.test_images=6", "pretrain.train.max_steps=2",
            "finetune.train.max_steps=2", "--threads", "1"]
    assert study_script.cli(argv) == 0
    records = sorted((tmp_path / "runs").glob("*/result.json"))
    assert [r.parent.name.rsplit("_", 1)[0] for r in records] == ["plain_masking_seed0", "shipped_seed0"]
    first = [json.loads(r.read_text()) for r in records]
    assert all(r["config"]["data"]["feature_noise"] == 1.0 and r["device"] == "cpu" for r in first)
    assert {r["config"]["pretrain"]["data"]["msm"] for r in first} == {"token", "span"}
    mechanisms = first[0]["mechanisms"]["test"]
    assert mechanisms["images"] == 6 and mechanisms["itm_twins"]["twin_pairs"] == 3 and "train" not in first[0]["mechanisms"]
    data = list((tmp_path / "runs" / "data").iterdir())
    assert len(data) == 1 and json.loads((data[0] / "synth.json").read_text())["settings"]["feature_noise"] == 1.0
    table = (tmp_path / "results" / "objectives_study.md").read_text()
    assert "| 1 | group masking | 1/1 |" in table and "| 1 | plain masking | 1/1 |" in table

    def no_training(*args, **kw):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("interbert.recipes.demo_stages.run_variant", no_training)
    monkeypatch.setattr("interbert.recipes.demo_stages.generate_data", no_training)
    assert study_script.cli(argv) == 0
    assert [json.loads(r.read_text()) for r in records] == first
    # a run another study process finished after this one planned it is read, not trained again
    assert study_script.run_one(records[0].parent, {}, tmp_path, 0, None, 1, 0) == first[0]
    # a changed setting is a new run, not the old one
    assert study_script.cli([*argv, "--dry-run", "pretrain.train.max_steps=3"]) == 0
    assert "2 distinct: 0 cached, 2 to do" in capsys.readouterr().out


def record(ir: float, zero_shot: float, leak: float | None = None) -> dict:
    mechanisms = {"test": {"mrm_leakage": {"group": {"accuracy": 0.5}, "plain": {"accuracy": 0.5 + (leak or 0.0)},
                                           "leak": {"accuracy": leak}},
                           "itm_twins": {"twin": {"choice": 0.6}, "random": {"choice": 0.9}}}}
    return {"finetuned": {"image_retrieval": {"R@1": ir, "R@5": ir + 10, "R@10": ir + 20}},
            "zero_shot": {"image_retrieval": {"R@1": zero_shot, "R@5": zero_shot + 10}},
            "mechanisms": mechanisms, "seconds": 1800.0, "device": "cpu", "folder": "runs/x"}


def test_the_tables_show_mean_std_and_the_paired_test_and_mark_rows_short_of_seeds(tmp_path):
    series = TWO_RUNS.replace("settings: [{value: 1.0}]", "settings: [{value: 1.0}, {value: 2.0}]")
    study = study_script.load_study(write_study(tmp_path / "study.yaml", "[0, 1, 2]", series))
    plan = study_script.plan_runs(study, ["noise"], study_script_quick())
    hand = {("1", "shipped"): [(20, 15, 0.1), (22, 16, 0.2), (24, 20, 0.3)],
            ("1", "plain_masking"): [(18, 14, 0.0), (19, 13, 0.0), (23, 18, 0.0)],
            ("2", "shipped"): [(30, 25, None), (31, 26, None)]}  # seed 2 unfinished; plain masking not run at all
    done = {r.key: record(*hand[(r.setting, r.variant)][r.seed]) for r in plan
            if (r.setting, r.variant) in hand and r.seed < len(hand[(r.setting, r.variant)])}
    report = study_script.write_report(study, plan, done, tmp_path / "results")["series"]["noise"]

    shipped = next(r for r in report["rows"] if r["setting"] == "1" and r["variant"] == "shipped")
    assert shipped["metrics"]["IR R@1"]["mean"] == pytest.approx(22) and shipped["metrics"]["IR R@1"]["std"] == pytest.approx(2)
    assert shipped["metrics"]["MRM leak"]["mean"] == pytest.approx(20)  # a share, in %
    effect = next(e for e in report["effects"] if e["setting"] == "1")["metrics"]["IR R@1"]
    assert effect["mean"] == pytest.approx(2) and effect["std"] == pytest.approx(1) and effect["n"] == 3
    assert effect["p"] == pytest.approx(stats.ttest_rel([20, 22, 24], [18, 19, 23]).pvalue)  # 0.074
    assert effect["p"] == pytest.approx(0.0742, abs=1e-4)
    lonely = next(e for e in report["effects"] if e["setting"] == "2")["metrics"]["IR R@1"]
    assert lonely["n"] == 0 and lonely["p"] is None  # no pair: no difference and no test

    table = (tmp_path / "results" / "objectives_study.md").read_text()
    assert "| 1 | group masking | 3/3 | 22.0 +- 2.0 |" in table
    assert "| 2 | group masking | 2/3 **too few** | 30.5 +- 0.7 |" in table  # short of seeds: marked, not hidden
    assert "| 2 | plain masking | not run | - |" in table
    assert "| 1 | RQ1 | +2.0 +- 1.0 (p 0.074, n 3) |" in table
    assert "8 runs finished, 4.0 h of runs (by device: cpu 4.0 h)" in table
    assert (tmp_path / "results" / "objectives_study_noise.png").stat().st_size > 0
    saved = json.loads((tmp_path / "results" / "objectives_study.json").read_text())
    assert saved["series"]["noise"]["effects"][0]["metrics"]["IR R@1"]["seeds"] == [0, 1, 2]


def study_script_quick() -> list[str]:
    from interbert.recipes.demo_settings import QUICK

    return list(QUICK)


def test_the_tables_replace_their_section_and_keep_the_notes_around_it(tmp_path):
    note = tmp_path / "objectives_study.md"
    note.write_text("# the plan\n\nprose before\n\n" + study_script.BEGIN + "\nold tables\n" + study_script.END + "\n\nreading after\n")
    study_script.fill_markdown(note, study_script.BEGIN + "\nnew tables\n" + study_script.END)
    text = note.read_text()
    assert "prose before" in text and "reading after" in text and "new tables" in text and "old tables" not in text


@pytest.mark.parametrize("argv, said", [
    (["--series", "noise", "nope"], "unknown series ['nope']; the study lists ['noise']"),
    (["data.feature_noise=-1"], "data.feature_noise must be a finite standard deviation >= 0"),
    (["data.proposals_per_object=[6, 8]", "--seeds", "0"], "data.max_regions 24 would drop proposals"),
])
def test_a_bad_series_or_knob_value_is_one_error_line(argv, said, tmp_path, capsys):
    study = write_study(tmp_path / "study.yaml", "[0]", TWO_RUNS)
    assert study_script.cli(["--study", str(study), "--runs", str(tmp_path / "runs"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and said in err[0]
    assert not (tmp_path / "runs").exists()


def test_a_bad_knob_value_in_the_study_names_its_series_and_setting(tmp_path, capsys):
    bad = TWO_RUNS.replace("{value: 1.0}", "{value: 1.0}, {value: -0.5}")
    study = write_study(tmp_path / "study.yaml", "[0]", bad)
    assert study_script.cli(["--study", str(study), "--runs", str(tmp_path / "runs"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: series noise, setting -0.5, variant shipped:")
    assert "data.feature_noise must be a finite standard deviation >= 0, got -0.5" in err[0]


def test_the_shipped_study_plans_the_issue_s_series():
    """The YAML beside the script: >= 3 seeds, the scale series' steps at 0.2 per image (800 at the demo's
    4,000; 200 at the 1,000 a CPU session adds below it), the busiest proposals setting padded for every region, and the defaults shared across series."""
    study = study_script.load_study(study_script.STUDY)
    assert len(study.seeds) >= 3
    plan = study_script.plan_runs(study, list(study.series))
    steps = {r.setting: r.settings.pretrain.train.max_steps for r in plan if r.series == "scale"}
    assert steps == {"1000": 200, "4000": 800, "16000": 3200, "64000": 12800}
    assert {r.settings.data.max_regions for r in plan if r.series == "proposals" and r.setting == "6-8"} == {44}
    default = {r.key for r in plan if r.series == "default"}
    assert {r.key for r in plan if r.series == "scale" and r.setting == "4000"} <= default
    assert {r.key for r in plan if r.series == "twins" and r.setting == "0"} <= default
    assert len({r.key for r in plan}) == 96
    # results/ablations.md's dropout-0.1 rows as the demo's ablations resolve them: such a run is recognised
    from interbert.recipes.demo_ablations import load_ablations, variant_settings

    ablations = load_ablations()
    for variant, ablation in (("shipped", "interbert_clean"), ("plain_masking", "plain_masking_clean"),
                              ("random_negatives", "random_negatives_clean")):
        run = next(r for r in plan if r.series == "dropout01" and r.variant == variant and r.seed == 1)
        assert run.key == study_script.run_key(variant_settings(ablations, [], ablation, 1).to_dict(), 0)


def test_a_run_record_that_is_not_json_is_named_not_silently_rerun(tmp_path, capsys):
    study = write_study(tmp_path / "study.yaml", "[0]", TWO_RUNS)
    broken = tmp_path / "runs" / "shipped_seed0_0123456789ab" / "result.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"config": ')
    assert study_script.cli(["--study", str(study), "--runs", str(tmp_path / "runs"), "--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {broken}: not a run record")
