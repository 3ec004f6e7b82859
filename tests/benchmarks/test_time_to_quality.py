"""benchmarks/time_to_quality.py: the verdict's arithmetic, the original's converted model going through
the demo's fine-tuning and scoring, and the quality runs' cache. (The original's code itself is never in
this repository, so its training loop runs only where a user points the benchmark at a checkout.)"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import time_to_quality as ttq  # noqa: E402
from conftest import shared_path  # noqa: E402


def _result(kind: str, seed: int, steps: int, ir: float, zs: float) -> dict:
    return {"kind": kind, "seed": seed, "steps": steps, "pretrain_seconds": 1.0,
            "finetuned": {"R@1": ir}, "zero_shot": {"R@1": zs}}


def test_the_verdict_takes_our_fewest_steps_whose_seed_means_reach_the_original_on_both_metrics():
    results = [_result("original", s, 800, ir, zs) for s, ir, zs in ((0, 10.0, 4.0), (1, 12.0, 6.0))]
    # 50 steps: fine-tuned above the original's mean (11.0) but zero-shot below (5.0); 100: both reach it
    results += [_result("interbert", s, 50, ir, zs) for s, ir, zs in ((0, 12.0, 3.0), (1, 13.0, 4.0))]
    results += [_result("interbert", s, 100, ir, zs) for s, ir, zs in ((0, 11.0, 5.0), (1, 11.0, 5.0))]
    results += [_result("interbert", s, 200, ir, zs) for s, ir, zs in ((0, 20.0, 15.0), (1, 22.0, 17.0))]
    means = ttq.seed_means(results)
    assert means[("original", 800)]["finetuned"] == (11.0, pytest.approx(1.4142, abs=1e-4))
    assert ttq.fewest_steps_reaching(means, means[("original", 800)]) == 100
    higher = {"finetuned": (30.0, 0.0), "zero_shot": (1.0, 0.0)}
    assert ttq.fewest_steps_reaching(means, higher) is None


def test_the_report_gives_pretraining_seconds_and_the_ratio_of_times(tmp_path):
    class Args:
        original_steps, steps, seeds, threads, rounds = [800, 3200], [100, 200], [0, 1], 2, 3

    results = [_result("original", s, 800, 10.0, 4.0) for s in (0, 1)]
    results += [_result("original", s, 3200, 30.0, 25.0) for s in (0, 1)]
    results += [_result("interbert", s, 100, 9.0, 6.0) for s in (0, 1)]
    results += [_result("interbert", s, 200, 12.0, 6.0) for s in (0, 1)]
    speed = {"seconds_per_step": {"original": 0.25, "interbert": 0.2}}
    text = ttq.write_results(Args, results, speed, None, tmp_path)
    # 800 x 0.25 = 200 s against 200 x 0.2 = 40 s
    assert "by 200 steps: 40 s of pretraining against the original's 200 s, **5.0x** sooner" in text
    assert "None of our step counts reaches the original's 3200-step quality" in text
    recorded = json.loads((tmp_path / "time_to_quality.json").read_text())["verdicts"]
    assert [(v["original_steps"], v["fewest_steps"]) for v in recorded] == [(800, 200), (3200, None)]


def test_a_model_trained_by_the_original_code_is_fine_tuned_and_scored_as_ours_are(tmp_path):
    """The team's checkpoint of the original code stands in for its training loop: converted, saved with
    a vocabulary, then the demo's retrieval fine-tuning and both scorings run on it."""
    import torch

    from interbert.convert import from_official, load_state_dict
    from interbert.data.captions import read_captions
    from interbert.recipes.common import train_run_wordpiece
    from interbert.recipes.demo import finetune_and_evaluate
    from interbert.recipes.demo_settings import QUICK, benchmark_files, load_demo
    from interbert.synthetic import generate

    original = json.loads(shared_path("fixtures", "official_tiny.json").read_text())
    state = load_state_dict(shared_path("fixtures", "official_tiny.npz"))
    settings = load_demo([*QUICK, f"data.feature_dim={original['v_feature_size']}"])
    sizes = settings.data
    manifest = generate(tmp_path / "data", images=sizes.pretrain_images + sizes.finetune_images + sizes.test_images,
                        fmt="store", feature_dim=sizes.feature_dim, num_classes=original["v_target_size"],
                        val_images=sizes.finetune_images, test_images=sizes.test_images, render_images=False)
    data = benchmark_files(manifest, tmp_path / "data")
    texts = [c.text for c in read_captions(data["captions"]) if c.split == "train"]
    tokenizer = train_run_wordpiece(texts, tmp_path / "vocab", vocab_size=original["vocab_size"])
    assert len(tokenizer) <= original["vocab_size"]
    folder = tmp_path / "converted"
    converted = from_official(state, original)
    converted.save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))

    scores = finetune_and_evaluate(tmp_path, settings, data, folder)

    for side in ("finetuned", "zero_shot"):
        assert 0.0 <= scores[side]["image_retrieval"]["R@1"] <= 100.0
    tuned = json.loads((tmp_path / "finetune" / "model" / "config.json").read_text())
    assert tuned["hidden_size"] == original["hidden_size"]  # the original's sizes, not the settings' preset
    assert tuned["itc_loss_weight"] == settings.model.overrides["itc_loss_weight"]  # the demo's fine-tuning applies to it
    from interbert.loading import load_model

    after = load_model(tmp_path / "finetune" / "model", task="retrieval").state_dict()
    before = converted.state_dict()
    name = "interbert.single_stream.0.query.weight"
    assert not torch.equal(after[name], before[name])  # fine-tuning trained the converted weights


def test_a_finished_quality_run_is_read_back_not_redone(tmp_path, monkeypatch):
    monkeypatch.setattr(ttq, "QUICK", True)
    first = ttq.run_job("interbert", 0, 3, tmp_path, None, 1)
    assert first["steps"] == 3 and first["kind"] == "interbert"
    assert "itm_loss" in first["final_losses"]  # the pretraining's own log, read back
    assert (tmp_path / "interbert-s0-k3" / "pretrain" / "model" / "config.json").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    import interbert.recipes.pretrain as pretrain

    monkeypatch.setattr(pretrain, "run", no_training)
    assert ttq.run_job("interbert", 0, 3, tmp_path, None, 1) == json.loads(json.dumps(first, default=float))


def test_an_original_run_at_chance_gets_no_ratio_and_its_longest_run_a_lower_bound():
    chance = 1.25
    results = [_result("original", s, k, 1.25, 1.0) for s in (0, 1) for k in (800, 3200)]
    results += [_result("interbert", s, 50, 1.25, 1.25) for s in (0, 1)]  # chance too: it "reaches" nothing here
    results += [_result("interbert", s, 400, 8.0, 5.0) for s in (0, 1)]
    found = ttq.verdicts(ttq.seed_means(results), {"original": 0.2, "interbert": 0.2}, [800, 3200], chance)
    assert [(v["kind"], v["original_steps"], v["fewest_steps"]) for v in found] == [
        ("at_chance", 800, None), ("at_chance", 3200, None), ("lower_bound", 3200, 400)]
    assert "speedup" not in found[0] and found[2]["speedup"] == pytest.approx(3200 / 400)
    assert "**more than 8.0x** sooner" in ttq.verdict_line(found[2], chance)
    assert "no time is compared" in ttq.verdict_line(found[0], chance)
