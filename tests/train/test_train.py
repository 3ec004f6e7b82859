"""The training loop's pieces: schedule, parameter groups, EMA, gradient accumulation, saving."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from interbert.train import (
    CHECKPOINT_NAME,
    FINAL_WEIGHTS_NAME,
    HISTORY_NAME,
    ExponentialMovingAverage,
    Trainer,
    TrainConfig,
    build_param_groups,
    epoch_batches,
    lr_multiplier_from_patterns,
    train,
    warmup_linear_decay,
)
from test_train_toy import ToyDataset, ToyModel


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quiet_config(tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(**{"output_dir": str(tmp_path), "progress_bar": False, "tensorboard": False, **overrides})


@dataclass
class LinearOutput:
    loss: torch.Tensor


class LinearRegression(nn.Module):
    def __init__(self, in_features: int = 8):
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, features, targets, example_index=None) -> LinearOutput:
        return LinearOutput(nn.functional.mse_loss(self.linear(features).squeeze(-1), targets))


def test_warmup_then_linear_decay_values():
    factors = [warmup_linear_decay(step, warmup_steps=4, total_steps=10) for step in range(10)]
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert factors == pytest.approx(expected)
    assert [warmup_linear_decay(step, 0, 4) for step in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_trainer_applies_the_schedule_to_every_update(tmp_path):
    config = quiet_config(tmp_path, batch_size=8, max_steps=10, warmup_steps=4, learning_rate=0.1)
    result = train(LinearRegression(), ToyDataset(64, noise=0.0), config)
    expected = [0.1 * warmup_linear_decay(step, 4, 10) for step in range(10)]
    assert result.history["lr"] == pytest.approx(expected)
    assert len(result.loss_history) == 10


def test_warmup_ratio_sets_the_warmup_length(tmp_path):
    trainer = Trainer(LinearRegression(), ToyDataset(64), quiet_config(tmp_path, max_steps=20, warmup_ratio=0.25))
    assert trainer.warmup_steps == 5
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 1 / 5)


def test_no_weight_decay_on_biases_and_layer_norms_and_lower_lr_by_pattern():
    model = ToyModel()
    groups = build_param_groups(model, weight_decay=0.01, lr_multiplier_for=lr_multiplier_from_patterns({"encoder.*": 0.1}))
    by_name = {name: group for group in groups for name in group["param_names"]}
    assert by_name["encoder.0.weight"]["weight_decay"] == 0.01
    assert by_name["encoder.0.bias"]["weight_decay"] == 0.0
    assert by_name["encoder.1.weight"]["weight_decay"] == 0.0  # LayerNorm gain
    assert by_name["encoder.0.weight"]["lr_multiplier"] == 0.1
    assert by_name["head.weight"]["lr_multiplier"] == 1.0
    assert sorted(by_name) == sorted(name for name, _ in model.named_parameters())


def test_trainer_learning_rates_follow_the_multipliers(tmp_path):
    bert_names = {"encoder.0.weight", "encoder.0.bias"}
    trainer = Trainer(
        ToyModel(),
        ToyDataset(64),
        quiet_config(tmp_path, learning_rate=1e-3, max_steps=3),
        lr_multiplier_for=lambda name: 0.1 if name in bert_names else 1.0,
    )
    for group in trainer.optimizer.param_groups:
        slow = set(group["param_names"]) <= bert_names
        assert group["lr"] == pytest.approx(1e-4 if slow else 1e-3)
    with pytest.raises(ValueError, match="not both"):
        Trainer(ToyModel(), ToyDataset(64), quiet_config(tmp_path, lr_multipliers={"x": 0.1}), lr_multiplier_for=len)


class RegressionWithAnIdleHead(LinearRegression):
    """A model with a parameter its loss never reaches, and that says so (as the InterBERT heads do)."""

    def __init__(self):
        super().__init__()
        self.idle = nn.Linear(8, 2)

    def unused_parameter_names(self) -> list[str]:
        return ["idle.weight", "idle.bias"]


def test_parameters_the_model_names_unused_are_frozen_and_left_alone(tmp_path):
    model = RegressionWithAnIdleHead()
    idle_before = model.idle.weight.detach().clone()
    config = quiet_config(tmp_path, batch_size=8, max_steps=2, learning_rate=0.1, save_rank_weights=True)
    trainer = Trainer(model, ToyDataset(64), config)
    optimized = {name for group in trainer.optimizer.param_groups for name in group["param_names"]}
    assert optimized == {"linear.weight", "linear.bias"}
    assert not model.idle.weight.requires_grad and model.linear.weight.requires_grad
    trainer.fit()
    assert torch.equal(model.idle.weight, idle_before)
    # save_rank_weights: this rank's weights at the start and at the end of fit
    from safetensors.torch import load_file

    start, end = (load_file(tmp_path / "rank_weights" / f"rank0_step{step}.safetensors") for step in (0, 2))
    assert torch.equal(end["linear.weight"], model.linear.weight.detach())
    assert not torch.equal(start["linear.weight"], end["linear.weight"])


def test_ema_math_with_and_without_warmup():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ExponentialMovingAverage(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(0.9 * 1.1 + 0.1 * 2.0)

    warm = ExponentialMovingAverage(model, decay=0.9999, warmup=True)  # starts at 2.0
    assert [warm.current_decay()] == pytest.approx([1 / 10])
    with torch.no_grad():
        model.weight.fill_(0.0)
    warm.update(model)
    assert warm.shadow["weight"].item() == pytest.approx(0.1 * 2.0)
    assert warm.current_decay() == pytest.approx(2 / 11)
    warm.num_updates = 10**6
    assert warm.current_decay() == 0.9999


def test_ema_weights_are_evaluated_and_saved_but_training_weights_continue(tmp_path):
    config = quiet_config(
        tmp_path, batch_size=8, max_steps=6, ema_decay=0.5, ema_warmup=False, learning_rate=1e-2, eval_every=3
    )
    seen_by_eval = []
    trainer = Trainer(
        LinearRegression(),
        ToyDataset(64),
        config,
        eval_fn=lambda model: seen_by_eval.append(model.linear.weight.detach().clone()) or {"metric": 1.0},
    )
    result = trainer.fit()
    assert len(seen_by_eval) == 2 and [e["step"] for e in result.eval_history] == [3, 6]
    training_weight = trainer.model.linear.weight.detach()
    ema_weight = trainer.ema.shadow["linear.weight"]
    assert not torch.equal(training_weight, ema_weight)
    assert torch.equal(seen_by_eval[-1], ema_weight)
    saved = torch.load(tmp_path / FINAL_WEIGHTS_NAME, weights_only=True)
    assert torch.equal(saved["linear.weight"], ema_weight)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    def final_weights(batch_size: int, accumulation: int):
        torch.manual_seed(3)
        model = LinearRegression()
        config = quiet_config(
            tmp_path / f"b{batch_size}", batch_size=batch_size, grad_accum_steps=accumulation, max_steps=5,
            learning_rate=0.05, weight_decay=0.0, max_grad_norm=None,
        )
        train(model, ToyDataset(64, noise=0.0), config)
        return model.linear.weight.detach(), model.linear.bias.detach()

    big = final_weights(8, 1)
    accumulated = final_weights(4, 2)
    assert torch.allclose(big[0], accumulated[0], atol=1e-6)
    assert torch.allclose(big[1], accumulated[1], atol=1e-6)
    torch.manual_seed(3)
    assert not torch.allclose(big[0], LinearRegression().linear.weight)  # it did train


def test_data_order_is_a_seeded_permutation_per_epoch():
    dataset = ToyDataset(20)
    epoch0 = epoch_batches(dataset, 4, epoch=0, seed=1, rank=0, world_size=1, drop_last=True)
    assert epoch0 == epoch_batches(dataset, 4, epoch=0, seed=1, rank=0, world_size=1, drop_last=True)
    assert sorted(i for batch in epoch0 for i in batch) == list(range(20))
    assert epoch0 != epoch_batches(dataset, 4, epoch=1, seed=1, rank=0, world_size=1, drop_last=True)
    assert epoch0 != epoch_batches(dataset, 4, epoch=0, seed=2, rank=0, world_size=1, drop_last=True)
    ranks = [epoch_batches(dataset, 4, 0, 1, rank, 2, True) for rank in (0, 1)]
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}
    assert [len(b) for b in epoch_batches(ToyDataset(10), 4, 0, 1, 0, 1, drop_last=True)] == [4, 4]
    assert [len(b) for b in epoch_batches(ToyDataset(10), 4, 0, 1, 0, 1, drop_last=False)] == [4, 4, 2]


def test_checkpoint_history_and_final_weights_are_written(tmp_path):
    config = quiet_config(tmp_path, batch_size=8, max_steps=4, save_every=2, tensorboard=True, log_every=2)
    result = train(ToyModel(), ToyDataset(64), config)
    checkpoint = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert checkpoint["step"] == 4 and checkpoint["train_config"]["max_steps"] == 4
    assert set(checkpoint) >= {"model", "optimizer", "scheduler", "ema", "epoch", "batch_in_epoch", "rng_states"}
    history = json.loads((tmp_path / HISTORY_NAME).read_text())
    assert history["loss"] == result.loss_history
    assert set(history) == {"loss", "regression_loss", "penalty_loss", "lr", "eval"}
    assert (tmp_path / FINAL_WEIGHTS_NAME).is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/regression_loss", "train/penalty_loss", "train/lr", "train/examples_per_second"} <= set(
        events.Tags()["scalars"]
    )
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_resume_refuses_a_different_data_order(tmp_path):
    train(ToyModel(), ToyDataset(64), quiet_config(tmp_path, batch_size=8, max_steps=2))
    with pytest.raises(ValueError, match="batch_size: checkpoint 8 vs now 4"):
        train(ToyModel(), ToyDataset(64), quiet_config(tmp_path, batch_size=4, max_steps=4), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(ToyModel(), ToyDataset(64), quiet_config(tmp_path / "empty", max_steps=2), resume=True)


def test_a_model_without_loss_is_a_clear_error(tmp_path):
    class NoLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 1)

        def forward(self, features, targets, example_index=None):
            return LinearOutput(loss=None)

    with pytest.raises(ValueError, match="returned no loss"):
        train(NoLoss(), ToyDataset(64), quiet_config(tmp_path, batch_size=8, max_steps=1))


def test_random_masking_in_data_loading_is_the_same_with_worker_processes(tmp_path):
    from test_train_toy import noisy_collate

    def losses(num_workers: int) -> list[float]:
        torch.manual_seed(0)
        config = quiet_config(tmp_path / str(num_workers), batch_size=8, max_steps=10, num_workers=num_workers)
        return train(ToyModel(), ToyDataset(64), config, collate_fn=noisy_collate).loss_history

    assert losses(0) == losses(2)


class SyntheticPretrainingItems(torch.utils.data.Dataset):
    """Items with the keys of docs/interfaces.md, one masked token and one masked region each."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        tokens, regions = 8, 5
        input_ids = torch.randint(5, 100, (tokens,), generator=generator)
        msm_labels = torch.full((tokens,), -100)
        msm_labels[2], input_ids[2] = input_ids[2], 3
        mrm_mask = torch.zeros(regions, dtype=torch.bool)
        mrm_mask[1 + index % 4] = True
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones(tokens, dtype=torch.long),
            "region_features": torch.randn(regions, 32, generator=generator),
            "region_boxes": torch.rand(regions, 5, generator=generator),
            "region_mask": torch.ones(regions, dtype=torch.long),
            "msm_labels": msm_labels,
            "mrm_mask": mrm_mask,
            "mrm_class_targets": torch.softmax(torch.randn(regions, 11, generator=generator), -1),
            "itm_labels": torch.tensor(index % 2),
        }


def test_trains_the_interbert_pretraining_model_and_saves_loadable_weights(tmp_path):
    from interbert.config import preset
    from interbert.modeling import InterBertForPreTraining

    config = preset(
        "tiny", vocab_size=100, hidden_size=32, intermediate_size=64, image_intermediate_size=64,
        pooled_size=32, region_feature_size=32, num_region_classes=11,
    )
    model = InterBertForPreTraining(config)
    train_config = quiet_config(tmp_path, batch_size=4, max_steps=3, ema_decay=0.99)
    result = train(model, SyntheticPretrainingItems(), train_config)
    assert {"msm_loss", "mrm_loss", "itm_loss"} <= set(result.history)
    assert all(loss is not None for loss in result.history["mrm_loss"])
    fresh = InterBertForPreTraining(config)
    fresh.load_state_dict(torch.load(tmp_path / FINAL_WEIGHTS_NAME, weights_only=True))  # tied weights included
