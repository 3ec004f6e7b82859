"""Packaging: shipped configs as package data, dependency ranges vs constraints.txt, extras, the wheel.

The slow test installs the wheel (non-editable) into a fresh venv and trains from the packaged default
config there, from a folder that has no ``configs/``: what a user of ``pip install interbert`` gets.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from interbert.cli import build_parser
from interbert.extras import EXTRA_MODULES
from interbert.utils.config_files import load_config, packaged_configs, resolve_config

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SHIPPED = {"pretrain_tiny", "finetune_retrieval_tiny", "finetune_vcr_tiny", "finetune_text_tiny", "pretrain_base",
           "finetune_retrieval_base"}
# each training command and the shipped config it defaults to
RECIPE_DEFAULTS = {
    ("pretrain",): "pretrain_tiny",
    ("finetune", "retrieval"): "finetune_retrieval_tiny",
    ("finetune", "vcr"): "finetune_vcr_tiny",
    ("finetune", "text"): "finetune_text_tiny",
}


def constraints() -> dict[str, str]:
    """constraints.txt as {canonical name: exact version}."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version
    return pins


def test_shipped_configs_are_package_resources():
    folder = resources.files("interbert") / "configs"
    configs = packaged_configs()
    assert set(configs) == SHIPPED
    for name, path in configs.items():
        assert path == Path(str(folder / f"{name}.yaml"))
        assert resolve_config(name) == path and resolve_config(f"{name}.yaml") == path
        assert load_config(name)["train"]["output_dir"]  # every recipe's config has a train section


def test_top_level_configs_are_the_packaged_ones():
    # users' scripts and the README say configs/pretrain_tiny.yaml: it must stay the shipped file
    top = REPO / "configs"
    assert {p.stem for p in top.glob("*.yaml")} == SHIPPED
    for name, path in packaged_configs().items():
        assert (top / f"{name}.yaml").read_bytes() == path.read_bytes()


def test_each_recipe_defaults_to_its_shipped_config():
    parser = build_parser()
    for command, name in RECIPE_DEFAULTS.items():
        args = parser.parse_args([*command, "train.max_steps=1"])
        assert Path(args.config) == packaged_configs()[name], command
        assert Path(parser.parse_args([*command, "--config", name]).config) == packaged_configs()[name]


def test_a_path_is_never_swapped_for_a_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrain_tiny.yaml").write_text("train: {output_dir: mine}\n")
    assert resolve_config("pretrain_tiny.yaml") == Path("pretrain_tiny.yaml")  # the user's own file wins
    assert load_config("pretrain_tiny.yaml")["train"]["output_dir"] == "mine"
    assert resolve_config("elsewhere/pretrain_tiny.yaml") == Path("elsewhere/pretrain_tiny.yaml")


def test_constraints_pin_every_dependency_inside_its_range():
    """make installs with -c constraints.txt: every requirement (core and extras) must be pinned there,
    or make would install whatever is newest; and each pin must satisfy pyproject's range, or the
    install fails to resolve."""
    pins = constraints()
    requirements = [Requirement(r) for r in PYPROJECT["dependencies"]]
    requirements += [Requirement(r) for extra in PYPROJECT["optional-dependencies"].values() for r in extra]
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name == "torchvision":
            continue  # only in .venv-extract, whose Makefile target pins it with its torch
        assert name in pins, f"{requirement} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {requirement}"
    # ranges, not pins: an install must not replace the user's torch or numpy
    assert not [str(r) for r in requirements if any(spec.operator in ("==", "===") for spec in r.specifier)]
    assert pins["torch"] == "2.13.0"  # the CPU build on the reference machine; a newer one is a CUDA build


def test_extras_match_pyproject():
    """interbert/extras.py names the extra to install for a missing module: its table must follow pyproject."""
    extras = PYPROJECT["optional-dependencies"]
    assert set(EXTRA_MODULES) == set(extras) - {"dev"}
    providers = importlib.metadata.packages_distributions()  # import name -> distributions (faiss -> faiss-cpu)
    for extra, modules in EXTRA_MODULES.items():
        declared = {canonicalize_name(Requirement(r).name) for r in extras[extra]}
        for module in modules:
            if module not in providers:
                continue  # not installed here (torchvision outside .venv-extract): nothing to compare with
            assert {canonicalize_name(d) for d in providers[module]} & declared, f"{module} is not in [{extra}]"


def _cli_without(modules: list[str], *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess where importing ``modules`` fails as if they were not installed."""
    code = ("import sys\n"
            f"for name in {modules!r}: sys.modules[name] = None  # makes `import name` raise ModuleNotFoundError\n"
            "from interbert.cli import main\n"
            f"sys.exit(main({list(argv)!r}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("INTERBERT_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


@pytest.mark.parametrize(("missing", "argv", "extra"), [
    (["faiss"], ["index", "build", "--model", "m", "--features", "f", "--out", "o"], "serve"),
    (["uvicorn"], ["serve", "--index", "nowhere"], "serve"),
    (["faiss"], ["demo", "--out", "nowhere"], "serve"),
    (["jieba"], ["demo", "--lang", "zh", "--out", "nowhere"], "zh"),
    (["torchvision"], ["extract", "nowhere", "out", "--weights", "random"], "extract"),
    (["pyarrow"], ["embed", "--model", "m", "--out", "nowhere", "--texts", "t", "--format", "parquet"], "parquet"),
    (["onnxruntime"], ["export", "onnx", "--model", "nowhere", "--out", "nowhere"], "export"),
    (["onnxscript"], ["export", "onnx", "--model", "nowhere", "--out", "nowhere"], "export"),
    (["wandb"], ["pretrain", "train.report_to=wandb", "train.output_dir=nowhere"], "wandb"),
    (["mlflow"], ["pretrain", "train.report_to=[tensorboard,mlflow]", "train.output_dir=nowhere"], "mlflow"),
])
def test_a_missing_extra_is_one_error_line_naming_it(missing, argv, extra, tmp_path):
    result = _cli_without(missing, *argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"pip install 'interbert[{extra}]'" in lines[0] and missing[0] in lines[0]
    assert not (tmp_path / "nowhere").exists()  # refused before doing anything


def test_help_works_without_any_extra():
    result = _cli_without(["fastapi", "pydantic", "uvicorn", "faiss", "torchvision", "jieba"], "--help")
    assert result.returncode == 0, result.stderr
    for command in ("serve", "index", "extract", "pretrain", "demo"):
        assert command in result.stdout


def build_wheel(out: Path) -> Path:
    """``pip wheel --no-deps`` of the checkout's sources (in an isolated build environment, as a release
    build). From a copy: setuptools writes build/ and an .egg-info next to the sources it builds."""
    sources = out / "sources"
    shutil.copytree(REPO / "src", sources / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, sources / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(sources)],
                   check=True, timeout=600, cwd=out)
    (wheel,) = out.glob("interbert-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_ships_configs_and_page_and_declares_ranges(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata).decode()
    assert {f"interbert/configs/{name}.yaml" for name in SHIPPED} <= names
    demo_stages = {f"interbert/configs/demo/{path.name}" for path in (REPO / "src" / "interbert" / "configs" / "demo").glob("*.yaml")}
    assert len(demo_stages) == 7 and demo_stages <= names  # `interbert demo` reads its stages from the package
    assert "interbert/serve/page.html" in names
    requires = [Requirement(line.removeprefix("Requires-Dist:").strip())
                for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert requires and not [str(r) for r in requires if any(spec.operator in ("==", "===") for spec in r.specifier)]
    assert "Requires-Python: >=3.11" in metadata.splitlines()
    for extra in ("serve", "extract", "zh", "dev"):
        assert f"Provides-Extra: {extra}" in metadata


@pytest.mark.slow
def test_a_non_editable_install_trains_from_its_packaged_config(wheel, tmp_path):
    """The done-when check of issue 16: a fresh venv, the wheel installed with constraints.txt (torch
    2.13.0 = the CPU build), then `interbert pretrain` without --config, from a folder without configs/."""
    # without the test run's PYTHONPATH: pip would take the checkout's sources for an installed interbert
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "INTERBERT_DEBUG")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=env)
    bin_ = venv / "bin"
    subprocess.run([bin_ / "pip", "install", "-q", "-c", REPO / "constraints.txt", wheel], check=True, timeout=1800,
                   env=env)
    work = tmp_path / "work"
    work.mkdir()

    def run(*argv) -> subprocess.CompletedProcess:
        result = subprocess.run([str(a) for a in argv], cwd=work, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    location = run(bin_ / "python", "-c", "import interbert; print(interbert.__file__)").stdout.strip()
    assert Path(location).is_relative_to(venv)  # the installed copy, not the checkout
    assert "pretrain" in run(bin_ / "python", "-m", "interbert", "--help").stdout
    run(bin_ / "interbert", "data", "synth", "data", "--images", "24", "--format", "store", "--no-images")
    run(bin_ / "interbert", "pretrain", "data.captions=data/captions.json", "data.features=data/regions",
        "data.vocab_size=120", "train.max_steps=2", "train.batch_size=4", "train.output_dir=run",
        "train.progress_bar=false", "train.tensorboard=false", "data.verify_features=false")
    assert (work / "run" / "model" / "config.json").is_file()
    # the service's extra is not installed: its command says so in one line
    refused = subprocess.run([bin_ / "interbert", "index", "build", "--model", "run/model", "--features",
                              "data/regions", "--out", "idx"], cwd=work, env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "pip install 'interbert[serve]'" in refused.stderr
