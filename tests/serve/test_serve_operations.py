"""Operating the search service (issue 24): GET /metrics parsed by prometheus-client's own parser, liveness
and readiness apart, X-Request-Id, the JSON access log, and the flags' refusals; through FastAPI's test
client. The A/B app's metrics and its event store's failures are in tests/abtest/test_abtest_operations.py."""

from __future__ import annotations

import json
import sqlite3

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import minilm_vocab, single_torch_thread
from interbert.cli import main as interbert_main
from interbert.serve.index import build_index
from interbert.serve.service import create_app
from interbert.serve.synthetic_gallery import save_tiny_model
from fixture_writers import write_gallery

FEATURE_DIM = 16
QUERY = "a secret query about a dog"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ops")
    write_gallery(folder, num_images=12, feature_dim=FEATURE_DIM, seed=5)
    model = save_tiny_model(folder / "model", minilm_vocab(), FEATURE_DIM, architecture="retrieval")
    build_index(model, folder / "features", folder / "index", thumbnails=folder / "images", progress=False)
    return folder


@pytest.fixture
def served(folder):
    """A fresh app per test: its counters start at zero, and its access log is a list."""
    lines: list[dict] = []
    app = create_app(folder / "index", folder / "model", access_log=lines.append)
    with single_torch_thread(), TestClient(app) as client:
        yield client, app, lines


def scrape(client) -> dict[tuple[str, tuple], float]:
    """GET /metrics through prometheus-client's parser: {(sample name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def requests_counted(samples, **labels) -> float:
    """interbert_http_requests_total summed over the samples that carry ``labels``."""
    return sum(value for (name, sample_labels), value in samples.items()
               if name == "interbert_http_requests_total" and labels.items() <= dict(sample_labels).items())


def test_metrics_count_the_requests_sent_by_route_template_and_status(served):
    client, app, _ = served
    for rerank in (False, True, False):
        assert client.post("/search", json={"query": QUERY, "k": 3, "rerank": rerank}).status_code == 200
    image_id = app.state.service.index.records([1])[0].image_id
    assert client.get(f"/images/{image_id}").status_code == 200
    assert client.get(f"/images/{image_id}").status_code == 200
    assert client.get("/images/no/such/image").status_code == 404
    assert client.get("/no-such-page").status_code == 404
    samples = scrape(client)
    assert requests_counted(samples, route="/search", status="200", method="POST") == 3
    assert requests_counted(samples, route="/images/{image_id}", status="200") == 2
    assert requests_counted(samples, route="/images/{image_id}", status="404") == 1
    assert requests_counted(samples, route="unmatched", status="404") == 1
    # The raw paths never become labels (one time series per image id would grow without bound).
    assert not any(image_id in str(labels) or "no/such" in str(labels) for _, labels in samples)
    count = samples[("interbert_http_request_duration_seconds_count",
                     (("arm", ""), ("method", "POST"), ("route", "/search"), ("status", "200")))]
    assert count == 3
    assert samples[("interbert_rerank_slots", ())] == app.state.rerank_gate.limit
    assert samples[("interbert_rerank_slots_in_use", ())] == 0
    assert samples[("interbert_rerank_rejected_total", ())] == 0
    # The scrape itself is counted on the next one.
    assert requests_counted(scrape(client), route="/metrics") == 1


def test_the_info_metric_names_the_model_and_the_index(served, folder):
    client, app, _ = served
    manifest = json.loads((folder / "index" / "index.json").read_text())
    (info,) = [dict(labels) for (name, labels) in scrape(client) if name == "interbert_service_info"]
    assert info["kind"] == "search" and info["weights_sha256"] == manifest["weights_sha256"]
    assert info["index_type"] == "flat" and info["images"] == "12" and info["engine"] == "faiss"


def test_a_request_refused_by_the_body_bound_is_counted_under_its_route(served):
    client, _, lines = served
    response = client.post("/search", content=b"x" * 20_000, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert requests_counted(scrape(client), route="/search", status="413") == 1
    assert lines[0]["route"] == "/search" and lines[0]["status"] == 413


def test_rerank_gate_refusals_are_counted(folder):
    app = create_app(folder / "index", folder / "model", max_concurrent_reranks=1, rerank_queue_timeout=0)
    gate = app.state.rerank_gate
    with single_torch_thread(), TestClient(app) as client:
        async def hold_the_slot():
            return gate.slot()

        # Hold the only slot from the app's own event loop (the gate lives there), then ask for a re-rank.
        held = client.portal.call(hold_the_slot)
        client.portal.call(held.__aenter__)
        try:
            assert scrape(client)[("interbert_rerank_slots_in_use", ())] == 1
            busy = client.post("/search", json={"query": QUERY, "rerank": True})
            assert busy.status_code == 503 and busy.headers["retry-after"]
        finally:
            client.portal.call(held.__aexit__, None, None, None)
        samples = scrape(client)
    assert samples[("interbert_rerank_rejected_total", ())] == 1
    assert samples[("interbert_rerank_slots_in_use", ())] == 0
    assert requests_counted(samples, route="/search", status="503") == 1


def test_liveness_and_readiness_are_apart_and_health_keeps_its_fields(served):
    client, _, _ = served
    assert client.get("/health/live").json() == {"status": "alive"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"model": "ok", "index": "ok"}}
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["images"] == 12  # the contract of /health is unchanged


def test_readiness_is_503_naming_the_index_when_its_lookup_fails(folder):
    app = create_app(folder / "index", folder / "model")
    with single_torch_thread(), TestClient(app) as client:
        # A real failure of the lookup: the index's image table goes away under the running service, as
        # when its folder is replaced by a broken copy (renamed back afterwards).
        with sqlite3.connect(folder / "index" / "meta.sqlite", isolation_level=None) as other:
            other.execute("ALTER TABLE images RENAME TO images_gone")
            try:
                ready = client.get("/health/ready")
            finally:
                other.execute("ALTER TABLE images_gone RENAME TO images")
        assert client.get("/health/ready").status_code == 200  # and ready again once it is back
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not ready" and body["checks"]["model"] == "ok"
    assert "images" in body["checks"]["index"]


def test_request_ids_are_made_or_taken_when_well_formed(served):
    client, _, lines = served
    made = client.get("/health/live").headers["x-request-id"]
    assert len(made) == 32 and all(c in "0123456789abcdef" for c in made)
    assert client.get("/health/live", headers={"X-Request-Id": "proxy-id_42"}).headers["x-request-id"] == "proxy-id_42"
    for bad in ("a" * 65, "has space", "new\\nline", "semi;colon"):
        given = client.get("/health/live", headers={"X-Request-Id": bad}).headers["x-request-id"]
        assert given != bad and len(given) == 32
    assert [line["request_id"] for line in lines[:2]] == [made, "proxy-id_42"]


def test_the_access_log_has_one_record_per_request_and_no_query_text(served):
    client, _, lines = served
    search = client.post("/search", json={"query": QUERY, "k": 2}, headers={"X-Request-Id": "s1"})
    client.get("/images/nope")
    assert search.status_code == 200
    assert [(r["request_id"], r["method"], r["route"], r["status"]) for r in lines] == [
        ("s1", "POST", "/search", 200), (lines[1]["request_id"], "GET", "/images/{image_id}", 404)]
    assert all(r["latency_ms"] >= 0 and "arm" not in r for r in lines)
    assert "secret" not in json.dumps(lines) and "nope" not in json.dumps(lines)


def test_access_log_flags_are_checked_before_anything_loads(folder, tmp_path, capsys):
    index = str(folder / "index")
    assert interbert_main(["serve", "--index", index, "--access-log-file", str(tmp_path / "a.log")]) == 2
    assert "error: --access-log-file" in capsys.readouterr().err
    assert interbert_main(["serve", "--index", index, "--access-log", "json",
                           "--access-log-file", str(tmp_path / "missing" / "a.log")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --access-log-file") and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as refused:
        interbert_main(["serve", "--index", index, "--access-log", "yaml"])
    assert refused.value.code == 2
