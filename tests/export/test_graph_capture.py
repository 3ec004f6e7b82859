"""The towers captured as graphs (``torch.jit.trace``, ``torch.export`` with dynamic shapes) compute what the eager
model computes, on batch sizes, lengths and padding other than the example they were captured with.

The eager model packs the real positions of a padded batch (a shape and a branch that depend on the mask); a
captured graph must not fix them to the example's padding, so capturing runs the static-shape stacks
(``modeling.capturing_graph``). Before that, ``torch.export`` failed on the batch-size check (a set of symbolic
sizes) and a trace replayed the example's number of real positions on every input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from interbert.config import preset
from interbert.modeling import InterBertForImageTextRetrieval, InterBertForPreTraining

TEXT = ("input_ids", "attention_mask", "token_type_ids")
IMAGE = ("region_features", "region_boxes", "region_mask")
# (method, inputs): the text tower, the image tower, the pair scorer the search service re-ranks with
TOWERS = [("get_text_features", TEXT), ("get_image_features", IMAGE), ("score_pairs", TEXT + IMAGE)]


class Method(nn.Module):
    def __init__(self, model, method):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *inputs):
        return getattr(self.model, self.method)(*inputs)


def tiny(cls):
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=60, region_feature_size=12, num_region_classes=8, embedding_size=8,
                    num_single_stream_layers=1, num_text_stream_layers=1, num_image_stream_layers=1)
    return cls(config).eval()


def inputs(b: int, t: int, r: int, seed: int) -> dict[str, torch.Tensor]:
    """Padding in the last caption and the first image (position 0 kept), as a processor's batch has it."""
    g = torch.Generator().manual_seed(seed)
    attention_mask, region_mask = torch.ones(b, t, dtype=torch.long), torch.ones(b, r, dtype=torch.long)
    attention_mask[-1, max(1, t // 2):] = 0
    region_mask[0, max(1, r // 2):] = 0
    return dict(input_ids=torch.randint(0, 60, (b, t), generator=g), attention_mask=attention_mask,
                token_type_ids=torch.zeros(b, t, dtype=torch.long), region_features=torch.rand(b, r, 12, generator=g),
                region_boxes=torch.rand(b, r, 5, generator=g), region_mask=region_mask)


EXAMPLE, OTHERS = inputs(2, 9, 6, seed=0), [inputs(1, 4, 3, seed=1), inputs(5, 13, 11, seed=2)]


def args(batch, names):
    return tuple(batch[name] for name in names)


@pytest.mark.parametrize("cls", [InterBertForImageTextRetrieval, InterBertForPreTraining])
@pytest.mark.parametrize(("method", "names"), TOWERS)
def test_a_traced_tower_computes_the_eager_outputs_on_other_shapes(cls, method, names):
    module = Method(tiny(cls), method).eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, args(EXAMPLE, names), check_trace=False)
        for other in OTHERS:
            torch.testing.assert_close(traced(*args(other, names)), module(*args(other, names)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("method", "names"), TOWERS)
def test_an_exported_tower_with_dynamic_batch_and_lengths_computes_the_eager_outputs(method, names):
    module = Method(tiny(InterBertForImageTextRetrieval), method).eval()
    batch, tokens, regions = torch.export.Dim("batch"), torch.export.Dim("tokens", max=128), torch.export.Dim("regions")
    shapes = {"inputs": tuple({0: batch, 1: tokens if name in TEXT else regions} for name in names)}
    with torch.no_grad():
        exported = torch.export.export(module, args(EXAMPLE, names), dynamic_shapes=shapes).module()
        for other in OTHERS:
            torch.testing.assert_close(exported(*args(other, names)), module(*args(other, names)), atol=1e-5, rtol=0)


def test_the_eager_model_keeps_its_packed_path(monkeypatch):
    """Capturing switches to the static-shape stacks only while a graph is captured, not for eager calls."""
    from interbert import modeling

    assert not modeling.capturing_graph()
    packed = []
    from_keep = modeling.Padding.from_keep
    monkeypatch.setattr(modeling.Padding, "from_keep", lambda keep: packed.append(keep) or from_keep(keep))
    with torch.no_grad():
        tiny(InterBertForImageTextRetrieval).get_text_features(*args(EXAMPLE, TEXT))
    assert packed  # the default path, which packs the real positions, ran
