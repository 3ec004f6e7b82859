"""The one console command: ``interbert <command> ...``.

Each command lives next to the code it drives; a module joins the CLI by exposing
``register(subparsers)``, which adds its sub-parser(s) and sets ``func`` (called with the parsed
args; its return value is the exit code). Modules are imported lazily by name so that
``interbert --help`` stays fast and one broken optional dependency cannot take down every command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from interbert import __version__

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = [
    "interbert.convert_cli",
    "interbert.extract",
    "interbert.serve.cli",
    "interbert.data.cli",
    "interbert.synthetic.cli",
    "interbert.recipes.cli",
    "interbert.recipes.tasks_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interbert",
        description="InterBERT: multimodal pretraining, retrieval, VCR, text tasks and search.",
    )
    parser.add_argument("--version", action="version", version=f"interbert {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
