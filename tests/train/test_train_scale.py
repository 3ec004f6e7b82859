"""Paper-scale training switches: gradient checkpointing (same loss and gradients, less memory) and fp16
with a loss scaler (its refusals, and the scaled update on CPU: unscale before clipping, skip on overflow).

Not tested here, for want of a GPU: float16 autocast itself (CUDA only) and the scaler on CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_modeling import _pretraining_labels, batch, small_config
from torch import nn

from interbert.modeling import InterBertForPreTraining, TransformerLayer
from interbert.train import TrainConfig, Trainer, enable_gradient_checkpointing, scaled_optimizer_step


def _padded_pretraining_batch():
    inputs = {**batch(b=3, t=7, r=5, seed=1), **_pretraining_labels(3, 7, 5)}
    inputs["attention_mask"][0, 5:] = 0  # padding: the packed (Padding) path
    inputs["region_mask"][1, 4:] = 0
    return inputs


def _loss_and_grads(model: nn.Module, inputs: dict, seed: int = 0):
    torch.manual_seed(seed)  # the same dropout masks for both runs
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(dropout):
    # dropout 0.1: checkpointing restores the RNG state, so the recomputed layers draw the same masks
    config = small_config(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                          image_hidden_dropout_prob=dropout, image_attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    plain = InterBertForPreTraining(config).train()
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed)
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    legacy = copy.deepcopy(plain)
    with pytest.warns(FutureWarning):  # transformers' older name works too (deprecated in transformers 5)
        legacy.gradient_checkpointing_enable()
    assert legacy.is_activation_checkpointing
    inputs = _padded_pretraining_batch()

    loss, grads = _loss_and_grads(plain, inputs)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, inputs)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-5)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 20
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_gradient_checkpointing_recomputes_the_layers_in_the_backward_pass(monkeypatch):
    # the proof it is on: every transformer layer runs twice per training step (forward, recompute)
    calls = []
    forward = TransformerLayer.forward
    monkeypatch.setattr(TransformerLayer, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    model = InterBertForPreTraining(small_config()).train()
    layers = sum(len(getattr(model.interbert, s)) for s in ("single_stream", "text_stream", "image_stream"))
    model(**_padded_pretraining_batch()).loss.backward()
    assert len(calls) == layers
    enable_gradient_checkpointing(model)
    calls.clear()
    model(**_padded_pretraining_batch()).loss.backward()
    assert len(calls) == 2 * layers
    calls.clear()
    with torch.no_grad():  # evaluation: nothing to recompute
        model.eval()(**_padded_pretraining_batch())
    assert len(calls) == layers


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x, y):
        return {"loss": ((self.linear(x).squeeze(-1) - y) ** 2).mean()}


def _toy_data():
    return [{"x": torch.randn(4), "y": torch.randn(())} for _ in range(8)]


def test_trainer_turns_gradient_checkpointing_on_and_refuses_models_without_it(tmp_path):
    model = InterBertForPreTraining(small_config())
    config = TrainConfig(output_dir=str(tmp_path), gradient_checkpointing=True, device="cpu", batch_size=2,
                         progress_bar=False, tensorboard=False)
    Trainer(model, _toy_data(), config)  # (the data is only counted here)
    assert model.is_activation_checkpointing
    with pytest.raises(ValueError, match="_Toy does not support gradient checkpointing"):
        Trainer(_Toy(), _toy_data(), config)
    assert TrainConfig.from_dict({"gradient_checkpointing": True}).gradient_checkpointing


def test_fp16_is_refused_on_cpu_and_together_with_bf16(tmp_path):
    with pytest.raises(ValueError, match="fp16 and bf16 are both on"):
        TrainConfig(fp16=True)
    config = TrainConfig(output_dir=str(tmp_path), fp16=True, bf16=False, device="cpu", batch_size=2,
                         progress_bar=False, tensorboard=False)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device, not cpu"):
        Trainer(_Toy(), _toy_data(), config)


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),  # its update shows an unscaled gradient
    "fused_adamw": lambda params: torch.optim.AdamW(params, lr=0.1, fused=True),  # the Trainer's optimizer
}


def _scaled_step(scale: float, max_grad_norm: float | None, make_inf: bool = False, optimizer: str = "sgd"):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = OPTIMIZERS[optimizer](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=scale != 1.0)
    x = torch.randn(5, 3)
    loss = (model(x) ** 2).sum() * 10
    scaler.scale(loss).backward()
    if make_inf:
        model.weight.grad[0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norm = scaled_optimizer_step(optimizer, scaler, model.parameters(), max_grad_norm)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return norm, before, after, scaler


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_scaled_update_unscales_before_clipping(optimizer):
    # a scale of 1024 must change neither the clipped norm nor the update: clipping saw true gradients
    norm_plain, _, after_plain, _ = _scaled_step(1.0, max_grad_norm=1.0, optimizer=optimizer)
    norm_scaled, _, after_scaled, scaler = _scaled_step(1024.0, max_grad_norm=1.0, optimizer=optimizer)
    assert norm_plain > 1.0  # clipping does act
    assert norm_scaled == pytest.approx(norm_plain, rel=1e-5)
    for name in after_plain:
        torch.testing.assert_close(after_scaled[name], after_plain[name])
    assert scaler.get_scale() == 1024.0  # finite gradients: the scale stays (grows after 2000 good steps)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_scaled_update_skips_a_step_whose_gradients_overflowed(optimizer):
    _, before, after, scaler = _scaled_step(1024.0, max_grad_norm=1.0, make_inf=True, optimizer=optimizer)
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed in an overflowed step"
    assert scaler.get_scale() == 512.0  # backed off
