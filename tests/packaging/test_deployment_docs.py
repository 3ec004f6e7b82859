"""The deployment section of docs/search.md (the README links it), followed as far as this machine allows
(issue 24): its ```bash block's commands run with local substitutions: the A/B world of tests/helpers/abtest_world.py (its indexes were built by
`build_index`, its feeds by `topics build`) for the demo's $D files, a throwaway PostgreSQL server for
db.internal, 127.0.0.1 and free ports for the hosts and port 8000, 2 workers for 4, and no $PGPASSWORD
(the test server trusts local connections). The one-box command runs, then the PostgreSQL command as two
replicas (one with 2 workers, one with 1), both hit by the same users, then the report from their store.

What it cannot follow here: the nginx block (no nginx on the machine: the test plays the proxy and sends
each user's requests to both replicas), several machines (the replicas are processes on localhost),
and a Milvus server (each replica reads the same FAISS folders, as if they had been copied)."""

from __future__ import annotations

import re
import shlex
import signal
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from abtest_world import build_world
from conftest import REPO
from interbert.cli import main as interbert_main
from interbert.serve.identity import sign_user_id
from serve_process import start_serve
from test_abtest_process import SECRET, secret_file

DOC_URI = "postgresql://abtest@db.internal:5432/abtest"

# not slow (20 s on an idle 2-core machine, five `serve` starts): the deployment section is a path users follow, so CI runs it


def deployment_commands() -> list[list[str]]:
    """The ``interbert`` commands of the section's ```bash block, continuation lines joined, $ARMS expanded
    (the block's one variable assignment), comments dropped; $D and the rest are left to substitute."""
    text = (REPO / "docs" / "search.md").read_text(encoding="utf-8")
    start = text.index("\n### Deployment: one box, then several\n")
    block = re.search(r"^```bash\n(.*?)^```$", text[start:], flags=re.S | re.M).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    arms = next(line for line in lines if line.startswith("ARMS=")).split("=", 1)[1].strip('"')
    return [shlex.split(line.split("#")[0].replace("$ARMS", arms)) for line in lines if line.startswith("interbert ")]


def local(command: list[str], world, tmp_path: Path, secret: str, uri: str, workers: int) -> list[str]:
    """``command`` with this machine's substitutions (the module's docstring), less `interbert serve`
    and the --host/--port that start_serve chooses itself."""
    files = {"$D/index_scratch": world.indexes[0], "$D/feed_scratch.sqlite": world.feeds[0],
             "$D/index_pre": world.indexes[1], "$D/feed_pre.sqlite": world.feeds[1], "$D/user.secret": secret,
             "$D/events.sqlite": tmp_path / "events.sqlite", DOC_URI: uri, "4": str(workers)}
    out, skip = [], False
    for word in command[2:]:
        if skip:
            skip = False
            continue
        if word in ("--host", "--port"):
            skip = True
            continue
        for name, value in files.items():
            word = str(value) if word == name else word.replace(name, str(value)) if name.startswith("$") else word
        out.append(word)
    return out


def test_the_deployment_section_runs_one_box_then_two_replicas_on_postgres(tmp_path, tmp_path_factory, postgres_uri):
    world = build_world(tmp_path_factory.mktemp("world"))
    secret = secret_file(tmp_path)
    one_box, replica, report = deployment_commands()
    assert one_box[:2] == replica[:2] == ["interbert", "serve"] and report[:3] == ["interbert", "abtest", "report"]
    assert "--workers" in one_box and DOC_URI in replica and DOC_URI in report

    server, port = start_serve(*local(one_box, world, tmp_path, secret, postgres_uri, 2), health="/health/ready")
    try:
        arms_one_box = _visit(f"http://127.0.0.1:{port}", "box")
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
    assert server.returncode == 0 and len(set(arms_one_box.values())) == 2

    replicas = [start_serve(*local(replica, world, tmp_path, secret, postgres_uri, workers), health="/health/ready")
                for workers in (2, 1)]
    try:
        urls = [f"http://127.0.0.1:{port}" for _, port in replicas]
        arms = [_visit(url, "replica") for url in urls]
        assert arms[0] == arms[1]  # every user in the same arm on both replicas
        assert all(httpx.get(f"{url}/health/ready", timeout=10).status_code == 200 for url in urls)
        served = sum(_counter(url, "interbert_events_written_total", "impression") for url in urls)
    finally:
        for server, _ in replicas:
            server.send_signal(signal.SIGTERM)
            server.communicate(timeout=60)
    assert all(server.returncode == 0 for server, _ in replicas)

    command = [word.replace(DOC_URI, postgres_uri) for word in report[1:]]
    command[command.index("--out") + 1] = str(tmp_path / "abtest.md")
    assert interbert_main(command) == 0
    assert served == 2 * 2 * USERS  # two topics per user on each replica
    rows = {row.split("|")[1].strip(): row.split("|")[4].strip() for row in (tmp_path / "abtest.md").read_text().splitlines()
            if re.match(r"\| (control|treatment) \| [\d.]+% \|", row)}  # the per-arm table: arm, share, users, requests
    assert set(rows) == {"control", "treatment"} and sum(map(int, rows.values())) == served, rows


USERS = 8


def _visit(url: str, prefix: str) -> dict[str, str]:
    """Each of USERS signed users opens two topics and clicks the first item of the first; user -> arm."""
    arms = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        topics = client.get("/topics").json()
        for n in range(USERS):
            user = {"X-User-Id": sign_user_id(f"{prefix}{n}", SECRET)}
            feeds = [client.get(f"/topics/{topic['topic_id']}", headers=user) for topic in topics[:2]]
            assert [feed.status_code for feed in feeds] == [200, 200]
            assert len({feed.json()["arm"] for feed in feeds}) == 1
            arms[f"{prefix}{n}"] = feeds[0].json()["arm"]
            first = feeds[0].json()
            click = client.post("/events/click", headers=user,
                                json={"request_id": first["request_id"], "image_id": first["results"][0]["image_id"]})
            assert click.status_code == 200
    return arms


def _counter(url: str, name: str, kind: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and sample.labels.get("kind") == kind)
