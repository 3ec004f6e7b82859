"""The library knows nothing of its applications (docs/architecture.md, "Layers").

Every module of ``src/interbert`` is read with ``ast`` (imports inside functions included) and each import
a library module makes of an application module is named with its file and line. The applications are the
command lines and what they run: ``recipes/``, ``serve/``, ``synthetic/``, ``extract/``, ``cli.py``,
``__main__.py`` and every ``cli`` / ``*_cli`` module (``data/cli.py`` included); everything else is the
library. Code under ``if __name__ == "__main__":`` is the module run as a script (``python -m
interbert.convert``): importing the library never runs it, so it may call the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
APPLICATION_PACKAGES = ("recipes", "serve", "synthetic", "extract")
APPLICATION_MODULES = ("cli", "__main__")
# Imports up the layers that stand, each with its reason (docs/architecture.md). Each must still be there
# (test_each_recorded_exception_is_still_needed): one that went is taken off this list, not left to cover a new one.
# None stands: the last, the processor's images= importing extract/, ended when the detector and image decoding
# moved into the library (interbert.detection, which extract/ re-exports).
RECORDED_EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_application(module: str) -> bool:
    """Whether ``module`` (``interbert.x.y``) is an application: a command line or what one runs."""
    parts = module.split(".")[1:]
    if not parts:
        return False
    return (parts[0] in APPLICATION_PACKAGES or parts[-1] in APPLICATION_MODULES
            or parts[-1].endswith("_cli"))


def _script_blocks(tree: ast.Module) -> list[ast.If]:
    """The module's top-level ``if __name__ == "__main__":`` blocks."""
    return [node for node in tree.body if isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators)]


def imported_modules(path: Path, src: Path) -> list[tuple[int, str]]:
    """(line, module) for every ``interbert`` module ``path`` imports anywhere, outside script blocks.
    ``from interbert.a import b`` counts as importing ``interbert.a.b`` when ``b`` is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skipped = {id(node) for block in _script_blocks(tree) for node in ast.walk(block)}
    package = module_name(path, src).split(".")
    if path.name != "__init__.py":
        package.pop()
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, target))
            for alias in node.names:  # `from interbert import serve` imports the sub-module
                candidate = src.joinpath(*target.split("."), alias.name)
                if candidate.is_dir() or candidate.with_suffix(".py").is_file():
                    found.append((node.lineno, f"{target}.{alias.name}"))
    return sorted((line, name) for line, name in found if name == "interbert" or name.startswith("interbert."))


def layering_violations(src: Path, allowed: dict = RECORDED_EXCEPTIONS) -> list[str]:
    """One line per import of an application module by a library module: ``file:line imports module``,
    except the ``allowed`` (library module, application module) pairs."""
    problems = []
    for path in sorted((src / "interbert").rglob("*.py")):
        module = module_name(path, src)
        if is_application(module):
            continue
        for line, target in imported_modules(path, src):
            if is_application(target) and (module, target) not in allowed:
                problems.append(f"{path.relative_to(src)}:{line} (library module {module}) imports {target}")
    return problems


def test_the_library_imports_no_application():
    assert layering_violations(SRC) == []


def test_each_recorded_exception_is_still_needed():
    found = {tuple(line.split(" (library module ")[1].split(") imports "))
             for line in layering_violations(SRC, allowed={})}
    assert set(RECORDED_EXCEPTIONS) <= found


@pytest.mark.parametrize("module, application", [
    ("interbert.processing", False), ("interbert.data.batches", False), ("interbert.train.loop", False),
    ("interbert.export_onnx", False), ("interbert.utils.device", False), ("interbert", False),
    ("interbert.serve", True), ("interbert.serve.index", True), ("interbert.recipes.demo", True),
    ("interbert.synthetic.benchmark", True), ("interbert.extract.run", True), ("interbert.cli", True),
    ("interbert.convert_cli", True), ("interbert.data.cli", True), ("interbert.__main__", True),
])
def test_each_module_has_its_side(module, application):
    assert is_application(module) is application


def test_a_violation_is_named_by_file_line_and_module(tmp_path):
    """Imports anywhere count (in a function, relative, `from package import module`); a script block does not."""
    package = tmp_path / "interbert"
    (package / "serve").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "serve" / "__init__.py").write_text("LIMIT = 1\n")
    (package / "cli.py").write_text("")
    (package / "clean.py").write_text(
        "import os\n\nif __name__ == '__main__':\n    from interbert.cli import main\n")
    (package / "app_cli.py").write_text("from interbert.serve import LIMIT\n")  # an application may
    (package / "lib.py").write_text(
        "def f():\n    from .serve import LIMIT\n    return LIMIT\n\n"
        "from interbert import serve\nimport interbert.app_cli\n")
    assert layering_violations(tmp_path) == [
        "interbert/lib.py:2 (library module interbert.lib) imports interbert.serve",
        "interbert/lib.py:5 (library module interbert.lib) imports interbert.serve",
        "interbert/lib.py:6 (library module interbert.lib) imports interbert.app_cli",
    ]


def test_the_service_constant_the_processor_uses_is_still_importable_from_serve():
    from interbert.data import DEFAULT_MAX_REGIONS
    from interbert.serve import DEFAULT_MAX_REGIONS as served

    assert served == DEFAULT_MAX_REGIONS == 36
