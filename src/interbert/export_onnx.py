"""ONNX graphs of a model folder, for serving without PyTorch: the text tower, the image tower, the ITM scorer.

    text.onnx   input_ids, attention_mask, token_type_ids (batch x tokens)          -> text_embeds  (batch x E)
    image.onnx  region_features, region_boxes, region_mask (batch x regions [x D|5]) -> image_embeds (batch x E)
    itm.onnx    the six of both (row i of the text with row i of the regions)       -> scores       (batch,)

Each graph is what the PyTorch model computes for the search service: ``get_text_features`` and
``get_image_features`` (the embeddings an index is built and searched with) and ``score_pairs`` (the pair score
the service re-ranks with: a retrieval model's logit, a pretraining model's ITM margin). The inputs are those
:class:`~interbert.processing.InterBertProcessor` gives, as int64 / float32 arrays, and batch, token and region
counts are dynamic. Each graph is exported by torch's exporter (``torch.export`` underneath, where the model
runs its static-shape stacks: :func:`interbert.modeling.capturing_graph`) and then checked in ONNX Runtime
against the PyTorch model, as it runs in eager mode, over batch sizes and lengths other than the example it was
exported with (:func:`check_graphs`). ``export.json`` beside the graphs records their inputs and that check.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from interbert.errors import InterBertError
from interbert.loading import load_model
from interbert.modeling import InterBertPreTrainedModel
from interbert.utils.files import atomic_path, atomic_write_json
from interbert.utils.logs import quieted

TOLERANCE = 1e-4  # max |ONNX Runtime - PyTorch| accepted, on L2-normalised embeddings and on scores
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_INPUTS = ("region_features", "region_boxes", "region_mask")
# What the check runs besides the export's own example: two batch sizes x two lengths (tokens, regions).
CHECK_BATCH_SIZES = (1, 5)
CHECK_LENGTHS = ((3, 2), (40, 37))
ONNX_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"  # quieted while exporting


class ExportCheckError(InterBertError):
    """An exported graph whose ONNX Runtime outputs differ from the PyTorch model's by more than the tolerance."""


class _Tower(nn.Module):
    """One method of the model as a module's ``forward``: what the exporter captures."""

    def __init__(self, model: InterBertPreTrainedModel, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(*inputs)


@dataclass(frozen=True)
class Graph:
    """One exported graph: its file, the model method it computes, its named inputs and output."""

    name: str
    method: str
    inputs: tuple[str, ...]
    output: str

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


GRAPHS = (
    Graph("text", "get_text_features", TEXT_INPUTS, "text_embeds"),
    Graph("image", "get_image_features", IMAGE_INPUTS, "image_embeds"),
    Graph("itm", "score_pairs", TEXT_INPUTS + IMAGE_INPUTS, "scores"),
)


def example_inputs(config, batch: int, tokens: int, regions: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs shaped and typed as the processor's, with padding in the last text row and the first image
    (position 0, [CLS] and the global region, always kept) so that a graph is checked on padded batches too."""
    g = torch.Generator().manual_seed(seed)
    tokens = min(tokens, config.max_position_embeddings)
    attention_mask = torch.ones(batch, tokens, dtype=torch.long)
    attention_mask[-1, max(1, tokens // 2):] = 0
    region_mask = torch.ones(batch, regions, dtype=torch.long)
    region_mask[0, max(1, regions // 2):] = 0
    return {
        "input_ids": torch.randint(0, config.vocab_size, (batch, tokens), generator=g),
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros(batch, tokens, dtype=torch.long),
        "region_features": torch.rand(batch, regions, config.region_feature_size, generator=g),
        "region_boxes": torch.rand(batch, regions, 5, generator=g),
        "region_mask": region_mask,
    }


def _dynamic_shapes(graph: Graph, config) -> dict[str, tuple[dict[int, torch.export.Dim], ...]]:
    batch = torch.export.Dim("batch")  # one symbol: the text and image rows of the ITM graph are pairs
    tokens = torch.export.Dim("tokens", max=config.max_position_embeddings)  # the model refuses longer text
    regions = torch.export.Dim("regions")
    return {"inputs": tuple({0: batch, 1: tokens if name in TEXT_INPUTS else regions} for name in graph.inputs)}


def export_graphs(model: InterBertPreTrainedModel, out_dir: Path,
                  graphs: Sequence[Graph] = GRAPHS) -> None:
    """Write each graph of ``model`` (eval mode, a scorer: ``score_pairs``) as ``out_dir/<name>.onnx``."""
    example = example_inputs(model.config, batch=2, tokens=16, regions=10)
    for graph in graphs:
        # the exporter warns, for every graph, that torchvision's detection ops have no translation: none is used
        # here. Quieted for the export alone: the caller's logging is left as it was.
        with torch.no_grad(), warnings.catch_warnings(), quieted(ONNX_REGISTRATION_LOGGER):
            # inputs that share the batch (and length) symbol keep its one name: the exporter says so for each
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)  # torch's own pytree
            program = torch.onnx.export(
                _Tower(model, graph.method).eval(), tuple(example[name] for name in graph.inputs), dynamo=True,
                input_names=list(graph.inputs), output_names=[graph.output],
                dynamic_shapes=_dynamic_shapes(graph, model.config), verbose=False,
            )
        # one file, the weights inside (the paper's base model is ~0.6 GB, under protobuf's 2 GB), written whole
        with atomic_path(out_dir / graph.file) as tmp:
            program.save(str(tmp), external_data=False)


def check_graphs(model: InterBertPreTrainedModel, out_dir: Path, graphs: Sequence[Graph] = GRAPHS,
                 batch_sizes: Sequence[int] = CHECK_BATCH_SIZES,
                 lengths: Sequence[tuple[int, int]] = CHECK_LENGTHS) -> dict[str, float]:
    """``{graph name: max |ONNX Runtime - PyTorch|}`` over every batch size x (tokens, regions) length, each
    graph run from its file in ONNX Runtime's CPU provider and the model in eager mode."""
    import onnxruntime

    worst = {}
    for graph in graphs:
        session = onnxruntime.InferenceSession(str(out_dir / graph.file), providers=["CPUExecutionProvider"])
        method: Callable[..., torch.Tensor] = getattr(model, graph.method)
        worst[graph.name] = 0.0
        for i, batch in enumerate(batch_sizes):
            for j, (tokens, regions) in enumerate(lengths):
                inputs = example_inputs(model.config, batch, tokens, regions, seed=1 + i * len(lengths) + j)
                with torch.no_grad():
                    expected = method(*(inputs[name] for name in graph.inputs)).numpy()
                (got,) = session.run([graph.output], {name: inputs[name].numpy() for name in graph.inputs})
                worst[graph.name] = max(worst[graph.name], float(np.abs(got - expected).max()))
    return worst


def export_onnx(model_dir: str | Path, out_dir: str | Path, tolerance: float = TOLERANCE) -> dict[str, float]:
    """Export the three graphs of the scorer in ``model_dir`` (a retrieval or pretraining folder, as the search
    service loads it) into ``out_dir``, check them (:func:`check_graphs`) and write ``export.json``.
    Returns each graph's max difference; one over ``tolerance`` is an :class:`ExportCheckError` naming it."""
    model = load_model(model_dir, task="scoring").eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    export_graphs(model, out_dir)
    worst = check_graphs(model, out_dir)
    manifest = {
        "source": Path(model_dir).name, "architecture": type(model).__name__, "torch": torch.__version__,
        "tolerance": tolerance,
        "checked": {"batch_sizes": list(CHECK_BATCH_SIZES), "tokens_regions": [list(x) for x in CHECK_LENGTHS]},
        "graphs": {g.name: {"file": g.file, "computes": g.method, "inputs": list(g.inputs), "output": g.output,
                            "max_abs_diff": worst[g.name]} for g in GRAPHS},
    }
    atomic_write_json(out_dir / "export.json", manifest, indent=2)
    over = {name: diff for name, diff in worst.items() if not diff <= tolerance}
    if over:
        raise ExportCheckError("; ".join(f"{out_dir / (name + '.onnx')}: ONNX Runtime differs from PyTorch by {diff:.3g} "
                                         f"(tolerance {tolerance:g})" for name, diff in over.items()))
    return worst


__all__ = ["GRAPHS", "TOLERANCE", "ExportCheckError", "Graph", "check_graphs", "example_inputs", "export_graphs",
           "export_onnx"]
