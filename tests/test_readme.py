"""The README's Python section runs as written: every ```python block of it, in order, in one namespace,
in a folder laid out as `make demo` leaves `runs/demo` (the built-in benchmark, tiny, and tiny models)."""

from __future__ import annotations

import re

import pytest

from conftest import REPO, minilm_vocab

FEATURE_DIM = 16


def python_section_blocks() -> list[tuple[int, str]]:
    """``(line, code)`` of each ```python block between "## Python" and the next level-2 heading."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Python\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else len(text)]
    first_line = text[:start].count("\n") + 1
    return [(first_line + section[:m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)]


@pytest.fixture
def demo_folder(tmp_path, monkeypatch):
    """``runs/demo`` as the demo writes it: ``data/`` (the built-in benchmark, store format), ``pretrain/model``
    and ``finetune_pretrained/model`` (weights and the processor a recipe saves)."""
    from interbert.config import InterBertConfig
    from interbert.data.tokenize import load_tokenizer
    from interbert.processing import save_processor
    from interbert.serve.synthetic_gallery import save_tiny_model
    from interbert.synthetic import generate

    runs = tmp_path / "runs" / "demo"
    generate(runs / "data", images=12, val_images=2, test_images=4, feature_dim=FEATURE_DIM, num_classes=8, fmt="store",
             render_images=False, workers=1)
    recipe = {"config": {"data": {"max_regions": 24}}}  # the demo's
    for architecture, name in (("pretraining", "pretrain"), ("retrieval", "finetune_pretrained")):
        folder = save_tiny_model(runs / name / "model", minilm_vocab(), FEATURE_DIM, architecture=architecture,
                                 embedding_size=8)
        save_processor(folder, load_tokenizer(minilm_vocab()), InterBertConfig.from_pretrained(folder), recipe)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_python_section_has_its_blocks():
    blocks = python_section_blocks()
    assert len(blocks) >= 4
    assert "AutoProcessor.from_pretrained(M)" in blocks[0][1] and "get_image_features" in blocks[0][1]


def test_every_python_block_of_the_readme_runs(demo_folder, capsys):
    namespace: dict = {"__name__": "readme"}
    for line, code in python_section_blocks():
        exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 -- the README's own code
    test = namespace["test"]
    assert namespace["similarity"].shape == (min(5, len(test)), len({c.image_id for c in test}))
    assert len(namespace["ranking"]) == len({c.image_id for c in test})
    assert namespace["out"].itm_logits.shape == (2, 2)
    assert (demo_folder / "ckpt" / "model.safetensors").exists() and (demo_folder / "ckpt" / "processor_config.json").exists()
    assert "->" in capsys.readouterr().out
    assert_onnx_block_served_what_pytorch_computes(namespace, demo_folder)


def assert_onnx_block_served_what_pytorch_computes(namespace: dict, folder) -> None:
    """The section "Serving embeddings from ONNX Runtime": its gallery is the encoder's image embeddings and its
    re-rank scores the scorer's, to 1e-4."""
    import numpy as np
    import torch

    from interbert import InterBertForImageTextRetrieval

    model = InterBertForImageTextRetrieval.from_pretrained(folder / namespace["M"]).eval()
    proc, store, image_ids = namespace["proc"], namespace["store"], namespace["image_ids"]
    with torch.no_grad():
        gallery = model.get_image_features(**proc(regions=[store[i] for i in image_ids]))
        scores = model.score_pairs(**proc(text=namespace["test"][0].text,
                                          regions=[store[i] for i in namespace["candidates"]]))
    np.testing.assert_allclose(namespace["gallery"], gallery.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(namespace["scores"], scores.numpy(), atol=1e-4, rtol=0)
