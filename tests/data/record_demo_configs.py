"""Record what `interbert demo` hands to each stage (run once, on the code before issue 25's demo configs).

    PYTHONPATH=<worktree>/src python <worktree>/tests/data/record_demo_configs.py <worktree>/tests/data/demo_configs.json

Every stage is replaced by a recorder (benchmark generation, pretraining, both fine-tunings, the three
evaluations, VCR, the index), so nothing trains; each command line's calls are written in order, with the
out folder the relative `runs/demo` so the paths compare on any machine.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


COMMANDS = {
    "demo": ["demo", "--out", "runs/demo"],
    "demo_quick_vcr": ["demo", "--out", "runs/demo", "--quick", "--vcr"],
    "demo_zh_seed3": ["demo", "--out", "runs/demo", "--lang", "zh", "--seed", "3"],
    "demo_small_layers": ["demo", "--out", "runs/demo", "--preset", "small", "--layers", "1", "2", "1"],
    "demo_from_bert": ["demo", "--out", "runs/demo", "--preset", "small", "--from-bert", "bert/folder"],
}


def main(target: str) -> None:
    import interbert.recipes.vcr as vcr_module
    import interbert.serve.index as index_module
    import interbert.synthetic as synthetic
    from interbert.cli import main as cli
    from interbert.recipes import demo

    calls: list = []

    def generate(data_dir, **kw):
        calls.append({"stage": "generate", "data_dir": data_dir, **kw})
        return {"files": {"captions": "captions.json", "regions": "regions"}, "settings": kw,
                "splits": {"train": 1, "val": 1, "test": 1, "test_twin_pairs": 1}}

    def trained(stage):
        def run(cfg):
            calls.append({"stage": stage, "config": cfg})
            Path(cfg["train"]["output_dir"]).mkdir(parents=True, exist_ok=True)
            return {"model_dir": str(Path(cfg["train"]["output_dir"]) / "model"), "history": {"loss": [1.0]},
                    "seconds": 1.0}
        return run

    def evaluate(model_dir, captions, features, **kw):
        calls.append({"stage": "evaluate", "model_dir": model_dir, "captions": captions, "features": features, **kw})
        return {"image_retrieval": {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0, "median_rank": 1, "mean_rank": 1.0},
                "num_captions": 1, "num_images": 1}

    def demo_vcr(*args):
        calls.append({"stage": "vcr", "args": list(args[:2]) + list(args[3:])})
        return {"Q->A": 1.0, "QA->R": 1.0, "Q->AR": 1.0}

    def build_index(*args, **kw):
        calls.append({"stage": "index", "args": list(args), **kw})

    synthetic.generate = generate
    demo.pretrain.run = trained("pretrain")
    demo.finetune_retrieval.run = trained("finetune")
    demo.evaluate_retrieval = evaluate
    vcr_module.demo_vcr = demo_vcr
    index_module.build_index = build_index
    demo.write_plots = lambda summary, out: None
    demo.check_plan = lambda plan: None  # a BERT folder that is not there: the configs are what is recorded

    commands = {**COMMANDS}
    every = list(demo.ABLATIONS)
    commands["ablations"] = ["demo", "--out", "runs/demo", "--ablations-only", "--ablation-variants", *every]
    commands["ablations_quick"] = ["demo", "--out", "runs/demo", "--quick", "--ablations-only", "--ablation-variants", *every]
    recorded = {}
    for name, argv in commands.items():
        os.chdir(tempfile.mkdtemp())  # no run recorded by an earlier command is reused
        calls.clear()
        assert cli(argv) == 0, name
        recorded[name] = {"argv": argv[1:], "calls": plain(calls)}
    recorded["ablation_labels"] = {name: label for name, (label, _) in demo.ABLATIONS.items()}
    recorded["default_ablations"] = list(demo.DEFAULT_ABLATIONS)
    Path(target).write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]))
