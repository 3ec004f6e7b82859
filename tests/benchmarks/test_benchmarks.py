"""The benchmark helpers measure what they claim: equal work for the VisualBERT peer, realistic
pretraining batches, and layers that skip padding without changing real positions."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import equal_work_visualbert_layers, pretraining_batch, visualbert_batch  # noqa: E402

from interbert.config import preset  # noqa: E402
from interbert.modeling import Padding  # noqa: E402


def test_visualbert_gets_the_layer_count_of_equal_work():
    # base: 6 x 73 + 6 x 36 + 6 x 37 token-layers over 73 positions = 12 layers; tiny: 2+2+2 -> 4
    assert equal_work_visualbert_layers(preset("base"), 36, 37) == 12
    assert equal_work_visualbert_layers(preset("tiny"), 36, 37) == 4


def test_pretraining_batch_is_padded_and_labelled_like_real_data():
    config = preset("tiny")
    b = pretraining_batch(config, 16, seed=0)
    lengths, regions = b["attention_mask"].sum(1), b["region_mask"].sum(1)
    assert lengths.min() >= 8 and lengths.max() <= 36 and regions.min() >= 11 and regions.max() <= 37
    assert b["input_ids"].shape[1] == lengths.max() and b["region_features"].shape[1] == regions.max()
    masked = b["msm_labels"] != -100
    assert (masked.sum(1) >= 1).all() and not masked[:, 0].any()  # one span per caption, never [CLS]
    assert not b["mrm_mask"][:, 0].any() and (b["mrm_mask"] <= b["region_mask"].bool()).all()
    assert (b["region_features"][b["mrm_mask"]] == 0).all()
    torch.testing.assert_close(b["mrm_class_targets"].sum(-1), torch.ones(16, b["region_mask"].shape[1]))
    vb = visualbert_batch(b)
    assert vb["labels"].shape[1] == b["input_ids"].shape[1] + b["region_features"].shape[1]


def test_padding_pack_unpack_keeps_real_rows_and_zeroes_padding():
    keep = torch.tensor([[True, True, False], [True, False, False]])
    padding = Padding.from_keep(keep)
    x = torch.randn(2, 3, 4)
    packed = padding.pack(x)
    assert packed.shape == (3, 4)
    back = padding.unpack(packed)
    torch.testing.assert_close(back[keep], x[keep])
    assert (back[~keep] == 0).all()
    full = Padding.from_keep(torch.ones(2, 3, dtype=torch.bool))
    assert full.attn_mask is None and full.unpack(full.pack(x)).data_ptr() == x.data_ptr()  # no copies


def test_timed_runs_refuse_a_busy_machine_unless_forced(monkeypatch):
    import os

    import pytest
    from common import check_start_load, load_markdown

    monkeypatch.setattr(os, "getloadavg", lambda: (1.7, 1.0, 1.0))
    with pytest.raises(SystemExit, match="load average 1.70"):
        check_start_load(force=False)
    load = check_start_load(force=True)
    assert load["loaded"] and "loaded machine" in load_markdown({**load, "load_average_at_end": 2.0})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 1.0, 1.0))
    quiet = check_start_load(force=False)
    assert not quiet["loaded"] and "loaded machine" not in load_markdown(quiet)


def test_bert_init_runs_differ_only_in_their_initial_weights(tmp_path):
    """RQ4 (benchmarks/bert_init.py): both variants are the demo's plan at the `small` preset with one
    vocabulary, BERT's; only where the text path's weights come from differs."""
    import bert_init

    bert = tmp_path / "bert"
    from interbert.recipes.demo_settings import load_demo, plan_view

    with_bert, scratch = (plan_view(bert_init.plan_for(v, 1, bert, None, None)) for v in ("bert", "scratch"))
    assert with_bert.pop("from_bert") == str(bert) and scratch.pop("tokenizer") == str(bert / "vocab.txt")
    assert with_bert.pop("tokenizer") is None and scratch.pop("from_bert") is None
    assert with_bert == scratch and scratch["preset"] == "small" and scratch["seed"] == 1
    assert scratch["pretrain_steps"] == load_demo().pretrain.train.max_steps  # the demo's budget unless told


def test_bert_init_runs_a_layer_slice_in_worker_processes_and_tables_it(tmp_path):
    """`bert_init.py --jobs 2 --layers 1 1 1`: both variants run at once in their own processes, each model
    has the asked depths (BERT's first layers fill the text path), and the table says which depths."""
    import subprocess

    from conftest import minilm_dir

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bert_init.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--jobs", "2", "--threads", "1", "--layers", "1", "1", "1",
                          "--bert", str(minilm_dir()), "--seeds", "0", "--runs", str(tmp_path / "runs"),
                          "--output", str(tmp_path / "results")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    for variant in ("bert", "scratch"):
        config = json.loads((tmp_path / "runs" / f"{variant}_seed0_layers111" / "pretrain" / "model" / "config.json").read_text())
        assert (config["num_single_stream_layers"], config["num_text_stream_layers"], config["num_image_stream_layers"]) == (1, 1, 1)
        assert config["hidden_size"] == 384
    assert "1 + 1 + 1 layers" in (tmp_path / "results" / "bert_init.md").read_text()
    saved = json.loads((tmp_path / "results" / "bert_init.json").read_text())
    assert saved["plan"]["layers"] == [1, 1, 1] and set(saved["retrieval"]) == {"bert", "scratch"}


@pytest.mark.slow  # ~40 s on a busy 2-core machine: 4 report processes and a PostgreSQL server start
def test_abtest_scale_smoke_run_tables_every_engine_and_setting(tmp_path):
    """`abtest_scale.py --scale` at a tiny size, on a throwaway PostgreSQL server: every engine at 1, 8 and 32
    clients wrote events, and each engine's report ran on both generated sizes (the table the issue asks)."""
    import json
    import os
    import subprocess

    from postgres_server import require_psycopg, server_binaries

    server_binaries(), require_psycopg()
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "abtest_scale.py"
    out = subprocess.run([sys.executable, str(script), "--scale", "0.00002", "--seconds", "0.2", "--out",
                          str(tmp_path / "abtest_scale")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    saved = json.loads((tmp_path / "abtest_scale.json").read_text())
    assert [(w["engine"], w["clients"]) for w in saved["writes"]] == [
        (engine, clients) for engine in ("sqlite", "postgresql") for clients in (1, 8, 32)]
    assert all(w["events"] > 0 and w["events"] % 2 == 0 for w in saved["writes"])  # an impression and its click
    assert [(r["engine"], r["impressions"]) for r in saved["reports"]] == [
        (engine, n) for engine in ("sqlite", "postgresql") for n in (20, 200)]
    assert all(r["peak_rss_mb"] > 0 for r in saved["reports"])
    table = (tmp_path / "abtest_scale.md").read_text()
    assert "load average" in table and table.count("| postgresql |") == 5


def test_vs_original_lists_every_round_with_its_speedups():
    """Issue 26: the table lists every round, not only the medians; a loop without a variant shows '-'."""
    import vs_original

    runs = {"original": [0.2, 0.3], "interbert": [0.1, 0.15],
            **{name: [0.1, 0.05] for name in vs_original.PRETRAIN_VARIANT_LABELS}}
    rows = vs_original.round_table_rows({"pretrain_loop": {"runs": runs},
                                         "retrieval_loop": {"runs": {"original": [0.4], "interbert": [0.2]}}})
    assert [row[:2] for row in rows] == [["pretrain", 1], ["pretrain", 2], ["retrieval", 1]]
    columns = list(vs_original.ROUND_COLUMNS)
    assert rows[1][2 + columns.index("interbert")] == "0.15"
    assert rows[1][1 + len(columns) + columns.index("interbert")] == "2.00x"  # 0.3 / 0.15
    assert rows[1][-1] == "6.00x"  # 0.3 / 0.05, the last variant
    assert rows[2][2:] == ["0.4", "0.2", *["-"] * (len(columns) - 2), "2.00x", *["-"] * (len(columns) - 2)]
