"""The one console command: every sub-command is listed, and building the parser stays light."""

from __future__ import annotations

import subprocess
import sys

from interbert.cli import build_parser


def test_help_lists_every_command_without_importing_torch():
    # a fresh interpreter: what building the CLI imports is what `interbert --help` pays for
    code = ("import sys; from interbert.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"convert", "extract", "data", "tokenizer", "pretrain", "finetune", "evaluate", "demo", "index",
            "serve"} <= commands


def test_convert_cli_offers_every_preset():
    from interbert.config import PRESETS
    from interbert.convert_cli import PRESET_NAMES

    assert PRESET_NAMES == sorted(PRESETS)
