"""``interbert index build|add`` and ``interbert serve``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from interbert.errors import InterBertError, UsageError
from interbert.serve import (
    DEFAULT_BODY_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, DEFAULT_LIMIT_CONCURRENCY, DEFAULT_MAX_REGIONS,
    DEFAULT_RERANK_QUEUE_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT_S, INDEX_TYPES,
)
from interbert.serve.events import BUSY_WAIT
from interbert.serve.identity import DEFAULT_REQUEST_CLICKS_PER_MINUTE, DEFAULT_USER_CLICKS_PER_MINUTE
from interbert.utils.argtypes import positive_int, seconds
from interbert.utils.logs import SERVICE_FORMAT, setup_cli_logging

ENGINE_HELP = ("where the vectors are searched: faiss (index.faiss in the folder), milvus (milvus-lite in the folder), "
               "milvus:PATH.db, or milvus://HOST:PORT/COLLECTION (a Milvus server)")


def _cmd_index(args: argparse.Namespace) -> int:
    import json
    import sqlite3

    from interbert.serve.index import build_index
    from interbert.utils.device import checked_device

    setup_cli_logging(SERVICE_FORMAT, datefmt=None)
    append = args.index_command == "add"
    out = args.index if append else args.out
    if Path(out).exists() and not Path(out).is_dir():
        print(f"error: {'--index' if append else '--out'} {out} is a file, not an index folder", file=sys.stderr)
        return 2
    model = args.model
    if append and model is None:
        from interbert.serve.index import MANIFEST, read_manifest, recorded_path

        manifest_path = Path(out) / MANIFEST
        if not manifest_path.is_file():
            print(f"error: {out} is not an index folder ({MANIFEST} is missing): build it first", file=sys.stderr)
            return 2
        # The folder's record, confined as the service confines it (a relative path stays inside the folder).
        model = recorded_path(Path(out), read_manifest(manifest_path).get("model"), "model")
    device = str(checked_device(args.device))
    try:
        report = build_index(
            model, args.features, out, captions=args.captions, thumbnails=args.thumbnails, split=args.split,
            index_type=args.index_type,
            batch_size=args.batch_size, max_regions=getattr(args, "max_regions", DEFAULT_MAX_REGIONS), append=append,
            engine=args.engine, device=device, copy_model=getattr(args, "copy_model", False),
            copy_features=args.copy_features,
        )
    except (ValueError, OSError, KeyError, sqlite3.Error) as error:  # bad input: say what and where, no traceback
        # SQLite's messages ("unable to open database file") do not say which file
        print(f"error: {out}: {error}" if isinstance(error, sqlite3.Error) else f"error: {error}", file=sys.stderr)
        from interbert.serve.index import MANIFEST

        # A refusal of what the command line asked (UsageError) comes before any work: nothing to resume.
        if (Path(out) / MANIFEST).is_file() and not isinstance(error, UsageError):  # what it committed is kept
            print("(finished batches are kept; fix the input and run the same command again to resume)", file=sys.stderr)
        return _exit_code(error)
    left_out = f", {len(report.non_finite)} left out (non-finite embeddings, listed in index.json)" if report.non_finite else ""
    engine = json.loads((Path(out) / "index.json").read_text()).get("engine", "faiss")
    print(f"{out}: {report.total} images ({report.added} added, {report.already_indexed} already indexed{left_out}), "
          f"{report.index_type} index ({engine})")
    return 0


def _exit_code(error: BaseException) -> int:
    """The CLI's convention: 2 for what the command line must change (a path that cannot be opened, a
    refused setting), 1 for data that cannot be used (and for the rest: a full disk, a damaged file)."""
    from interbert.cli import error_exit_code

    return error_exit_code(error) or 1


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn  # noqa: F401  (missing, it is named as the `serve` extra before anything loads)

    from interbert.serve.metrics import access_log_sink
    from interbert.utils.device import checked_device

    args.device = str(checked_device(args.device))
    # Before the models load (and before any worker starts): a bad --access-log-file is refused in a moment.
    access_log_sink(args.access_log, args.access_log_file)
    if args.arm:
        _check_experiment_flags(args)
    elif args.index is None:
        raise UsageError("give --index IDX (one index) or --arm NAME=IDX[,FEED] at least twice (an A/B experiment)")
    if args.workers > 1:
        from interbert.serve.workers import serve_workers

        what = f"experiment {args.experiment!r}" if args.arm else args.index
        print(f"serving {what} on http://{args.host}:{args.port}/ with {args.workers} worker processes "
              f"(each loads the models and indexes)", flush=True)
        return serve_workers(args)
    try:
        app, line = build_serve_app(args)
    except (ValueError, OSError) as error:
        if isinstance(error, InterBertError):
            raise  # the CLI prints it with its own exit code (2 for what the command line must change)
        print(f"error: {error}", file=sys.stderr)
        return _exit_code(error)
    print(line, flush=True)
    _run(app, args)
    return 0


def build_serve_app(args: argparse.Namespace):
    """The app ``serve`` runs and the line that announces it, from the parsed command line: in the one
    process of ``serve``, and in each worker process of ``serve --workers N`` (interbert.serve.workers)."""
    import torch

    from interbert.serve.metrics import access_log_sink

    # Requests, not intra-op threads, use the cores: on a busy machine a forward split over 2 threads
    # waits at every op for the descheduled one (measured p90 of re-ranked search: 0.9-3.5 s with 2
    # threads, 70-90 ms with 1, on 2 shared cores).
    torch.set_num_threads(args.torch_threads)
    sink = access_log_sink(args.access_log, args.access_log_file)  # each process its own (appending) handle
    if args.arm:
        return _experiment_app(args, sink)
    from interbert.serve.service import create_app

    app = create_app(args.index, args.model, rerank_cap=args.rerank_cap, engine=args.engine,
                     max_concurrent_reranks=args.max_concurrent_reranks,
                     rerank_queue_timeout=args.rerank_queue_timeout, device=args.device, access_log=sink,
                     compile=args.compile)
    gate = app.state.rerank_gate
    return app, (f"serving {args.index} on http://{args.host}:{args.port}/ (at most {gate.limit} re-ranked searches "
                 f"at once, model on {args.device})")


def _run(app, args: argparse.Namespace) -> None:
    from interbert.serve.server import run_server

    run_server(app, args.host, args.port, args.log_level, header_timeout=args.header_timeout,
               body_timeout=args.body_timeout, limit_concurrency=args.limit_concurrency,
               access_log=args.access_log == "uvicorn", shutdown_timeout=args.shutdown_timeout)


def _check_experiment_flags(args: argparse.Namespace) -> None:
    from interbert.serve.abtest import parse_arm, parse_split
    from interbert.serve.identity import read_secret_file

    if args.index is not None or args.model is not None or args.engine is not None:
        raise UsageError("--index/--model/--engine serve one index; with --arm each arm names its own index "
                         "(searched by the engine its index folder records)")
    parse_split(args.split, len([parse_arm(text) for text in args.arm]))
    if args.user_secret_file:
        read_secret_file(args.user_secret_file)  # a bad secret file is refused in a moment, not after the models


def _experiment_app(args: argparse.Namespace, sink):
    from interbert.serve.abtest import parse_arm, parse_split
    from interbert.serve.abtest_cli import as_user_error
    from interbert.serve.experiment import create_experiment_app
    from interbert.serve.identity import read_secret_file

    _check_experiment_flags(args)
    arms = [parse_arm(text) for text in args.arm]
    split = parse_split(args.split, len(arms))
    secret = read_secret_file(args.user_secret_file) if args.user_secret_file else None
    # The experiment's warnings (per-process secret, insecure ids, a log upgraded) go to stderr.
    setup_cli_logging(SERVICE_FORMAT, datefmt=None)
    events = args.events or f"{args.experiment}.events.sqlite"
    app = as_user_error(create_experiment_app, arms, split, args.experiment, events,
                        salt=args.salt, rerank_cap=args.rerank_cap, max_concurrent_reranks=args.max_concurrent_reranks,
                        rerank_queue_timeout=args.rerank_queue_timeout, device=args.device, user_secret=secret,
                        insecure_user_ids=args.insecure_user_ids, user_clicks_per_minute=args.user_clicks_per_minute,
                        request_clicks_per_minute=args.request_clicks_per_minute, access_log=sink,
                        events_busy_wait=args.events_timeout, compile=args.compile)
    shares = ", ".join(f"{name} {100 * share:g}%" for name, share in zip(app.state.experiment.arms, app.state.experiment.split))
    return app, f"experiment {args.experiment!r} ({shares}) on http://{args.host}:{args.port}/, events in {events}"


def _timeout_seconds(text: str) -> float:
    """A finite timeout of more than 0 and at most an hour (a client must not hold a connection for ever)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 < value <= 3600:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 3600 seconds, got {text}")
    return value


def _common_index_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", required=True, help="feature store of the images (npz folder, TSV, HDF5, region store)")
    p.add_argument("--captions", help="captions file (Karpathy, COCO, Flickr30k JSON, a LAVIS/ALBEF annotation list, a Flickr8k token file, JSON lines): shown with results")
    p.add_argument("--split", help="only the images that --captions puts in this split (e.g. test)")
    p.add_argument("--thumbnails", help="folder of <image_id>.jpg/.png images; small copies are kept in the index")
    p.add_argument("--batch-size", type=int, default=64, help="images embedded (and committed) per batch (default 64)")
    p.add_argument("--engine", metavar="URI", help=ENGINE_HELP + " (default: the folder's; another one moves the vectors there)")
    p.add_argument("--copy-features", action="store_true",
                   help="copy the feature store into the index folder (features/NAME) and record it there: with "
                        "--copy-model the folder can be moved or copied to another machine and served as it is")
    _device_argument(p)


def _device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu (default), cuda, cuda:N, or auto (the GPU if there is one)")


def register(subparsers) -> None:
    """The ``index``, ``topics`` and ``serve`` sub-commands and their flags. Long because it declares every flag
    with its help, one statement each, and nothing else."""
    index = subparsers.add_parser("index", help="build an image index (FAISS or Milvus) for text-to-image search")
    sub = index.add_subparsers(dest="index_command", metavar="<action>", required=True)

    build = sub.add_parser("build", help="embed a feature store's images into a new index (re-run to resume)")
    build.add_argument("--model", required=True, help="saved InterBERT model folder (config.json, weights and its tokenizer: tokenizer.json or vocab.txt)")
    build.add_argument("--out", required=True, help="index folder to create or resume")
    _common_index_arguments(build)
    build.add_argument("--index-type", choices=INDEX_TYPES, default="auto",
                       help="flat = exact; hnsw/ivf = approximate; auto = flat up to 50,000 images, else hnsw")
    build.add_argument("--copy-model", action="store_true",
                       help="copy the model folder into the index folder (model/) and record it there, so that "
                            "the folder can be moved or copied (see --copy-features)")
    build.add_argument("--max-regions", type=int, default=DEFAULT_MAX_REGIONS,
                       help=f"regions per image, the global one included (default {DEFAULT_MAX_REGIONS})")
    build.set_defaults(func=_cmd_index)

    add = sub.add_parser("add", help="append the images of another feature store to an index")
    add.add_argument("--index", required=True, help="an index folder made by `interbert index build`")
    add.add_argument("--model", help="must be the model the index was built with (default: the recorded one)")
    _common_index_arguments(add)
    add.add_argument("--index-type", choices=INDEX_TYPES, default="auto",
                     help="change the index type (default: keep the folder's choice)")
    add.set_defaults(func=_cmd_index)

    serve = subparsers.add_parser("serve", help="serve text-to-image search over an index (HTTP API and web page)")
    serve.add_argument("--index", help="index folder made by `interbert index build`")
    serve.add_argument("--model", help="model folder (default: the one the index was built with)")
    serve.add_argument("--engine", metavar="URI",
                       help="search the index's vectors there (default: the engine its folder records), e.g. the same "
                            "Milvus collection at another address: milvus://HOST:PORT/COLLECTION")
    serve.add_argument("--arm", action="append", metavar="NAME=INDEX[,FEED]",
                       help="an A/B experiment's arm (give it 2+ times, control first) instead of --index; FEED is "
                            "a topic feed made by `interbert topics build`")
    serve.add_argument("--split", help="traffic shares of the arms in --arm order, e.g. 50/50 (default: equal)")
    serve.add_argument("--experiment", default="abtest", help="experiment name; users are reassigned when it changes")
    serve.add_argument("--salt", help="assignment salt (default: the experiment name)")
    serve.add_argument("--events", help="event log of impressions and clicks: an SQLite file (default: "
                       "EXPERIMENT.events.sqlite), or postgresql://USER@HOST:PORT/DB, shared by replicas (the password "
                       "from $PGPASSWORD, a libpq service file or ~/.pgpass; never in the URI)")
    serve.add_argument("--user-secret-file", metavar="PATH",
                       help="with --arm: the secret (>= 32 bytes, a file only its owner may read) that user ids and "
                            "cookies are signed with; a front end holding it may name users by a signed X-User-Id "
                            "(default: a random secret per process: cookies do not survive a restart)")
    serve.add_argument("--insecure-user-ids", action="store_true",
                       help="with --arm: also accept UNSIGNED user ids from X-User-Id and ?user= (local tests and "
                            "simulation only: anyone could then act as any user)")
    serve.add_argument("--user-clicks-per-minute", type=positive_int, default=DEFAULT_USER_CLICKS_PER_MINUTE,
                       help=f"with --arm: clicks one user may send in a minute before 429 "
                            f"(default {DEFAULT_USER_CLICKS_PER_MINUTE})")
    serve.add_argument("--request-clicks-per-minute", type=positive_int, default=DEFAULT_REQUEST_CLICKS_PER_MINUTE,
                       help=f"with --arm: clicks on the items of one request in a minute before 429 "
                            f"(default {DEFAULT_REQUEST_CLICKS_PER_MINUTE})")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--rerank-cap", type=int, default=200, help="most candidates re-scored by ITM per query")
    serve.add_argument("--max-concurrent-reranks", type=positive_int, default=None,
                       help="re-ranked searches running at once; more wait (see --rerank-queue-timeout) "
                            "(default: half the cores, at least 1)")
    serve.add_argument("--rerank-queue-timeout", type=seconds, default=DEFAULT_RERANK_QUEUE_TIMEOUT,
                       help="seconds a re-ranked search waits for a free slot before it is answered 503 with "
                            f"Retry-After (default {DEFAULT_RERANK_QUEUE_TIMEOUT:g}; 0 = never wait)")
    _device_argument(serve)
    serve.add_argument("--compile", choices=["off", "default"], default="off",
                       help="off (default): the re-rank as it was; default: candidates, query and regions padded to "
                            "a few fixed shapes and the scorer through torch.compile (the same scores; the first "
                            "query of each shape compiles, seconds to a minute)")
    serve.add_argument("--torch-threads", type=int, default=1,
                       help="intra-op threads per forward (default 1: concurrent requests use the cores)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--header-timeout", type=_timeout_seconds, default=DEFAULT_HEADER_TIMEOUT_S, metavar="S",
                       help="seconds a client has to send a request's head (from connecting, or from the first byte "
                            f"of its next request); later it is answered 408 and closed (default {DEFAULT_HEADER_TIMEOUT_S:g})")
    serve.add_argument("--body-timeout", type=_timeout_seconds, default=DEFAULT_BODY_TIMEOUT_S, metavar="S",
                       help="seconds a client has to send a request's body once its head is in; later it is answered "
                            f"408 and closed (default {DEFAULT_BODY_TIMEOUT_S:g})")
    serve.add_argument("--limit-concurrency", type=positive_int, default=DEFAULT_LIMIT_CONCURRENCY, metavar="N",
                       help="open connections plus running requests; past it new requests are answered 503 "
                            f"(default {DEFAULT_LIMIT_CONCURRENCY})")
    serve.add_argument("--access-log", choices=["uvicorn", "json", "off"], default="uvicorn",
                       help="one line per request: uvicorn's (default), json (request id, method, route, status, "
                            "latency, arm; no query text, user ids only hashed) or off")
    serve.add_argument("--access-log-file", metavar="PATH",
                       help="with --access-log json: append the lines to PATH (default: stderr)")
    serve.add_argument("--workers", type=positive_int, default=1, metavar="N",
                       help="worker processes sharing the port, each loading the models and indexes (default 1); "
                            "a worker that dies is replaced, one that cannot start stops the service; /metrics sums "
                            "the workers' counters")
    serve.add_argument("--events-timeout", type=_timeout_seconds, default=BUSY_WAIT, metavar="S",
                       help="with --arm: seconds an event write may wait (a lock, a busy or hung database) before "
                            f"the request is answered 503 (default {BUSY_WAIT:g})")
    serve.add_argument("--shutdown-timeout", type=_timeout_seconds, default=DEFAULT_SHUTDOWN_TIMEOUT_S, metavar="S",
                       help="on SIGTERM, seconds the requests in flight have to finish before they are cancelled "
                            f"(default {DEFAULT_SHUTDOWN_TIMEOUT_S:g})")
    serve.set_defaults(func=_cmd_serve)
