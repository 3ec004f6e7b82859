"""The README's Python runs as written: every ```python block of README.md and of the documents it links
to (docs/*.md, results/README.md), in order, one namespace per document, in a folder laid out as `make demo`
leaves `runs/demo` (the built-in benchmark, tiny, and tiny models). And every relative link in them leads
to a file of the checkout."""

from __future__ import annotations

import re

import pytest

from conftest import REPO, minilm_vocab

FEATURE_DIM = 16


DOCUMENTS = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")), "results/README.md"]


def python_blocks(document: str) -> list[tuple[int, str]]:
    """``(line, code)`` of each ```python block of ``document`` (a path relative to the checkout)."""
    text = (REPO / document).read_text(encoding="utf-8")
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)]


def run_blocks(document: str) -> dict:
    namespace: dict = {"__name__": "readme"}
    for line, code in python_blocks(document):
        exec(compile(code, f"{document}:{line}", "exec"), namespace)  # noqa: S102 -- the document's own code
    return namespace


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


def test_the_readme_and_docs_python_has_its_blocks():
    (readme,) = python_blocks("README.md")
    assert "AutoProcessor.from_pretrained(M)" in readme[1] and "get_image_features" in readme[1]
    assert len(python_blocks("docs/python.md")) >= 4


def test_every_python_block_of_the_readme_runs(demo_folder, capsys):
    namespace = run_blocks("README.md")
    assert namespace["images"].shape == (len(namespace["gallery"]), namespace["text"].shape[1])
    assert capsys.readouterr().out.strip() in namespace["gallery"]


def test_every_python_block_of_the_docs_runs(demo_folder, capsys):
    documented = [d for d in DOCUMENTS if d != "README.md" and python_blocks(d)]
    assert "docs/python.md" in documented
    for document in documented:
        namespace = run_blocks(document)
        if document == "docs/python.md":
            test = namespace["test"]
            assert namespace["similarity"].shape == (min(5, len(test)), len({c.image_id for c in test}))
            assert len(namespace["ranking"]) == len({c.image_id for c in test})
            assert namespace["out"].itm_logits.shape == (2, 2)
            # interbert embed's block: every test caption, searched over every image of the store
            assert namespace["caption_ids"] == [c.caption_id for c in test]
            assert namespace["nearest"].shape == (len(test), 10)
            assert (demo_folder / "ckpt" / "model.safetensors").exists()
            assert (demo_folder / "ckpt" / "processor_config.json").exists()
            assert "->" in capsys.readouterr().out
            assert_onnx_block_served_what_pytorch_computes(namespace, demo_folder)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_relative_link_leads_to_a_file(document):
    text = (REPO / document).read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        path = (REPO / document).parent / target.split("#")[0]
        if not path.exists():
            broken.append(target)
    assert not broken, f"{document} links to missing files: {broken}"


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
