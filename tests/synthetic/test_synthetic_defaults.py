"""The built-in benchmark's default bytes are a contract: the demo's data and every table in results/ were
made from them, so a knob added to ``data synth`` (issue 28) must leave the default output as it was.

The digests below were recorded from the code before the knobs existed (commit ff6100b), at three
settings that cover every feature layout and both languages. ``synth.json`` may gain keys that record new
knobs (adding a field is allowed, renaming one is not): it is compared with those keys taken out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from interbert.synthetic import generate

# Keys that later code adds to synth.json (knob settings, measured twin counts); without them the
# manifest must be the one the code wrote before.
ADDED_SETTINGS = ("proposals_per_object", "group_iou", "feature_noise", "twin_share")
ADDED_SPLITS = ("train_twin_pairs", "val_twin_pairs")

RECORDED = {
    # interbert data synth OUT --images 60 --seed 0   (every other option at its default)
    "defaults": (dict(images=60, seed=0), {
        "README.md": "17ebafcf3881303e", "captions.json": "976c4c5e43193a07", "glue": "a795817eeaee6d08",
        "images": "11537f0b60eac84f", "regions.tsv": "7e568b74f425d462", "scenes.jsonl": "04690b8000d2dbff",
        "synth.json": "6fb4b0f427811de0", "vcr": "28ef634b2902c361",
    }),
    # --images 40 --seed 5 --lang zh --format npz --feature-dim 32 --num-classes 20 --no-images
    "zh_npz": (dict(images=40, seed=5, lang="zh", fmt="npz", feature_dim=32, num_classes=20, render_images=False), {
        "README.md": "cc3ba85f664f8c5f", "captions.json": "34084821afa3b00b", "glue": "fe7d2af380da8e37",
        "images": "fbc24115d8505da4", "regions": "6a4b906b493b5ab1", "scenes.jsonl": "18e42efce03b6dbf",
        "synth.json": "eff2c364aace8efb", "vcr": "e619c34b449873ff",
    }),
    # --images 30 --seed 2 --format store --feature-dim 16 --num-classes 12 --no-images
    "store": (dict(images=30, seed=2, fmt="store", feature_dim=16, num_classes=12, render_images=False), {
        "README.md": "fe2fa3c00c42629f", "captions.json": "45bb203e39009551", "glue": "6c7cbcd38146b878",
        "images": "b384bb936e95e965", "regions": "049a16b6b939fec6", "scenes.jsonl": "8b0d8c280b64800a",
        "synth.json": "4d492765c69b362c", "vcr": "b4e71093beeef607",
    }),
}


def _entry_digest(root: Path, entry: Path, content=None) -> str:
    """sha256 over (relative path, sha256 of the bytes) of every file under ``entry``, first 16 hex digits."""
    digest = hashlib.sha256()
    files = [entry] if entry.is_file() else sorted(p for p in entry.rglob("*") if p.is_file())
    for path in files:
        data = content if content is not None else path.read_bytes()
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()[:16]


def _manifest_without_added_keys(path: Path) -> bytes:
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for key in ADDED_SETTINGS:
        manifest["settings"].pop(key, None)
    for key in ADDED_SPLITS:
        manifest["splits"].pop(key, None)
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_default_knobs_write_the_bytes_recorded_before_the_knobs_existed(name, tmp_path):
    settings, recorded = RECORDED[name]
    out = tmp_path / name
    generate(out, **settings)
    found = {}
    for entry in sorted(out.iterdir()):
        content = _manifest_without_added_keys(entry) if entry.name == "synth.json" else None
        found[entry.name] = _entry_digest(out, entry, content)
    assert found == recorded
