"""The demo's stages as functions of its settings: the benchmark, and pretraining -> fine-tuning -> scoring
of one variant. The main table (:mod:`interbert.recipes.demo`), the ablations
(:mod:`interbert.recipes.demo_ablations`) and the benchmarks (``benchmarks/bert_init.py``,
``time_to_quality.py``) run them alike."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from interbert.recipes import finetune_retrieval, pretrain
from interbert.recipes.demo_settings import (
    KNOB_DEFAULTS,
    DemoSettings,
    benchmark_files,
    evaluate_arguments,
    finetune_settings,
    generate_arguments,
    pretrain_settings,
)
from interbert.recipes.evaluate_retrieval import evaluate_retrieval
from interbert.utils.machine import cpu_model

logger = logging.getLogger(__name__)


def generate_data(demo: DemoSettings, data_dir: Path) -> dict:
    """The built-in benchmark of ``demo.data`` in ``data_dir`` (its manifest); one already there with the
    same settings is reused."""
    from interbert.synthetic import MANIFEST, generate

    manifest_file = data_dir / MANIFEST
    want = generate_arguments(demo)
    if manifest_file.exists():
        manifest = json.loads(manifest_file.read_text())
        # the knobs at their defaults too: a benchmark generated with other knobs is not the default one
        if all(manifest["settings"].get(k) == v for k, v in {**KNOB_DEFAULTS, **want}.items()):
            logger.info("reusing the benchmark in %s", data_dir)
            return manifest
    logger.info("generating the built-in benchmark in %s", data_dir)
    return generate(data_dir, **want)


def finetune_and_evaluate(out: Path, demo: DemoSettings, files: Mapping[str, str], pretrained: str | Path,
                          device: str | None = None) -> dict:
    """Fine-tune retrieval from the ``pretrained`` folder as the demo does (``out/finetune``), then score the
    fine-tuned model and the pretrained one zero-shot on the test split: ``{"finetuned", "zero_shot"}``.
    ``pretrained`` may come from any pretraining (e.g. a converted checkpoint of the original code): the
    settings' fine-tuning applies to it, its sizes are its own. ``files``: :func:`benchmark_files`."""
    ft = finetune_retrieval.run(finetune_settings(demo, out / "finetune", files, str(pretrained), str(pretrained), device))
    kw = {**evaluate_arguments(demo), "progress": False, "device": device or "cpu"}
    return {"finetuned": evaluate_retrieval(ft["model_dir"], files["captions"], files["features"], **kw),
            "zero_shot": evaluate_retrieval(str(pretrained), files["captions"], files["features"], zero_shot=True, **kw)}


def run_variant(out: Path, demo: DemoSettings, manifest: dict, data_dir: Path, device: str | None = None) -> dict:
    """Pretrain with one variant's settings, fine-tune from it, evaluate fine-tuned and zero-shot (no scratch
    row). ``device``: where to train and score (cpu, cuda, auto); None: training's default (auto), scoring
    on the CPU."""
    files = benchmark_files(manifest, data_dir)
    start = time.perf_counter()
    pre = pretrain.run(pretrain_settings(demo, out, files, device))
    scores = finetune_and_evaluate(out, demo, files, pre["model_dir"], device)
    return {**scores, "seconds": time.perf_counter() - start, "pretrain_seconds": pre["seconds"],
            "pretrained": str(pre["model_dir"])}


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
