"""``interbert topics build`` and ``interbert abtest report|simulate|topics``.

The experiment itself runs under ``interbert serve --arm ... --arm ...`` (:mod:`interbert.serve.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from interbert.serve.events import REPORT_TIMEOUT_S
from interbert.utils.argtypes import positive_int, positive_seconds


def as_user_error(function, *args, **kwargs):
    """Run ``function``; a plain ValueError from the search stack (e.g. "the index was built with another
    model") is something the user fixes, so it becomes one ``error:`` line (exit 1), as `interbert serve`
    reports it, instead of a traceback."""
    from interbert.errors import DataError, InterBertError

    try:
        return function(*args, **kwargs)
    except ValueError as error:
        if isinstance(error, InterBertError):
            raise
        raise DataError(str(error)) from error


def _cmd_topics_build(args: argparse.Namespace) -> int:
    from interbert.serve.topics import build_feed

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    counts = as_user_error(build_feed, args.topics, args.index, args.out, model_dir=args.model, top_n=args.top,
                           batch_size=args.batch_size, progress=not args.no_progress, engine=args.engine)
    print(f"{args.out}: {counts['topics']} topics ({counts['built']} built, {counts['skipped']} already done), "
          f"top {args.top} each")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from interbert.serve.report import write_report

    from interbert.serve.events import is_postgres_uri

    if args.plot:
        plot_path = args.plot
    elif args.out:
        plot_path = Path(args.out).with_suffix(".png")
    elif is_postgres_uri(args.log):  # no file beside a database: the plot goes to the working folder
        plot_path = Path("abtest-report.png")
    else:
        plot_path = Path(args.log).with_suffix(".png")
    report, markdown = write_report(args.log, args.out, plot_path, args.timeout)
    if args.out:
        print(f"{args.out} (plot {plot_path})")
    else:
        print(markdown, end="")
    if report.srm_flagged:
        print(f"warning: sample-ratio mismatch (p = {report.srm_p:.2g}): the metrics are not trustworthy",
              file=sys.stderr)
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from interbert.serve.identity import read_secret_file
    from interbert.serve.simulate import simulate

    secret = read_secret_file(args.user_secret_file) if args.user_secret_file else None
    result = simulate(args.url, args.users, args.data, max_requests=args.max_requests, max_seconds=args.max_seconds,
                      seed=args.seed, k=args.k, user_secret=secret)
    arms = ", ".join(f"{arm}: {v['requests']} requests, {v['clicks']} clicks" for arm, v in sorted(result.by_arm.items()))
    print(f"{result.requests} requests from {args.users} users, {result.clicks} clicks in {result.seconds:.1f} s ({arms})")
    if result.rate_limited:
        print(f"warning: the server refused {result.rate_limited} clicks over its click limits (429); start it with "
              f"a higher --user-clicks-per-minute / --request-clicks-per-minute for this traffic", file=sys.stderr)
    return 0


def _cmd_benchmark_topics(args: argparse.Namespace) -> int:
    from interbert.serve.simulate import benchmark_topics, read_scenes
    from interbert.utils.files import atomic_write_text

    titles = benchmark_topics(read_scenes(args.data, args.split), args.count, lang=args.lang, seed=args.seed)
    atomic_write_text(args.out, "".join(t + "\n" for t in titles))
    short = (f" (--count {args.count} asked for more: the split's scenes hold only {len(titles)} colour-kind "
             f"combinations)" if len(titles) < args.count else "")
    print(f"{args.out}: {len(titles)} topics{short}")
    return 0


def register(subparsers) -> None:
    topics = subparsers.add_parser("topics", help="topic feeds for recommendation, computed offline")
    sub = topics.add_subparsers(dest="topics_command", metavar="<action>", required=True)
    build = sub.add_parser("build", help="rank an index's images for every topic (ITM re-ranked; re-run to resume)")
    build.add_argument("--topics", required=True,
                       help='topics file: one title per line, or JSON lines {"topic_id": ..., "title": ...}')
    build.add_argument("--index", required=True, help="index folder made by `interbert index build`")
    build.add_argument("--model", help="model folder (default: the one the index was built with)")
    build.add_argument("--engine", metavar="URI",
                       help="search the index's vectors there (default: the engine its folder records)")
    build.add_argument("--out", required=True, help="feed file (SQLite) to create or resume")
    build.add_argument("--top", type=positive_int, default=20, help="items kept per topic (default 20)")
    build.add_argument("--batch-size", type=positive_int, default=16, help="topics per batch and commit (default 16)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.add_argument("--torch-threads", type=positive_int,
                       help="intra-op threads (default: torch's, one per core; use 1 on a machine others share)")
    build.set_defaults(func=_cmd_topics_build)

    abtest = subparsers.add_parser("abtest", help="A/B experiments: report, simulated traffic, benchmark topics")
    sub = abtest.add_subparsers(dest="abtest_command", metavar="<action>", required=True)
    report = sub.add_parser("report", help="CTR per arm, treatment vs control with a user-level 95%% CI, SRM check")
    report.add_argument("log", help="event log written by `interbert serve --arm ... --events LOG`: its SQLite "
                        "file or its postgresql://USER@HOST:PORT/DB")
    report.add_argument("--out", help="Markdown file to write (default: print to stdout)")
    report.add_argument("--plot", help="PNG plot (default: --out with .png, else LOG with .png; for a PostgreSQL LOG "
                        "abtest-report.png)")
    report.add_argument("--timeout", type=positive_seconds, default=REPORT_TIMEOUT_S, metavar="SECONDS",
                        help="a PostgreSQL LOG whose server does not answer all of the report's queries within this "
                             f"is an error, not a wait for ever (default {REPORT_TIMEOUT_S:g})")
    report.set_defaults(func=_cmd_report)

    simulate = sub.add_parser("simulate", help="simulated users of the built-in benchmark against a local server")
    simulate.add_argument("--url", required=True, help="the server, on this machine: http://127.0.0.1:PORT")
    simulate.add_argument("--users", type=positive_int, required=True)
    simulate.add_argument("--data", required=True,
                          help="the benchmark folder the served index was built from (`interbert data synth` output)")
    simulate.add_argument("--max-requests", type=positive_int, default=1000, help="stop after this many feeds (default 1000)")
    simulate.add_argument("--max-seconds", type=positive_seconds, default=60.0, help="stop after this long (default 60)")
    simulate.add_argument("--k", type=positive_int, default=10, help="items per feed request (default 10)")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--user-secret-file", metavar="PATH",
                          help="the server's --user-secret-file: the simulated users' ids are signed with it "
                               "(without it they are plain ids, which only a server with --insecure-user-ids accepts)")
    simulate.set_defaults(func=_cmd_simulate)

    topics_from = sub.add_parser("topics", help="write a topics file from the benchmark's most frequent colour+kind pairs")
    topics_from.add_argument("data", help="benchmark folder (`interbert data synth` output)")
    topics_from.add_argument("--out", required=True)
    topics_from.add_argument("--count", type=positive_int, default=20)
    topics_from.add_argument("--lang", choices=["en", "zh"], default="en")
    topics_from.add_argument("--split", choices=["train", "val", "test"],
                             help="count only this split's scenes (the split the served index holds)")
    topics_from.add_argument("--seed", type=int, default=0)
    topics_from.set_defaults(func=_cmd_benchmark_topics)
