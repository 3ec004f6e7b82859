"""The simulated users' ground truth: topic titles (English, Chinese) against the benchmark's scenes."""

from __future__ import annotations

import socket

import pytest

from interbert.errors import UsageError
from interbert.serve.simulate import Want, benchmark_topics, check_local, parse_topic


@pytest.mark.parametrize("title, want", [
    ("a red ball", Want(kind="ball", colour="red")),
    ("Large blue cubes", Want(kind="cube", colour="blue", size="large")),
    ("little rings", Want(kind="ring", size="small")),
    ("红色的球", Want(kind="ball", colour="red")),
    ("一个大的绿色立方体", Want(kind="cube", colour="green", size="large")),
    ("红色的大球", Want(kind="ball", colour="red", size="large")),  # the benchmark's own word order
    ("大家的球", Want(kind="ball")),  # 大 of 大家 (everyone) is no size
    ("大立方体", Want(kind="cube", size="large")),
    ("sunset over the sea", Want()),
])
def test_topic_titles_name_benchmark_attributes(title, want):
    assert parse_topic(title) == want


def test_an_image_matches_when_one_object_has_every_named_attribute():
    objects = [{"kind": "ball", "colour": "red", "size": "small"}, {"kind": "cube", "colour": "blue", "size": "large"}]
    assert any(Want(kind="ball", colour="red").matches(o) for o in objects)
    assert not any(Want(kind="ball", colour="blue").matches(o) for o in objects)  # both words, not one object
    assert not any(Want(kind="cube", size="small").matches(o) for o in objects)


def test_benchmark_topics_are_the_most_frequent_pairs():
    scenes = {str(i): [{"kind": "ball", "colour": "red", "size": "small"}] for i in range(5)}
    scenes["9"] = [{"kind": "cone", "colour": "orange", "size": "large"}]
    assert benchmark_topics(scenes, 2) == ["a red ball", "an orange cone"]
    assert benchmark_topics(scenes, 1, lang="zh") == ["红色的球"]
    assert parse_topic(benchmark_topics(scenes, 1, lang="zh")[0]) == Want(kind="ball", colour="red")


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.0.0.2:8000", "ftp://127.0.0.1:8000",
                                 "http://127.0.0.1.example.com:8000", "127.0.0.1:8000"])
def test_the_simulator_refuses_other_hosts(url):
    with pytest.raises(UsageError, match="only sends traffic to this machine"):
        check_local(url)


def test_the_simulator_accepts_this_machine():
    assert check_local("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_local("http://localhost:9") == "http://localhost:9"


def test_a_server_that_is_not_running_is_one_error_line(tmp_path, capsys):
    from interbert.cli import main as interbert_main

    (tmp_path / "synth.json").write_text('{"files": {"scenes": "scenes.jsonl"}}')
    (tmp_path / "scenes.jsonl").write_text('{"image_id": 0, "objects": []}\n')
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        code = interbert_main(["abtest", "simulate", "--url", f"http://127.0.0.1:{port}", "--users", "2",
                               "--data", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (f"error: nothing answers at http://127.0.0.1:{port}: "
                                               "start `interbert serve --arm ...` first")


def test_benchmark_topics_can_count_one_split_only(tmp_path):
    from interbert.serve.simulate import read_scenes

    lines = ['{"image_id": 0, "split": "train", "objects": [{"kind": "ball", "colour": "red", "size": "small"}]}',
             '{"image_id": 1, "split": "test", "objects": [{"kind": "cube", "colour": "blue", "size": "large"}]}']
    (tmp_path / "scenes.jsonl").write_text("\n".join(lines) + "\n")
    assert benchmark_topics(read_scenes(tmp_path / "scenes.jsonl", "test"), 5) == ["a blue cube"]
    assert len(read_scenes(tmp_path / "scenes.jsonl")) == 2
    with pytest.raises(Exception, match="no scenes of split 'val'"):
        read_scenes(tmp_path / "scenes.jsonl", "val")


def test_asking_for_more_topics_than_the_scenes_hold_says_so(tmp_path, capsys):
    from interbert.cli import main as interbert_main

    lines = ['{"image_id": 0, "split": "test", "objects": [{"kind": "ball", "colour": "red", "size": "small"}]}',
             '{"image_id": 1, "split": "test", "objects": [{"kind": "cube", "colour": "blue", "size": "large"}]}']
    (tmp_path / "synth.json").write_text('{"files": {"scenes": "scenes.jsonl"}}')
    (tmp_path / "scenes.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "topics.txt"
    assert interbert_main(["abtest", "topics", str(tmp_path), "--out", str(out), "--count", "30"]) == 0
    assert sorted(out.read_text().splitlines()) == ["a blue cube", "a red ball"]
    assert "2 topics (--count 30 asked for more" in capsys.readouterr().out
