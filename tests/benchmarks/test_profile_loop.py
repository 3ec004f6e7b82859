"""profile_loop's aten op counts and per-pass phases: the counting (common.py's, shared with compiled_step.py)
counts nested ops and is stable from one profiled step to the next, and every encoder-pass phase points at a
function this tree has (a renamed one would silently read 0)."""

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import aten_op_count, aten_ops_per_step, pretraining_batch, top_aten_ops  # noqa: E402
from profile_loop import PHASES, aten_summary  # noqa: E402

from interbert.config import preset  # noqa: E402
from interbert.modeling import InterBertForPreTraining  # noqa: E402


def test_aten_ops_of_a_training_step_are_counted_and_stable():
    torch.manual_seed(0)
    model = InterBertForPreTraining(preset("tiny")).train()
    batch = pretraining_batch(model.config, 4, seed=0)

    def step(_):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    first, second = aten_ops_per_step(step, steps=1), aten_ops_per_step(step, steps=1)
    assert first > 100 and first == second


def test_nested_aten_ops_count():
    x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
    # aten::linear runs aten::addmm (and a transpose) inside it: counting only the outer call would give 1
    assert aten_ops_per_step(lambda _: F.linear(x, w, b), steps=2) >= 2


def test_top_aten_ops_add_up_runs_per_step_and_skip_other_events():
    table = [("aten::mm", 4, 400.0), ("aten::add", 10, 100.0), ("Optimizer.step", 1, 5000.0),
             ("aten::mm", 2, 200.0), ("aten::copy_", 6, 300.0)]  # two runs of one step each
    assert aten_op_count(table) == 22
    top = top_aten_ops(table, steps=2, n=2)
    assert [t["op"] for t in top] == ["aten::mm", "aten::copy_"]
    assert top[0]["self_cpu_ms_per_step"] == 0.3 and top[0]["calls_per_step"] == 3


def test_every_encoder_pass_phase_points_at_a_function_of_this_tree():
    found = set()
    for phase in PHASES:
        owner = importlib.import_module(phase.module)
        for part in phase.path.split("."):
            owner = getattr(owner, part, None)
        if owner is not None and phase.recipe is None:  # an entry every recipe's run wraps
            found.add(phase.name)
    assert {"forward: masked pass", "forward: clean pass", "forward: ITC passes", "forward (all)"} <= found


def test_each_side_reports_the_median_ops_per_step_and_drops_the_raw_tables():
    def run(mm_calls: int) -> dict:
        return {"profiled_steps": 2, "profile": [("aten::mm", mm_calls, 100.0), ("aten::add", 2, 10.0), ("Step", 1, 1.0)]}

    sides = {"before": [run(4), run(8), run(6)], "after": [run(2)]}
    summary, markdown = aten_summary(sides)
    assert summary["aten_ops_per_step"] == {"before": 4.0, "after": 2.0}  # (6 + 2) / 2 steps, the middle run
    top = summary["top_aten_ops"]["before"]  # the three runs' 6 steps together
    assert top[0] == {"op": "aten::mm", "self_cpu_ms_per_step": pytest.approx(0.05), "calls_per_step": 3}
    assert all("profile" not in r for runs in sides.values() for r in runs)
    assert [r["aten_ops_per_step"] for r in sides["before"]] == [3.0, 5.0, 4.0]
    assert "| **aten ops per step** | 4 | 2 | 0.50x |" in "\n".join(markdown)
