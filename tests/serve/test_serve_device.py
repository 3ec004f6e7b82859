"""``--device`` of ``interbert index build`` and ``interbert serve``: the model runs where it is told, and a
device this machine does not have is refused with one line before anything is loaded or written."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import minilm_vocab
from interbert.cli import main as interbert_main
from interbert.serve.synthetic_gallery import save_tiny_model
from fixture_writers import write_gallery

FEATURE_DIM = 16
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: nothing to refuse")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device_gallery")
    write_gallery(folder, num_images=6, feature_dim=FEATURE_DIM, seed=2, images=False)
    model = save_tiny_model(folder / "model", minilm_vocab(), FEATURE_DIM, architecture="retrieval")
    return folder, model


def build_args(folder, model, out, *extra: str) -> list[str]:
    return ["index", "build", "--model", str(model), "--features", str(folder / "features"), "--out", str(out), *extra]


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_index_build_refuses_a_cuda_device_this_machine_lacks_before_writing(gallery, tmp_path, capsys, device):
    folder, model = gallery
    assert interbert_main(build_args(folder, model, tmp_path / "idx", "--device", device)) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: --device {device}: CUDA is not available on this machine " \
                          f"(torch {torch.__version__}); use --device cpu"
    assert not (tmp_path / "idx").exists()


def test_index_build_refuses_a_device_that_is_not_one(gallery, tmp_path, capsys):
    folder, model = gallery
    assert interbert_main(build_args(folder, model, tmp_path / "idx", "--device", "gpu0")) == 2
    assert "error: --device 'gpu0' is not a device (cpu, cuda, cuda:N or auto)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cpu_index(gallery, tmp_path_factory):
    folder, model = gallery
    out = tmp_path_factory.mktemp("device_index") / "idx"
    assert interbert_main(build_args(folder, model, out, "--device", "cpu")) == 0
    return out


def test_serve_with_device_cpu_answers_reranked_searches(cpu_index, gallery, monkeypatch, capsys):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: served.setdefault("app", app))
    assert interbert_main(["serve", "--index", str(cpu_index), "--device", "cpu"]) == 0
    assert "model on cpu" in capsys.readouterr().out
    service = served["app"].state.service
    assert next(service.model.model.parameters()).device == torch.device("cpu")
    with TestClient(served["app"]) as client:
        results = client.post("/search", json={"query": "a red square", "k": 3, "rerank": True}).json()["results"]
    assert len(results) == 3


@no_cuda
def test_serve_refuses_a_cuda_device_this_machine_lacks(cpu_index, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served despite the refused device"))
    assert interbert_main(["serve", "--index", str(cpu_index), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda: CUDA is not available on this machine")
