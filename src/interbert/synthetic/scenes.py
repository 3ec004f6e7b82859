"""Scenes of the generated benchmark: a few coloured objects on a plain background.

A scene is pure data (kinds, colours, sizes, boxes in pixels); pictures, detector output and text
are all derived from it, so the same scene always yields the same files. Twins are two scenes that
differ only by swapping two objects' colours or positions: the same words describe both, only the
binding of words to regions tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

KINDS = ("cube", "ball", "cylinder", "cone", "star", "ring")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "brown", "gray")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")

# Side length of an object's box in pixels, per size, as a fraction of the image height.
SIZE_RANGES = {"small": (0.15, 0.19), "large": (0.27, 0.34)}
# Width / height of each kind's box (a cylinder is taller than wide).
KIND_ASPECT = {"cube": 1.0, "ball": 1.0, "cylinder": 0.75, "cone": 0.9, "star": 1.0, "ring": 1.0}
# Objects may overlap a little ("some overlapping"), never enough to hide one another.
MAX_OBJECT_IOU = 0.2
# A spatial relation is only stated when the centres differ by this fraction of the image side;
# the same margin decides whether a caption's relation holds, so nothing borderline is claimed.
RELATION_MARGIN = 0.08


@dataclass(frozen=True)
class SceneObject:
    kind: str
    colour: str
    size: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    @property
    def attributes(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.kind)


@dataclass(frozen=True)
class Scene:
    image_id: int
    width: int
    height: int
    objects: tuple[SceneObject, ...]
    # For twins: the other twin's image id, how they differ ("colour" or "position") and which two
    # objects (indices into `objects`, the same in both twins) were swapped.
    twin_of: int | None = None
    twin_mode: str | None = None
    twin_pair: tuple[int, int] | None = None

    @cached_property
    def relation_table(self) -> dict[tuple[int, int], tuple[str, ...]]:
        """(i, j) -> the relations `objects[i] <relation> objects[j]` that clearly hold (computed once;
        caption sampling asks many times)."""
        n = len(self.objects)
        return {
            (i, j): tuple(
                r for r in RELATIONS if relation_holds(self.objects[i], self.objects[j], r, self.width, self.height)
            )
            for i in range(n) for j in range(n) if i != j
        }


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of two box arrays (N x 4 and M x 4, x1 y1 x2 y2) -> N x M."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def relation_holds(a: SceneObject, b: SceneObject, relation: str, width: int, height: int) -> bool:
    """Whether `a <relation> b` holds clearly (centres apart by more than the margin)."""
    (ax, ay), (bx, by) = a.centre, b.centre
    if relation == "left of":
        return ax + RELATION_MARGIN * width < bx
    if relation == "right of":
        return bx + RELATION_MARGIN * width < ax
    if relation == "above":
        return ay + RELATION_MARGIN * height < by
    if relation == "below":
        return by + RELATION_MARGIN * height < ay
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def relations_between(scene: Scene, i: int, j: int) -> list[str]:
    return list(scene.relation_table[(i, j)])


def _object_box(kind: str, size: str, cx: float, cy: float, height: int, rng: np.random.Generator):
    lo, hi = SIZE_RANGES[size]
    side = rng.uniform(lo, hi) * height
    w, h = side * KIND_ASPECT[kind], side
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def sample_scene(
    image_id: int,
    rng: np.random.Generator,
    width: int,
    height: int,
    min_objects: int = 2,
    max_objects: int = 5,
) -> Scene:
    """2-5 objects with random attributes, placed so that some overlap a little but none hides another."""
    while True:  # a crowded draw that cannot be placed is redrawn (rare)
        n = int(rng.integers(min_objects, max_objects + 1))
        objects: list[SceneObject] = []
        for _ in range(n):
            kind = KINDS[rng.integers(len(KINDS))]
            colour = COLOURS[rng.integers(len(COLOURS))]
            size = SIZES[rng.integers(len(SIZES))]
            for _attempt in range(60):
                probe = _object_box(kind, size, 0.0, 0.0, height, rng)
                half_w, half_h = (probe[2] - probe[0]) / 2, (probe[3] - probe[1]) / 2
                cx = rng.uniform(half_w + 1, width - half_w - 1)
                cy = rng.uniform(half_h + 1, height - half_h - 1)
                box = (cx - half_w, cy - half_h, cx + half_w, cy + half_h)
                if not objects or box_iou(np.array([box]), np.array([o.box for o in objects])).max() <= MAX_OBJECT_IOU:
                    objects.append(SceneObject(kind, colour, size, box))
                    break
            else:
                break
        if len(objects) == n:
            return Scene(image_id, width, height, tuple(objects))


def _move_to(obj: SceneObject, centre: tuple[float, float]) -> SceneObject:
    x1, y1, x2, y2 = obj.box
    w, h = x2 - x1, y2 - y1
    cx, cy = centre
    return replace(obj, box=(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))


def _fits(scene: Scene, objects: tuple[SceneObject, ...]) -> bool:
    boxes = np.array([o.box for o in objects])
    if (boxes[:, :2] < 0).any() or (boxes[:, 2] > scene.width).any() or (boxes[:, 3] > scene.height).any():
        return False
    iou = box_iou(boxes, boxes)
    np.fill_diagonal(iou, 0.0)
    return iou.max() <= MAX_OBJECT_IOU


def make_twin(scene: Scene, twin_id: int, mode: str, rng: np.random.Generator) -> tuple[Scene, Scene] | None:
    """Swap two objects' colours (mode "colour") or positions (mode "position").

    Returns the scene (annotated with its twin) and the twin, or None when no pair of objects makes
    a twin that differs from the scene (e.g. all objects share a colour).
    """
    objects = scene.objects
    pairs = [(i, j) for i in range(len(objects)) for j in range(i + 1, len(objects))]
    rng.shuffle(pairs)
    for i, j in pairs:
        a, b = objects[i], objects[j]
        if (a.size, a.kind) == (b.size, b.kind):
            continue  # swapping anything between two otherwise identical objects changes nothing
        if mode == "colour":
            if a.colour == b.colour:
                continue
            swapped = list(objects)
            swapped[i], swapped[j] = replace(a, colour=b.colour), replace(b, colour=a.colour)
        elif mode == "position":
            if not relations_between(scene, i, j):
                continue  # the swap must flip a relation a caption can state
            swapped = list(objects)
            swapped[i], swapped[j] = _move_to(a, b.centre), _move_to(b, a.centre)
        else:
            raise ValueError(f"unknown twin mode {mode!r}; expected 'colour' or 'position'")
        swapped = tuple(swapped)
        if not _fits(scene, swapped):
            continue
        original = replace(scene, twin_of=twin_id, twin_mode=mode, twin_pair=(i, j))
        twin = Scene(twin_id, scene.width, scene.height, swapped,
                     twin_of=scene.image_id, twin_mode=mode, twin_pair=(i, j))
        return original, twin
    return None
