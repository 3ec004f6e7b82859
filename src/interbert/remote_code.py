"""The code a saved model folder carries, so that it loads in a Python where interbert is not installed:

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)

That is transformers' remote-code convention: config.json's ``auto_map`` names each Auto class's class
(``"AutoModel": "modeling_interbert.InterBertModel"``) and the files beside the weights define them, importing
each other relatively (``from .configuration_interbert import InterBertConfig``) and otherwise only packages
the user has (torch, transformers).

The files are generated from the package's own modules (:data:`FILES`) on every save, never kept by hand,
so they cannot drift from the code that trained the weights. Generating changes two things: imports of
interbert become relative imports of the folder's files, and the Auto registrations at the end of the
modules are left out (each folder's code is a module of its own: registering model type ``interbert`` from
it would clash with the package's registration and with another folder's) -- they become the ``auto_map``
instead. A module the model needs only a few functions of (``interbert.data.negatives``) is cut down to
those functions, what they call and the imports they use.

This module is one of the folder's files too: a model loaded from a folder (interbert not installed) saves
a folder that loads the same way, with the files it was itself loaded from.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE_MODULE = "interbert.remote_code"  # this module's name where interbert is installed


@dataclass(frozen=True)
class Source:
    """What a folder's file is generated from: a package module, all of it or only ``names`` (top-level
    definitions; those they use come along)."""

    module: str
    names: tuple[str, ...] = ()


# the file written into every model folder -> what it is generated from
FILES: dict[str, Source] = {
    "configuration_interbert.py": Source("interbert.config"),
    "negatives_interbert.py": Source("interbert.data.negatives", ("in_batch_itm_pairs",)),
    "objectives_interbert.py": Source("interbert.objectives"),
    "modeling_interbert.py": Source("interbert.modeling"),
    "remote_code_interbert.py": Source(PACKAGE_MODULE),
}
FILE_OF = {source.module: name.removesuffix(".py") for name, source in FILES.items()}  # module -> import name

HEADER = ("# Generated from {path} by interbert.remote_code when this folder was saved: the code that\n"
          "# AutoModel.from_pretrained(folder, trust_remote_code=True) runs. Edit interbert's sources, not this file.\n")


class GenerationError(RuntimeError):
    """A package module cannot become a folder's file as it is written (a bug in the package, caught by tests)."""


def source_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise GenerationError(f"no source file for {module}")
    return Path(spec.origin)


def _selection(text: str, names: tuple[str, ...], where: str) -> str:
    """The module ``text`` cut down to its top-level definitions ``names``, the definitions they use (by
    name, transitively), and the top-level imports those use, in the module's order."""
    tree = ast.parse(text)
    defined = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    missing = [name for name in names if name not in defined]
    if missing:
        raise GenerationError(f"{where} defines no {', '.join(missing)} at its top level")
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += [n.id for n in ast.walk(defined[name]) if isinstance(n, ast.Name) and n.id in defined]
    used = {n.id for name in wanted for n in ast.walk(defined[name]) if isinstance(n, ast.Name)}
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "module", None) != "__future__"
               and any((a.asname or a.name.split(".")[0]) in used for a in node.names)]
    kept = [node for node in tree.body if node in imports or getattr(node, "name", None) in wanted]
    segments = [ast.get_source_segment(text, node, padded=True) for node in kept]
    first = next(i for i, node in enumerate(kept) if node not in imports)
    return (f'"""From {where}: {", ".join(names)} and what {"they use" if len(names) > 1 else "it uses"}."""\n\n'
            "from __future__ import annotations\n\n" + "\n".join(segments[:first]) + "\n\n\n"
            + "\n\n\n".join(segments[first:]) + "\n")


def _registration(node: ast.stmt) -> tuple[str, str] | None:
    """``(Auto class, class)`` of a top-level ``AutoX.register(InterBertConfig, Class)`` statement."""
    call = node.value if isinstance(node, ast.Expr) else None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "register"
            and isinstance(call.func.value, ast.Name) and call.func.value.id.startswith("Auto")
            and len(call.args) >= 2 and isinstance(call.args[1], ast.Name)):
        return None
    return call.func.value.id, call.args[1].id


def _import_name(node: ast.ImportFrom, where: str) -> str:
    """The folder file that replaces the package module ``node`` imports from."""
    stem = FILE_OF.get(node.module or "")
    if stem is None:
        raise GenerationError(f"{where}:{node.lineno} imports from {node.module}, which no file of a model folder "
                              f"holds (interbert.remote_code.FILES)")
    only = FILES[f"{stem}.py"].names
    missing = [a.name for a in node.names if only and a.name not in only]
    if missing:
        raise GenerationError(f"{where}:{node.lineno} imports {', '.join(missing)} from {node.module}, of which a model "
                              f"folder holds only {', '.join(only)}")
    return stem


def _made_relative(text: str, where: str) -> tuple[str, dict[str, str]]:
    """``text`` with its imports of interbert made relative and its Auto registrations (with the comment
    just above them) left out; and those registrations, ``{Auto class: class}``."""
    tree, lines = ast.parse(text), text.splitlines(keepends=True)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "interbert" for a in node.names):
            raise GenerationError(f"{where}:{node.lineno}: write `from interbert.x import name`, which can become a "
                                  "relative import, not `import interbert...`")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "interbert":
            line, written = lines[node.lineno - 1], f"from {node.module} import"
            if written not in line:
                raise GenerationError(f"{where}:{node.lineno}: write `{written}` on one line, with single spaces")
            lines[node.lineno - 1] = line.replace(written, f"from .{_import_name(node, where)} import", 1)
    registered, dropped = {}, set()
    for node in tree.body:
        registration = _registration(node)
        if registration is None:
            continue
        registered[registration[0]] = registration[1]
        first = node.lineno - 1
        while first > 0 and lines[first - 1].lstrip().startswith("#"):
            first -= 1
        dropped.update(range(first, node.end_lineno))
    return "".join(line for i, line in enumerate(lines) if i not in dropped), registered


@functools.cache
def model_code() -> tuple[dict[str, str], dict[str, str]]:
    """The folder's files (name -> text) and the ``auto_map`` their classes make (Auto class ->
    ``file.Class``). Where this module is a folder's copy (interbert not installed), the files are those it
    was loaded with, and the auto_map is the one the loaded config already holds (empty here)."""
    if __name__ != PACKAGE_MODULE:
        here = Path(__file__).parent
        return {name: (here / name).read_text(encoding="utf-8") for name in FILES}, {}
    files, auto_map = {}, {}
    for name, source in FILES.items():
        path = source_path(source.module)
        where = "interbert/" + path.relative_to(source_path("interbert").parent).as_posix()
        text = path.read_text(encoding="utf-8")
        if source.names:
            text = _selection(text, source.names, where)
        text, registered = _made_relative(text, where)
        files[name] = HEADER.format(path=where) + text
        auto_map.update({auto: f"{name.removesuffix('.py')}.{cls}" for auto, cls in registered.items()})
    return files, auto_map


def write_model_code(folder: str | os.PathLike, config: Any) -> list[Path]:
    """Write the model's files into ``folder`` and their classes into ``config.auto_map`` (before the config
    is saved). Returns the paths written."""
    files, auto_map = model_code()
    if auto_map:
        config.auto_map = dict(auto_map)
    written = []
    for name, text in files.items():
        path = Path(folder) / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


__all__ = ["FILES", "GenerationError", "model_code", "write_model_code"]
