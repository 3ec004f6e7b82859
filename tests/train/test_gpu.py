"""What only a GPU can check: fp16 with loss scaling, bf16 with gradient checkpointing, CUDA evaluation,
evaluation under torchrun on CUDA (NCCL), and a model trained on CUDA that reloads on a CPU.

Every test is marked ``gpu`` and skips, saying why, without CUDA (CI and the CPU machines). On a GPU machine:

    PYTHONPATH=src python3 -m pytest -q -p no:cacheprovider -m gpu tests/train/test_gpu.py -rs

Dry run of the logic on a CPU (fp16 is refused there, so mixed precision is off and the scaler checks are
skipped): ``INTERBERT_TEST_GPU_DEVICE=cpu`` with the same command.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
DEVICE = os.environ.get("INTERBERT_TEST_GPU_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")  # else a CPU dry run: fp32, no loss scaler

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                              "INTERBERT_TEST_GPU_DEVICE=cpu dry-runs the logic on a CPU"),
]

# the mixed-precision settings of the runs: fp16 + loss scaling on the GPU, plain fp32 in the dry run
FP16 = ["train.bf16=false", f"train.fp16={'true' if ON_GPU else 'false'}"]


@pytest.fixture(autouse=True)
def _exact_float32():
    """fp32 comparisons against the CPU must not run their matmuls in TF32 (10-bit mantissa)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# not named `benchmark`: the GPU machine has pytest-benchmark, whose fixture of that name would clash
@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory) -> dict[str, Path]:
    """The generated benchmark (small features) and a saved, untrained pretraining model folder."""
    if ON_GPU and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from interbert.cli import main
    from interbert.data.features import open_features
    from interbert.modeling import InterBertForPreTraining
    from interbert.recipes.common import captions_of_split, new_model, tokenizer_for

    root = tmp_path_factory.mktemp("gpu_benchmark")
    data = root / "data"
    assert main(["data", "synth", str(data), "--images", "48", "--feature-dim", "32", "--num-classes", "12",
                 "--no-images", "--workers", "1"]) == 0
    store = open_features(data / "regions.tsv")
    pretrained = root / "pretrained"
    tokenizer = tokenizer_for([c.text for c in captions_of_split(data / "captions.json", "train")], root, vocab_size=200)
    torch.manual_seed(0)
    model = new_model(InterBertForPreTraining, tokenizer, store, preset_name="tiny",
                      overrides={"embedding_size": 32, "itc_loss_weight": 1.0})
    model.save_pretrained(pretrained)
    tokenizer.save_pretrained(str(pretrained))
    return {"data": data, "pretrained": pretrained}


def pretrain_settings(data: Path, out: Path, *overrides: str):
    from interbert.recipes.settings import PretrainSettings

    return PretrainSettings.load(CONFIGS / "pretrain_tiny.yaml", [
        f"data.captions={data / 'captions.json'}", f"data.features={data / 'regions.tsv'}", "data.vocab_size=200",
        "data.max_regions=12", "data.negatives=random", f"train.output_dir={out}", f"train.device={DEVICE}",
        "train.progress_bar=false", "train.tensorboard=false", "train.batch_size=16", *overrides])


# ---------------------------------------------------------------------------------------------------
# 1. fp16 pretraining through the recipe: it learns, the loss scale is checkpointed, a resume continues
# ---------------------------------------------------------------------------------------------------
def test_fp16_pretraining_learns_checkpoints_the_loss_scale_and_resumes(gpu_data, tmp_path):
    from interbert.recipes import pretrain

    steps, middle = 40, 20
    first = tmp_path / "uninterrupted"
    result = pretrain.run(pretrain_settings(gpu_data["data"], first, *FP16, f"train.max_steps={steps}",
                                            f"train.save_every={middle}", "train.keep_checkpoints=2"))
    losses = result["history"]["loss"]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses  # it learns under fp16

    final = torch.load(first / "checkpoint.pt", weights_only=True)
    if ON_GPU:  # the GradScaler's state travels with the checkpoint: a resume keeps the learned scale
        scaler = final["scaler"]
        assert scaler is not None and {"scale", "_growth_tracker"} <= set(scaler), scaler
        assert math.isfinite(scaler["scale"]) and scaler["scale"] > 0
    else:
        assert final["scaler"] is None

    # resume from the middle checkpoint in a copy of the run folder (vocabulary included): the same run
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    (resumed / "checkpoint.pt").unlink()
    shutil.copy(resumed / f"checkpoint-{middle}.pt", resumed / "checkpoint.pt")
    for name in ("model", "loss_history.json", f"checkpoint-{steps}.pt"):
        target = resumed / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    middle_state = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert middle_state["step"] == middle
    again = pretrain.run(pretrain_settings(gpu_data["data"], resumed, *FP16, f"train.max_steps={steps}",
                                           f"train.save_every={middle}", "train.keep_checkpoints=2"), resume=True)
    continued = again["history"]["loss"]
    assert again["steps"] == steps and len(continued) == steps
    assert continued[:middle] == losses[:middle]  # the history up to the checkpoint, read back
    # the updates after the resume follow the uninterrupted run (CUDA kernels are not bit-reproducible)
    assert continued[middle:] == pytest.approx(losses[middle:], rel=2e-2 if ON_GPU else 1e-5)
    end = torch.load(resumed / "checkpoint.pt", weights_only=True)
    if ON_GPU:
        assert end["scaler"]["scale"] == final["scaler"]["scale"]  # the same scale history, not a fresh 65536


# ---------------------------------------------------------------------------------------------------
# 2. bf16 + gradient checkpointing = bf16 without it; fp32 CUDA forward = fp32 CPU forward
# ---------------------------------------------------------------------------------------------------
DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "image_hidden_dropout_prob",
            "image_attention_probs_dropout_prob", "itm_dropout_prob")


def pretraining_batch(gpu_data, size: int = 8) -> tuple[dict, object]:
    """A masked pretraining batch of the generated data and the (untrained) model saved beside it, dropout off."""
    from interbert.data import model_inputs
    from interbert.data.batches import PretrainingDataset, collate
    from interbert.data.features import open_features
    from interbert.data.tokenize import load_tokenizer
    from interbert.loading import load_model
    from interbert.recipes.common import captions_of_split

    tokenizer = load_tokenizer(gpu_data["pretrained"])
    captions = captions_of_split(gpu_data["data"] / "captions.json", "train")
    dataset = PretrainingDataset(captions, open_features(gpu_data["data"] / "regions.tsv"), tokenizer,
                                 max_regions=12, hard_negatives=None, seed=0)
    batch = model_inputs(collate([dataset[i] for i in range(size)], pad_token_id=tokenizer.pad_token_id))
    assert batch["msm_labels"].ne(-100).any() and batch["mrm_mask"].any()  # every head has something to learn
    model = load_model(gpu_data["pretrained"], task="pretraining",
                       config_updates={name: 0.0 for name in DROPOUTS})
    return batch, model


def on(device, batch: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def bf16_step(model, batch: dict, checkpointing: bool) -> tuple[float, float, int]:
    """Loss, gradient norm and how often the first single-stream layer ran, for one bf16 autocast step."""
    from interbert.train import enable_gradient_checkpointing

    model = copy.deepcopy(model).to(DEVICE).train()
    if checkpointing:
        enable_gradient_checkpointing(model)  # what train.gradient_checkpointing=true does
    layer, calls = model.interbert.single_stream[0], []
    forward = layer.forward  # counted by wrapping: forward hooks do not fire in the recomputation

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    layer.forward = counted
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ON_GPU):
        loss = model(**on(DEVICE, batch)).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], float("inf"))
    return loss.item(), norm.item(), len(calls)


def test_bf16_gradient_checkpointing_gives_the_step_without_it(gpu_data):
    batch, model = pretraining_batch(gpu_data)
    plain_loss, plain_norm, plain_calls = bf16_step(model, batch, checkpointing=False)
    loss, norm, calls = bf16_step(model, batch, checkpointing=True)
    assert calls > plain_calls >= 1  # checkpointing is really on: the layer's passes are recomputed in backward
    assert math.isfinite(loss) and math.isfinite(norm) and norm > 0
    assert loss == pytest.approx(plain_loss, rel=1e-2)  # bf16: 8-bit mantissa
    assert norm == pytest.approx(plain_norm, rel=5e-2)


def test_float32_forward_on_cuda_matches_the_cpu(gpu_data):
    batch, model = pretraining_batch(gpu_data)
    model.eval()
    with torch.no_grad():
        expected = model(**batch)
        got = copy.deepcopy(model).to(DEVICE)(**on(DEVICE, batch))
    compared = 0
    for name in ("loss", "msm_loss", "mrm_loss", "itm_loss", "itc_loss", "msm_logits", "itm_logits",
                 "text_sequence", "image_sequence", "text_pooled", "image_pooled"):
        if getattr(expected, name) is None:
            continue
        compared += 1
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(expected, name), atol=1e-4, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert compared >= 8


# ---------------------------------------------------------------------------------------------------
# 3. retrieval evaluation on CUDA ranks as on the CPU
# ---------------------------------------------------------------------------------------------------
def test_retrieval_scores_and_recalls_on_cuda_equal_the_cpu(gpu_data, tmp_path):
    from interbert.data.tokenize import load_tokenizer
    from interbert.evaluate import image_retrieval_ranks
    from interbert.recipes.common import captions_of_split, feature_store
    from interbert.recipes.evaluate_retrieval import evaluate_retrieval, load_scoring_model, prepare_split
    from interbert.retrieval import score_pairs

    data, model_dir = gpu_data["data"], gpu_data["pretrained"]
    kwargs = dict(zero_shot=True, split="test", max_regions=12, pair_batch_size=64, progress=False, two_stage=3)
    on_cpu = evaluate_retrieval(model_dir, data / "captions.json", data / "regions.tsv", device="cpu", **kwargs)
    on_device = evaluate_retrieval(model_dir, data / "captions.json", data / "regions.tsv", device=DEVICE, **kwargs)
    assert on_device["device"].startswith(DEVICE) and on_device["pair_forwards"] == on_cpu["pair_forwards"]

    model = load_scoring_model(model_dir, zero_shot=True)
    captions = captions_of_split(data / "captions.json", "test")
    token_ids, images, index, _ = prepare_split(captions, feature_store(data / "regions.tsv"),
                                                load_tokenizer(model_dir), 36, 12)
    cpu_scores = score_pairs(model, token_ids, images, progress=False).scores
    device_scores = score_pairs(copy.deepcopy(model).to(DEVICE), token_ids, images, progress=False).scores
    np.testing.assert_allclose(device_scores, cpu_scores, atol=1e-4, rtol=0)
    cpu_ranks, device_ranks = image_retrieval_ranks(cpu_scores, index), image_retrieval_ranks(device_scores, index)
    # a rank may differ only where the true image's score is within the tolerance of another image's
    rows = np.arange(len(index))
    true = cpu_scores[rows, index]
    near_tie = (np.abs(np.delete(cpu_scores, index, axis=1) - true[:, None]) <= 2e-4).any(axis=1) \
        if cpu_scores.shape[1] > 1 else np.zeros(len(index), bool)
    differ = np.asarray(cpu_ranks) != np.asarray(device_ranks)
    assert not (differ & ~near_tie).any(), (np.flatnonzero(differ), cpu_ranks, device_ranks)
    if not near_tie.any():  # no near-ties: every recall and rank statistic is the CPU's
        assert _without_timings(on_device) == _without_timings(on_cpu)


def _without_timings(result: dict, prefix: str = "") -> dict:
    """The result flattened, minus what legitimately differs: wall time, paths, device, per-rank split."""
    flat = {}
    for key, value in result.items():
        if key in ("seconds", "histogram", "pair_forwards_per_rank", "device"):
            continue
        flat.update(_without_timings(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return flat


# ---------------------------------------------------------------------------------------------------
# 4. the evaluation under torchrun on CUDA (NCCL when it joins a group) writes the one-process JSON
# ---------------------------------------------------------------------------------------------------
def _environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def _evaluate_args(gpu_data) -> list[str]:
    data = gpu_data["data"]
    return ["-m", "interbert.cli", "evaluate", "retrieval", "--model", str(gpu_data["pretrained"]), "--zero-shot",
            "--captions", str(data / "captions.json"), "--features", str(data / "regions.tsv"), "--split", "test",
            "--two-stage", "3", "--device", DEVICE, "--threads", "1", "--pair-batch-size", "16", "--max-regions", "12"]


def _torchrun_matches_one_process(gpu_data, tmp_path, processes: int) -> tuple[dict, dict]:
    args, env = _evaluate_args(gpu_data), _environment()
    alone = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.json")], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-5000:]
    shared = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                             "--standalone", *args, "--out", str(tmp_path / "ranks.json")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert shared.returncode == 0, shared.stdout[-3000:] + shared.stderr[-8000:]
    one, ranks = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "ranks.json"))
    assert ranks["device"] == one["device"] and one["device"].startswith(DEVICE)
    assert _without_timings(ranks) == pytest.approx(_without_timings(one), abs=1e-6)
    assert (tmp_path / "ranks.png").is_file()  # rank 0 wrote the histogram
    return one, ranks


def test_evaluate_retrieval_under_torchrun_on_cuda_writes_the_one_process_json(gpu_data, tmp_path):
    # one process: torchrun's environment on CUDA (WORLD_SIZE 1 joins no group; see the two-GPU test for NCCL)
    one, ranks = _torchrun_matches_one_process(gpu_data, tmp_path, processes=1)
    assert ranks["pair_forwards_per_rank"] == one["pair_forwards_per_rank"] == [one["pair_forwards"]]


@pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2, reason="NCCL across ranks needs two CUDA GPUs")
def test_evaluate_retrieval_over_two_gpus_with_nccl_writes_the_one_process_json(gpu_data, tmp_path):
    one, ranks = _torchrun_matches_one_process(gpu_data, tmp_path, processes=2)
    captions, images = one["num_captions"], one["num_images"]
    assert ranks["pair_forwards_per_rank"] == [(captions + 1) // 2 * images, captions // 2 * images]


NCCL_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from interbert.train import init_distributed

context = init_distributed(torch.device("cuda", 0))
if not dist.is_initialized():  # one process: init_distributed joins no group, so join one as it would
    torch.cuda.set_device(0)
    dist.init_process_group(backend="nccl")
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, {"rank": dist.get_rank()})
total = torch.ones(3, device="cuda")
dist.all_reduce(total)
print(dist.get_backend(), gathered, total.tolist())
dist.destroy_process_group()
"""


@pytest.mark.skipif(not ON_GPU, reason="NCCL is CUDA's backend: nothing to dry-run on a CPU")
def test_nccl_backend_works_under_torchrun(tmp_path):
    # what the evaluation's gather uses across GPUs: an object all-gather and a tensor all-reduce over NCCL
    script = tmp_path / "nccl.py"
    script.write_text(NCCL_SCRIPT)
    completed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone",
                                str(script)], env=_environment(), cwd=tmp_path, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-8000:]
    assert "nccl [{'rank': 0}] [1.0, 1.0, 1.0]" in completed.stdout


# ---------------------------------------------------------------------------------------------------
# 5. text fine-tuning on CUDA in fp16: the saved model reloads on a CPU with the GPU's logits
# ---------------------------------------------------------------------------------------------------
def test_fp16_text_finetuning_on_cuda_reloads_on_cpu_with_the_same_logits(gpu_data, tmp_path):
    from interbert.data.glue import TextClassificationDataset, collate_text, read_glue
    from interbert.data.tokenize import load_tokenizer
    from interbert.loading import load_model
    from interbert.recipes import text
    from interbert.recipes.settings import TextSettings
    from interbert.recipes.text import run_evaluate

    glue = gpu_data["data"] / "glue"
    out = tmp_path / "run"
    result = text.run(TextSettings.load(CONFIGS / "finetune_text_tiny.yaml", [
        f"data.train={glue / 'train.tsv'}", f"data.dev={glue / 'dev.tsv'}", "data.vocab_size=200", "data.max_tokens=48",
        f"train.output_dir={out}", f"train.device={DEVICE}", *FP16, "train.max_steps=8", "train.batch_size=8",
        "train.progress_bar=false", "train.save_every=4"]))
    losses = result["history"]["loss"]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses), losses
    if ON_GPU:
        assert torch.load(out / "checkpoint.pt", weights_only=True)["scaler"] is not None

    model_dir = Path(result["model_dir"])
    on_cpu = load_model(model_dir, task="sequence_classification").eval()  # a GPU run's folder, on a CPU
    assert next(on_cpu.parameters()).device.type == "cpu"
    on_device = copy.deepcopy(on_cpu).to(DEVICE)
    tokenizer = load_tokenizer(model_dir)
    _, examples = read_glue(glue / "dev.tsv")
    dataset = TextClassificationDataset(examples[:16], tokenizer, 48)
    batch = collate_text([dataset[i] for i in range(len(dataset))], pad_token_id=tokenizer.pad_token_id)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        expected = on_cpu(**inputs).logits
        got = on_device(**on(DEVICE, inputs)).logits.cpu()
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    # and the dev metrics the GPU run wrote are the ones the reloaded model gives on a CPU
    evaluated = run_evaluate(str(model_dir), str(glue / "dev.tsv"))
    assert evaluated["accuracy"] == pytest.approx(result["metrics"]["accuracy"], abs=1e-6)
