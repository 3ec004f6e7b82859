"""The pieces of the training package against what they replaced (issue 25): the EMA on torch's
``AveragedModel`` gives the hand-written EMA's weights, the ``LambdaLR`` schedule the same learning rate at
every update, and the names that ``interbert.train`` exported as one module are still there."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import interbert.train as train_package
from interbert.train import ExponentialMovingAverage, build_param_groups, warmup_linear_decay
from interbert.train.schedule import warmup_linear_schedule


class ReferenceEma:
    """The EMA of main at 3fcbcab (train.py), kept verbatim as the numbers to match."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow = {name: value.detach().clone() for name, value in model.state_dict().items()
                       if value.dtype.is_floating_point}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.detach().to(self.shadow[name].dtype), 1.0 - decay)
        self.num_updates += 1


class TiedWithBuffers(nn.Module):
    """What the EMA must handle in InterBERT: tied weights, an integer buffer (position ids), a LayerNorm,
    and a float buffer (which the old EMA averaged too)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.decoder = nn.Linear(6, 11)
        self.decoder.weight = self.embed.weight
        self.register_buffer("position_ids", torch.arange(700).unsqueeze(0))
        self.register_buffer("running", torch.zeros(6))


@pytest.mark.parametrize("decay,warmup", [(0.9999, True), (0.9, True), (0.95, False)])
def test_ema_on_averaged_model_gives_the_hand_written_weights(decay, warmup):
    torch.manual_seed(0)
    model = TiedWithBuffers()
    ema, reference = ExponentialMovingAverage(model, decay, warmup), ReferenceEma(model, decay, warmup)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(60):
        loss = model.decoder(model.norm(model.embed(torch.randint(0, 11, (4,))))).logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            model.running.add_(torch.randn(6))
        ema.update(model)
        reference.update(model)
        assert ema.current_decay() == reference.current_decay()
    assert ema.num_updates == reference.num_updates == 60
    assert set(ema.shadow) == set(reference.shadow)
    for name, value in reference.shadow.items():
        torch.testing.assert_close(ema.shadow[name], value, rtol=0, atol=1e-7, msg=name)
    assert not torch.equal(ema.shadow["norm.weight"], model.norm.weight)  # it did average
    # the integer buffer follows the model untouched (averaging it in float would truncate ids)
    copy = TiedWithBuffers()
    ema.copy_to(copy)
    assert torch.equal(copy.position_ids, model.position_ids)
    torch.testing.assert_close(copy.norm.weight, reference.shadow["norm.weight"], rtol=0, atol=1e-7)


def test_ema_state_keeps_the_checkpoint_layout_and_loads_the_old_one():
    torch.manual_seed(1)
    model = TiedWithBuffers()
    reference = ReferenceEma(model, 0.99)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    reference.update(model)
    old_state = {"decay": reference.decay, "warmup": reference.warmup, "num_updates": reference.num_updates,
                 "shadow": reference.shadow}
    ema = ExponentialMovingAverage(TiedWithBuffers(), 0.5, warmup=False)
    ema.load_state_dict(old_state)
    assert (ema.decay, ema.warmup, ema.num_updates) == (0.99, True, 1)
    saved = ema.state_dict()
    assert set(saved) == set(old_state) and set(saved["shadow"]) == set(reference.shadow)
    for name, value in reference.shadow.items():
        assert torch.equal(saved["shadow"][name], value), name
    # and it goes on from there as the old one would
    ema.update(model)
    reference.update(model)
    for name, value in reference.shadow.items():
        torch.testing.assert_close(ema.shadow[name], value, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("warmup,total", [(0, 7), (3, 10), (4, 4), (1, 1)])
def test_the_lambda_lr_schedule_sets_the_formula_rate_at_every_update(warmup, total):
    model = nn.Linear(3, 2)
    groups = build_param_groups(model, 0.01, lambda name: 0.5 if name == "bias" else 1.0)
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    for group in optimizer.param_groups:
        group["lr"] = 0.1 * group["lr_multiplier"]
    scheduler = warmup_linear_schedule(optimizer, warmup, total)
    for step in range(total):
        expected = 0.1 * warmup_linear_decay(step, warmup, total)
        rates = [g["lr"] for g in optimizer.param_groups]
        assert rates == pytest.approx([expected * g["lr_multiplier"] for g in optimizer.param_groups], rel=1e-12)
        optimizer.step()
        scheduler.step()
    # what checkpoints have always held: LambdaLR's own keys, and no state for the factor function
    state = scheduler.state_dict()
    assert state["lr_lambdas"] == [None, None] and state["last_epoch"] == total


def test_every_name_of_the_old_module_is_still_exported():
    old_public = {
        "BEST_MODEL_DIR", "CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "FINAL_WEIGHTS_NAME", "HISTORY_NAME",
        "NUMBERED_CHECKPOINT", "DistributedContext", "ExponentialMovingAverage", "TrainConfig", "TrainResult",
        "Trainer", "atomic_torch_save", "atomic_write_json", "batch_seed", "build_param_groups", "checked_device",
        "enable_gradient_checkpointing", "epoch_batches", "freeze_unused_parameters", "init_distributed",
        "loss_components", "lr_multiplier_from_patterns", "main_process_first", "resolve_device", "rng_state",
        "save_weights_folder", "scaled_optimizer_step", "seed_everything", "seeded_rng", "set_rng_state", "train",
        "warmup_linear_decay",
    }
    assert old_public <= set(train_package.__all__)
    assert all(callable(getattr(train_package, name)) or name.isupper() for name in old_public)
    assert hasattr(train_package, "_SeededBatches")  # benchmarks/profile_loop.py times its __getitem__


def test_atomic_write_json_takes_the_library_argument_order(tmp_path):
    from interbert.utils import files

    assert train_package.atomic_write_json is files.atomic_write_json
    train_package.atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text().replace(" ", "").replace("\n", "") == '{"x":1}'


def test_the_search_service_picks_its_device_without_importing_the_training_loop():
    code = ("import sys; import interbert.serve.cli as cli; from interbert.utils.device import checked_device; "
            "checked_device('cpu'); print('interbert.train' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
