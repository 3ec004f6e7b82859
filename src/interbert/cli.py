"""The one console command: ``interbert <command> ...``.

Each command lives next to the code it drives; a module joins the CLI by exposing
``register(subparsers)``, which adds its sub-parser(s) and sets ``func`` (called with the parsed
args; its return value is the exit code). Modules are imported lazily by name so that
``interbert --help`` stays fast and one broken optional dependency cannot take down every command.

Errors a user can cause (a bad setting, a missing file, a malformed line; see :mod:`interbert.errors`)
end the command with one line, ``error: ...``, and a non-zero exit: 2 for usage and config, 1 for data.
So does an optional dependency that is not installed: the line names the extra to install (:mod:`interbert.extras`).
``--debug`` (or ``INTERBERT_DEBUG=1``) re-raises them with their traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from interbert import __version__

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = [
    "interbert.convert_cli",
    "interbert.export_cli",
    "interbert.extract",
    "interbert.embed_cli",
    "interbert.serve.cli",
    "interbert.serve.abtest_cli",
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
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also INTERBERT_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


# What an OSError on a path says about the path itself (it cannot be opened or created as given), as opposed
# to the machine (EIO, ENOSPC, ...), which stays a traceback unless a writer names it (StoreWriteError).
PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ELOOP,
                         errno.ENAMETOOLONG, errno.EEXIST})


def error_exit_code(error: BaseException) -> int | None:
    """The exit code for an error the user caused and can fix, or None for a bug (shown with its traceback)."""
    from interbert.errors import USAGE_EXIT, InterBertError

    if isinstance(error, InterBertError):
        return error.exit_code
    if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return USAGE_EXIT  # a path given on the command line or in a config that cannot be opened
    if isinstance(error, OSError) and error.filename is not None and error.errno in PATH_ERRNOS:
        return USAGE_EXIT  # a symlink loop, a name too long, a file where a folder must go: the path named
    return None


def error_message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return str(error)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere, also after the sub-command
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    debug = debug or os.environ.get("INTERBERT_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 -- sorted into the user's errors and bugs below
        from interbert.extras import extra_for_missing_module

        # an optional dependency (pyproject's extras) imported where the command uses it: name the extra
        shown = extra_for_missing_module(error, needed_by=f"interbert {args.command}") or error
        code = error_exit_code(shown)
        if debug or code is None:
            raise
        print(f"error: {error_message(shown)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
