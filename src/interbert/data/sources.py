"""Several corpora in one run (the paper pretrains on COCO + Visual Genome + Conceptual Captions + SBU).

A run names its sources in ``data.sources``, each a caption file and the feature store of its images::

    data:
      sources:
        - {name: coco, captions: coco_karpathy_train.json, features: coco_store}
        - {name: vg, captions: vg_captions.jsonl, features: vg.tsv, weight: 0.5}

The mixing rule:

- **Concatenation with namespaced ids.** Every image id and caption id of a source is prefixed with its
  name (``coco/123``), so two corpora that both number their images from 1 never share an id: image
  ``123`` of COCO and of VG are two images, with their own features, and neither is ever the other's
  "same image" when negatives are drawn. :class:`SourceStore` routes ``coco/123`` to the coco store's
  ``123``. (The reverse holds too: a photo that two corpora share — VG holds about 50K COCO images — is
  two images here; keep such duplicates in one source, as UNITER removes COCO's test images from VG.)
- **Weights** (optional, default 1): each epoch draws ``round(weight x captions)`` of a source's
  captions — all of them ``floor(weight)`` times, then a seeded sample without replacement of the rest —
  so ``0.5`` halves a large corpus' share and ``2`` doubles a small one's (:class:`WeightedSources`).
- **Hard negatives over the union**: TF-IDF ITM negatives are searched among the captions of every
  source, as the paper searches its whole pretraining corpus; a caption's nearest neighbours by TF-IDF
  come mostly from its own corpus anyway (shared vocabulary and style), and the namespacing above keeps
  a negative from ever being a caption of the same image.

The single-path form (``data.captions`` + ``data.features``) is one unnamed source whose ids stay as
the files spell them, so existing runs, caches and checkpoints are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from interbert.data.captions import Caption
from interbert.data.errors import UnknownImageError
from interbert.data.features import FeatureStore, Regions
from interbert.errors import DataError, UsageError

SEPARATOR = "/"  # between a source's name and its own image id: "coco/123"
SOURCE_KEYS = {"name", "captions", "features", "weight"}


@dataclass(frozen=True)
class Source:
    name: str | None  # None: the single-path form, ids as the files spell them
    captions: Path
    features: Path
    weight: float = 1.0


def sources_from_config(data: Mapping, where: str = "config") -> list[Source]:
    """The sources of a ``data`` section: ``data.sources`` (a list of ``{name, captions, features, weight?}``) or the single ``data.captions`` + ``data.features``. Refused with the setting's
    name: both forms at once, a source without a file, a repeated or unusable name, an unknown key (a
    typo such as ``feature:`` would otherwise leave a source without features), a weight that is not > 0."""
    listed = data.get("sources")
    if not listed:
        if not data.get("captions") or not data.get("features"):
            missing = " and ".join(k for k in ("data.captions", "data.features") if not data.get(k.split(".")[1]))
            raise UsageError(f"{where}: {missing} required (pass data.captions=FILE data.features=PATH, "
                             "or list data.sources)")
        return [Source(None, Path(data["captions"]), Path(data["features"]))]
    if data.get("captions") or data.get("features"):
        raise UsageError(f"{where}: give either data.sources or data.captions + data.features, not both")
    if not isinstance(listed, list):
        raise UsageError(f"{where}: data.sources must be a list of {{name, captions, features}}, not {type(listed).__name__}")
    sources: list[Source] = []
    for n, entry in enumerate(listed):
        at = f"{where}: data.sources[{n}]"
        if not isinstance(entry, Mapping):
            raise UsageError(f"{at} must be a mapping {{name, captions, features, weight?}}, not {entry!r}")
        unknown = set(entry) - SOURCE_KEYS
        if unknown:
            raise UsageError(f"{at}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; a source has "
                             f"{', '.join(sorted(SOURCE_KEYS))}")
        for key in ("name", "captions", "features"):
            if not entry.get(key):
                raise UsageError(f"{at} needs '{key}'")
        name = str(entry["name"])
        if SEPARATOR in name:
            raise UsageError(f"{at}: name {name!r} may not hold {SEPARATOR!r} (it separates the name from image ids)")
        if name in {s.name for s in sources}:
            raise UsageError(f"{at}: name {name!r} is used twice; image ids are namespaced by it, so names must differ")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or math.isinf(weight):
            raise UsageError(f"{at}: weight must be a number > 0, not {weight!r}")
        sources.append(Source(name, Path(entry["captions"]), Path(entry["features"]), float(weight)))
    return sources


def namespaced(captions: Sequence[Caption], name: str | None) -> list[Caption]:
    """``captions`` with image and caption ids prefixed by the source's name (unchanged when None)."""
    if name is None:
        return list(captions)
    return [replace(c, image_id=f"{name}{SEPARATOR}{c.image_id}", caption_id=f"{name}{SEPARATOR}{c.caption_id}")
            for c in captions]


def source_of(image_id: str) -> str:
    """The source name of a namespaced image id."""
    return image_id.split(SEPARATOR, 1)[0]


class SourceStore(FeatureStore):
    """The feature stores of several sources as one: ``store["coco/123"]`` is ``stores["coco"]["123"]``.

    The sources must agree on what a region is, or one model cannot train on all of them: the same
    feature size, and class distributions (their number) in all or in none (they decide the MRM target).
    """

    def __init__(self, stores: Mapping[str, FeatureStore]):
        self.stores = dict(stores)
        # for messages only (e.g. "no caption has features in ..."): each source and its store
        self.path = "; ".join(f"{name}={store.path}" for name, store in self.stores.items())
        kinds = {name: (store.feature_dim, _num_classes(store)) for name, store in self.stores.items()}
        if len(set(kinds.values())) > 1:
            described = ", ".join(f"{name} ({self.stores[name].path}): {dim}-d features, "
                                  f"{'no' if classes is None else classes} class distributions"
                                  for name, (dim, classes) in kinds.items())
            raise DataError(f"the sources' region features differ, so one model cannot train on them all: {described}")
        self.feature_dim = next(iter(kinds.values()))[0]

    def _route(self, image_id: str) -> tuple[FeatureStore, str] | None:
        name, sep, own_id = image_id.partition(SEPARATOR)
        store = self.stores.get(name)
        return (store, own_id) if sep and store is not None and own_id in store else None

    def __getitem__(self, image_id: str | int) -> Regions:
        image_id = str(image_id)
        routed = self._route(image_id)
        if routed is None:
            raise UnknownImageError(image_id, self.path)
        store, own_id = routed
        return store[own_id]

    def __contains__(self, image_id: object) -> bool:
        return self._route(str(image_id)) is not None

    def __len__(self) -> int:
        return sum(len(store) for store in self.stores.values())

    def ids(self) -> list[str]:
        return [f"{name}{SEPARATOR}{i}" for name, store in self.stores.items() for i in store.ids()]


def _num_classes(store: FeatureStore) -> int | None:
    probs = store[store.ids()[0]].class_probs
    return None if probs is None else int(probs.shape[1])


class WeightedSources(torch.utils.data.Dataset):
    """A caption dataset whose sources are drawn by weight: each epoch holds ``round(weight x n)`` of a
    source's ``n`` examples — every one ``floor(weight x n / n)`` times, then a sample without
    replacement of the remainder, seeded by ``(seed, epoch)`` so a resumed run draws the same — in the
    order of ``dataset``; the training loop shuffles. Its length is the same every epoch.

    An example drawn twice in one epoch (weight > 1) is built with another ``set_epoch`` value per copy,
    so its masks and negative differ as they would in another epoch."""

    def __init__(self, dataset, weights: Mapping[str, float], seed: int = 0):
        self.dataset, self.seed = dataset, seed
        names = np.array([source_of(c.image_id) for c in dataset.captions])
        self.members = {name: np.flatnonzero(names == name) for name in weights}
        self.counts = {name: round(weights[name] * len(self.members[name])) for name in weights}
        self.copies = max(1, *(math.ceil(weights[name]) for name in weights))  # distinct seeds per copy
        if sum(self.counts.values()) == 0:
            raise DataError("the source weights leave no example to train on")
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        draws = []  # (dataset index, copy number)
        for name, members in self.members.items():
            whole, rest = divmod(self.counts[name], len(members)) if len(members) else (0, 0)
            for copy in range(whole):
                draws += [(int(i), copy) for i in members]
            draws += [(int(i), whole) for i in sorted(rng.choice(members, rest, replace=False))]
        self.draws = draws

    def __len__(self) -> int:
        return len(self.draws)

    def set_progress(self, step: int, total_steps: int) -> None:
        if hasattr(self.dataset, "set_progress"):
            self.dataset.set_progress(step, total_steps)

    def __getitem__(self, position: int):
        index, copy = self.draws[position]
        # the dataset seeds an example by (seed, epoch, index): one epoch value per copy keeps copies apart
        self.dataset.set_epoch(self.epoch * self.copies + copy)
        return self.dataset[index]
