"""Recipe helpers take the values they need, not a whole settings object (issue 25).

A recipe's ``run`` reads its settings and passes values on; a helper that takes ``cfg`` (or its
``data`` / ``model`` / ``train`` section, or argparse's ``args``) and reaches into it hides what it depends
on and ties it to one schema. :func:`settings_climbs` finds every such reach by reading the recipes' source;
run this file as a script to print them (``python tests/recipes/test_recipe_helpers.py [src/interbert/recipes]``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[2] / "src" / "interbert" / "recipes"
FILES = ("common", "pretrain", "finetune_retrieval", "text", "vcr", "evaluate_retrieval", "validation")
ENTRY_POINTS = {"run", "run_cli"}  # where a recipe (or a command) reads its settings: by design
SETTINGS_NAMES = {"cfg", "args", "data_cfg", "model_cfg", "train_cfg"}

# kept on purpose, each for its reason:
#   setting / require_settings: their job is the settings tree itself, by dotted key (refuse a run whose
#     required keys are absent, naming each key); the counter does not see them (they read by getattr(node))
#   validation_captions: the data-section form, kept for callers that hold one (tests/data/test_data_sources.py);
#     the recipes call validation_split_captions with the values
#   each recipe's own model builder takes its ``model`` section: where the model starts (preset, overrides,
#     from_bert, from_checkpoint, and the recipe's extras) is one group, read whole in the recipe's own file
#     (tests/recipes/test_config_schema.py calls three of them so); what they call in common.py takes values
ALLOWED = {("validation", "validation_captions"), ("pretrain", "build_model"), ("finetune_retrieval", "build_model"),
           ("text", "build_text_model"), ("vcr", "build_vcr_model")}
MODEL_BUILDERS = {"build_model", "build_text_model", "build_vcr_model"}


def _settings_parameters(fn: ast.FunctionDef) -> set[str]:
    names = set()
    for arg in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]:
        annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
        if arg.arg in SETTINGS_NAMES or "Settings" in annotation or "TrainConfig" in annotation:
            names.add(arg.arg)
    return names


def _reaches(fn: ast.FunctionDef, params: set[str]) -> int:
    """``p.x``, ``vars(p)`` and ``getattr(p, ...)`` of a settings parameter ``p`` inside ``fn``."""
    count = 0
    for node in ast.walk(fn):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in params:
            count += 1
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("vars", "getattr")
              and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in params):
            count += 1
    return count


def settings_climbs(folder: Path = RECIPES) -> dict[tuple[str, str], int]:
    """(module, helper) -> how many times it reaches into a settings object it was handed."""
    climbs = {}
    for module in FILES:
        tree = ast.parse((folder / f"{module}.py").read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name in ENTRY_POINTS:
                continue
            params = _settings_parameters(fn)
            reaches = _reaches(fn, params) if params else 0
            if reaches:
                climbs[(module, fn.name)] = reaches
    return climbs


def settings_handed_down(folder: Path = RECIPES) -> list[str]:
    """Calls in a recipe's ``run`` that hand a settings object (``cfg``, a section of it) to one of the
    recipes' own helpers: each is a climb back up from the helper into the settings."""
    helpers = set()
    trees = {m: ast.parse((folder / f"{m}.py").read_text()) for m in FILES}
    for tree in trees.values():
        helpers |= {fn.name for fn in tree.body if isinstance(fn, ast.FunctionDef)} | {"validation_captions"}
    settings = {"cfg", "data", "model_cfg", "train_cfg"}
    handed = []
    for module, tree in trees.items():
        for fn in tree.body:
            if not (isinstance(fn, ast.FunctionDef) and fn.name == "run"):
                continue
            for call in ast.walk(fn):
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in helpers):
                    continue
                args = [*call.args, *(k.value for k in call.keywords)]
                if any((isinstance(a, ast.Name) and a.id in settings)
                       or (isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name) and a.value.id == "cfg"
                           and a.attr in ("data", "model", "train"))
                       for a in args):
                    handed.append(f"{module}.run -> {call.func.id}")
    return handed


def test_recipe_helpers_take_values_not_settings():
    climbs = settings_climbs()
    assert set(climbs) <= ALLOWED, f"helpers reaching into a settings object: {sorted(set(climbs) - ALLOWED)}"


def test_runs_hand_values_to_their_helpers():
    # require_settings checks the settings tree by dotted key; the model builders take the model section (ALLOWED)
    handed = [h for h in settings_handed_down() if h.rsplit("-> ", 1)[1] not in {"require_settings", *MODEL_BUILDERS}]
    assert not handed, handed


def test_the_counter_sees_a_climb(tmp_path):
    # the counter itself: a helper that takes a section and reads it is found, one that takes values is not
    for module in FILES:
        (tmp_path / f"{module}.py").write_text("")
    (tmp_path / "common.py").write_text(
        "def bad(data_cfg: CaptionDataSettings):\n    return data_cfg.captions, data_cfg.split\n"
        "def good(captions: str, split: str):\n    return captions, split\n"
        "def run(cfg):\n    return bad(cfg.data)\n")
    assert settings_climbs(tmp_path) == {("common", "bad"): 2}
    assert settings_handed_down(tmp_path) == ["common.run -> bad"]


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else RECIPES
    climbs = settings_climbs(folder)
    for (module, name), n in sorted(climbs.items()):
        print(f"{n:3d}  {module}.{name}")
    handed = settings_handed_down(folder)
    print(f"{sum(climbs.values())} reaches into a settings object in {len(climbs)} helpers "
          f"({sum(n for (m, _), n in climbs.items() if m == 'common')} in common.py)")
    print(f"{len(handed)} calls from a recipe's run hand a settings object to a helper "
          f"({sum(h.startswith('pretrain.') for h in handed)} from pretrain.run):")
    for h in handed:
        print("     ", h)
