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
    assert {"convert", "export", "extract", "data", "tokenizer", "pretrain", "finetune", "evaluate", "demo", "index",
            "serve", "embed"} <= commands


def test_convert_cli_offers_every_preset():
    from interbert.config import PRESETS
    from interbert.convert_cli import PRESET_NAMES

    assert PRESET_NAMES == sorted(PRESETS)


def _run_cli(*args, env_extra=None, cwd=None):
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "INTERBERT_DEBUG"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "interbert.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_a_config_error_is_one_line_and_exit_2_and_debug_shows_the_traceback(tmp_path):
    from conftest import REPO

    config = str(REPO / "configs" / "pretrain_tiny.yaml")
    bad = _run_cli("pretrain", "--config", config, "train.no_such_key=1")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "no_such_key" in lines[-1]

    for debug in (["--debug"], []):
        shown = _run_cli(*debug, "pretrain", "--config", config, "train.no_such_key=1",
                         env_extra=None if debug else {"INTERBERT_DEBUG": "1"})
        assert shown.returncode != 0 and "Traceback" in shown.stderr and "ConfigError" in shown.stderr


def test_a_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = _run_cli("pretrain", "--config", str(missing))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(missing) in result.stderr.strip().splitlines()[-1]


def test_python_dash_m_interbert_is_the_cli():
    result = _run_module_help()
    assert result.returncode == 0 and "pretrain" in result.stdout


def _run_module_help():
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "interbert", "--help"], capture_output=True, text=True, timeout=120)


def test_a_refused_run_leaves_no_output_folder_but_keeps_one_the_user_made(tmp_path):
    """A run that fails before writing anything (here: a captions file that is not there) must not leave an
    empty train.output_dir behind; a folder that existed before the run stays."""
    from conftest import REPO

    from interbert.cli import main

    config = str(REPO / "configs" / "pretrain_tiny.yaml")
    missing = tmp_path / "no_captions.json"
    for out, existed in ((tmp_path / "new_run" / "sub", False), (tmp_path / "made_by_user", True)):
        if existed:
            out.mkdir()
        code = main(["pretrain", "--config", config, f"data.captions={missing}", f"data.features={tmp_path}",
                     f"train.output_dir={out}"])
        assert code == 2
        assert out.exists() == existed
        assert (tmp_path / "new_run").exists() is False
