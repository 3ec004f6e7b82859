"""``interbert export onnx``: the text tower, the image tower and the ITM scorer in ONNX Runtime compute what the
PyTorch model computes (to 1e-4), at batch sizes and lengths other than the export's example, on the inputs the
processor gives; a folder that holds no scorer is one ``error:`` line."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from conftest import minilm_vocab
from interbert.cli import main

onnxruntime = pytest.importorskip("onnxruntime")  # the [export] extra (in the Makefile's EXTRAS)
pytest.importorskip("onnxscript")

FEATURE_DIM = 16
WORDS = "a red ball on the grass next to two small dogs under a tree by the river at dusk".split()
GRAPH_INPUTS = {
    "text": ("input_ids", "attention_mask", "token_type_ids"),
    "image": ("region_features", "region_boxes", "region_mask"),
    "itm": ("input_ids", "attention_mask", "token_type_ids", "region_features", "region_boxes", "region_mask"),
}


@pytest.fixture(scope="module", params=["retrieval", "pretraining"])
def exported(request, tmp_path_factory):
    """A tiny scorer folder with its processor, and the command's export of it: ``(model, processor, out, stdout)``."""
    from interbert.config import InterBertConfig
    from interbert.data.tokenize import load_tokenizer
    from interbert.loading import load_model
    from interbert.processing import InterBertProcessor, save_processor
    from interbert.serve.synthetic_gallery import save_tiny_model

    root = tmp_path_factory.mktemp(request.param)
    folder = save_tiny_model(root / "model", minilm_vocab(), FEATURE_DIM, architecture=request.param, embedding_size=8)
    save_processor(folder, load_tokenizer(minilm_vocab()), InterBertConfig.from_pretrained(folder))
    out = root / "onnx"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["export", "onnx", "--model", str(folder), "--out", str(out)]) == 0
    return load_model(folder, task="scoring").eval(), InterBertProcessor.from_pretrained(folder), out, stdout.getvalue()


def processor_inputs(processor, batch: int, words: int, regions: int, seed: int) -> dict[str, np.ndarray]:
    """What the processor gives for ``batch`` captions of ``words`` words and images of ``regions`` detections
    (the last image has half as many: padding), as the int64 / float32 arrays ONNX Runtime takes."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=words)) for _ in range(batch)]
    images = []
    for i in range(batch):
        n = regions if i < batch - 1 else max(1, regions // 2)
        corners = rng.random((n, 2), dtype=np.float32) * 60
        boxes = np.concatenate([corners, corners + 1 + rng.random((n, 2), dtype=np.float32) * 60], axis=1)
        images.append((rng.random((n, FEATURE_DIM), dtype=np.float32), boxes, (128, 128)))
    return {name: tensor.numpy() for name, tensor in processor(text=texts, regions=images).items()}


# two batch sizes x two lengths (tokens, regions), none of them the export's example (2 rows, 16 tokens, 10 regions)
SIZES = [(1, 3, 4), (1, 30, 35), (6, 3, 4), (6, 30, 35)]


@pytest.mark.parametrize("graph", ["text", "image", "itm"])
def test_onnx_runtime_computes_what_pytorch_computes(exported, graph):
    model, processor, out, _ = exported
    session = onnxruntime.InferenceSession(str(out / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(GRAPH_INPUTS[graph])
    pytorch = {"text": model.get_text_features, "image": model.get_image_features, "itm": model.score_pairs}[graph]
    lengths = set()
    for seed, (batch, words, regions) in enumerate(SIZES):
        inputs = processor_inputs(processor, batch, words, regions, seed)
        feeds = {name: inputs[name] for name in GRAPH_INPUTS[graph]}
        (got,) = session.run(None, feeds)
        with torch.no_grad():
            expected = pytorch(*(torch.from_numpy(feeds[name]) for name in GRAPH_INPUTS[graph])).numpy()
        assert got.shape == expected.shape and got.shape[0] == batch
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        lengths.add((inputs["input_ids"].shape[1], inputs["region_features"].shape[1]))
    assert len({t for t, _ in lengths}) >= 2 and len({r for _, r in lengths}) >= 2  # short and long really ran


def test_the_command_reports_its_own_check(exported):
    model, _, out, stdout = exported
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["architecture"] == type(model).__name__
    lines = stdout.strip().splitlines()
    for graph, line in zip(("text", "image", "itm"), lines):
        assert line.startswith(f"wrote {out}/{graph}.onnx") and "max |ONNX Runtime - PyTorch| = " in line
        diff = manifest["graphs"][graph]["max_abs_diff"]
        assert 0 <= diff <= 1e-4 and float(line.rsplit("= ", 1)[1]) == pytest.approx(diff, rel=0.05)
    assert "checked at batch sizes 1, 5" in lines[-1]


def test_exporting_leaves_the_callers_logging_as_it_was(exported):
    """The exporter's registration logger is quieted during the export only (it was left at ERROR for good)."""
    import logging

    from interbert.export_onnx import ONNX_REGISTRATION_LOGGER

    assert logging.getLogger(ONNX_REGISTRATION_LOGGER).level == logging.NOTSET


@pytest.mark.parametrize("what", ["missing", "not a model", "encoder only"])
def test_a_wrong_model_folder_is_one_error_line(what, tmp_path, capsys):
    from interbert.modeling import InterBertModel
    from interbert.serve.synthetic_gallery import save_tiny_model

    folder = tmp_path / "model"
    if what == "not a model":
        folder.mkdir()
        (folder / "notes.txt").write_text("not weights")
    elif what == "encoder only":  # no pair scorer to export: what `interbert serve` refuses too
        encoder = save_tiny_model(tmp_path / "scorer", minilm_vocab(), FEATURE_DIM)
        InterBertModel.from_pretrained(encoder).save_pretrained(folder)
    capsys.readouterr()
    assert main(["export", "onnx", "--model", str(folder), "--out", str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(folder) in err[0]
    assert not (tmp_path / "onnx").exists()
