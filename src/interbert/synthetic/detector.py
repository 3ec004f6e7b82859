"""A *simulated* object detector for generated scenes (no network runs; nothing is learned).

It imitates what a bottom-up-attention Faster R-CNN gives InterBERT, including the property that
makes MRM mask whole IoU groups:

- every object gets several jittered proposals that overlap each other heavily (IoU >= 0.5), plus a
  few background proposals that overlap nothing much (IoU < 0.3);
- a proposal's feature is a fixed random code of its object's attributes (kind + colour + size, one
  code per value, fixed by the seed), weighted by how well the box covers the object, plus noise. So
  the feature of one proposal can be read off its neighbours unless the whole group is masked;
- a class distribution over the detector's classes (class 0 = background, class k = KINDS[k-1]),
  peaked on the object's kind, less so for looser boxes.

How much a masked proposal leaks through its neighbours is set by :class:`DetectorKnobs` (issue 28's
knobs, ``data synth --proposals-per-object --group-iou --feature-noise``); their defaults are the
constants below, and at the defaults every byte is what it was before the knobs existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from interbert.synthetic.scenes import COLOURS, KINDS, SIZES, Scene, box_iou

PROPOSALS_PER_OBJECT = (3, 4)  # drawn uniformly per object
BACKGROUND_PROPOSALS = (2, 3)
MIN_GROUP_IOU = 0.5  # every two proposals of one object
MIN_OBJECT_IOU = 0.65  # every proposal with its object's true box
MAX_BACKGROUND_IOU = 0.3  # a background proposal with any other proposal
BACKGROUND_CODES = 4  # kinds of "stuff" a background proposal can look like (floor, wall, ...)
FEATURE_NOISE = 0.5
CLASS_FLOOR = 0.02  # probability mass spread evenly over all classes
JITTER = 0.05  # first standard deviation of a proposal's corners, as a share of its object's side
# the knob's floor: below it the jitter (0.29 of the side at 0.1) turns proposals inside out
MIN_KNOB_GROUP_IOU = 0.1
MAX_PROPOSALS_PER_OBJECT = 16  # a knob's ceiling: 5 objects x 16 + 3 = 83 boxes, past any model's max_regions


@dataclass(frozen=True)
class DetectorKnobs:
    """How strongly overlapping proposals leak each other's content (issue 28).

    ``proposals_per_object``: (fewest, most), drawn uniformly per object; (1, 1) leaves nothing to leak.
    ``group_iou``: the least IoU of two proposals of one object. The jitter (x spread^3) and the least
    IoU with the object's true box (1 - 0.35 x spread^1.5, spread = (1 - group_iou) / 0.5) follow it, so
    that the proposals fill the range it allows: mean IoU of two proposals of an object 0.80 at the
    default 0.5, 0.57 at 0.3 (8% of pairs below the masking threshold 0.4, which group masking then
    leaves unmasked beside the anchor), 0.34 at 0.1 (68%), 0.95 at 0.7 (measured on 100 scenes).
    ``feature_noise``: standard deviation of the noise added to every feature (the codes have unit
    variance): more noise, less of the object's code readable off a neighbour."""

    proposals_per_object: tuple[int, int] = PROPOSALS_PER_OBJECT
    group_iou: float = MIN_GROUP_IOU
    feature_noise: float = FEATURE_NOISE

    def validate(self) -> None:
        """ValueError naming the knob's flag for a value the detector cannot simulate."""
        low, high = self.proposals_per_object
        if not 1 <= low <= high <= MAX_PROPOSALS_PER_OBJECT:
            raise ValueError(f"--proposals-per-object must be N or MIN-MAX with 1 <= MIN <= MAX <= "
                             f"{MAX_PROPOSALS_PER_OBJECT}, got {low}-{high}")
        if not (math.isfinite(self.group_iou) and MIN_KNOB_GROUP_IOU <= self.group_iou < 1.0):
            raise ValueError(f"--group-iou must be an IoU in [{MIN_KNOB_GROUP_IOU}, 1), got {self.group_iou}")
        if not (math.isfinite(self.feature_noise) and self.feature_noise >= 0.0):
            raise ValueError(f"--feature-noise must be a finite standard deviation >= 0, got {self.feature_noise}")

    @property
    def _spread(self) -> float:
        """How much looser than the default the groups are: 1.0 at the default group IoU."""
        return (1.0 - self.group_iou) / (1.0 - MIN_GROUP_IOU)

    @property
    def object_iou(self) -> float:
        """The least IoU of a proposal with its object's true box (MIN_OBJECT_IOU at the default)."""
        return 1.0 - (1.0 - MIN_OBJECT_IOU) * self._spread ** 1.5

    @property
    def jitter(self) -> float:
        """The first standard deviation of the proposals' corners (JITTER at the default)."""
        return JITTER * self._spread ** 3


DEFAULT_KNOBS = DetectorKnobs()


def max_proposals(max_objects: int = 5, knobs: DetectorKnobs = DEFAULT_KNOBS) -> int:
    return max_objects * knobs.proposals_per_object[1] + BACKGROUND_PROPOSALS[1]


@dataclass(frozen=True)
class AttributeCodes:
    """One random unit-variance vector per attribute value; a proposal's clean feature is the
    normalised sum of its object's kind, colour and size codes."""

    kind: np.ndarray  # K x D
    colour: np.ndarray  # colours x D
    size: np.ndarray  # 2 x D
    background: np.ndarray  # BACKGROUND_CODES x D

    @classmethod
    def from_seed(cls, seed: int, feature_dim: int) -> AttributeCodes:
        rng = np.random.default_rng([seed, 0xC0DE])

        def codes(n: int) -> np.ndarray:
            return rng.standard_normal((n, feature_dim), dtype=np.float32)

        return cls(codes(len(KINDS)), codes(len(COLOURS)), codes(len(SIZES)), codes(BACKGROUND_CODES))

    def object_code(self, kind: str, colour: str, size: str) -> np.ndarray:
        total = self.kind[KINDS.index(kind)] + self.colour[COLOURS.index(colour)] + self.size[SIZES.index(size)]
        return total / np.float32(np.sqrt(3.0))


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # N x 4 float32, x1 y1 x2 y2 pixels
    features: np.ndarray  # N x D float32
    class_probs: np.ndarray  # N x C float32, rows sum to 1
    object_index: np.ndarray  # N int, the scene object a proposal belongs to, -1 for background


def _iou(a, b) -> float:
    """IoU of two boxes; plain Python, as the proposal samplers compare a handful at a time."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _jittered_groups(boxes: np.ndarray, counts: np.ndarray, width: int, height: int,
                     rng: np.random.Generator, knobs: DetectorKnobs = DEFAULT_KNOBS) -> list[np.ndarray]:
    """For each true box, `counts[k]` boxes around it, each overlapping the true box and every other
    of its group by at least the minimums. Candidates for all objects are drawn at once."""
    sides = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)  # w h w h
    groups: list[list[list[float]]] = [[] for _ in boxes]
    pending = np.arange(len(boxes))
    scale, object_iou, group_iou = knobs.jitter, knobs.object_iou, knobs.group_iou
    while len(pending):
        candidates = boxes[pending, None] + rng.normal(0.0, scale, size=(len(pending), 16, 4)) * sides[pending, None]
        candidates = np.clip(candidates, 0.0, [width, height, width, height])
        fits = _rowwise_iou(candidates.reshape(-1, 4), np.repeat(boxes[pending], 16, axis=0)) >= object_iou
        fits &= (candidates[..., 2] - candidates[..., 0]).ravel() >= 2
        fits &= (candidates[..., 3] - candidates[..., 1]).ravel() >= 2  # only a wide jitter (low group_iou) gets here
        for row, k in enumerate(pending):
            group = groups[k]
            for candidate in candidates[row][fits[row * 16:(row + 1) * 16]].tolist():
                if len(group) < counts[k] and all(_iou(candidate, other) >= group_iou for other in group):
                    group.append(candidate)
        pending = np.array([k for k in pending if len(groups[k]) < counts[k]], dtype=int)
        scale *= 0.8  # a box crowded against the border: ask for tighter jitter
    return [np.array(group) for group in groups]


def _background_boxes(count: int, taken: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    size = rng.uniform(0.3, 1.0, size=(64, 2)) * [width, height]
    corner = rng.uniform(0.0, 1.0, size=(64, 2)) * ([width, height] - size)
    candidates = np.concatenate([corner, corner + size], axis=1)
    free = box_iou(candidates, taken).max(axis=1) < MAX_BACKGROUND_IOU
    boxes: list[list[float]] = []
    for candidate in candidates[free].tolist():
        if all(_iou(candidate, other) < MAX_BACKGROUND_IOU for other in boxes):
            boxes.append(candidate)
            if len(boxes) == count:
                break
    # A scene crowded enough to leave no free background region simply gets fewer of them.
    return np.array(boxes).reshape(-1, 4)


def simulate_detections(
    scene: Scene, codes: AttributeCodes, num_classes: int, rng: np.random.Generator,
    knobs: DetectorKnobs = DEFAULT_KNOBS,
) -> Detections:
    if num_classes < len(KINDS) + 1:
        raise ValueError(f"num_classes={num_classes} is too small: need background + {len(KINDS)} kinds")
    fewest, most = knobs.proposals_per_object
    counts = rng.integers(fewest, most + 1, size=len(scene.objects))
    true_boxes = np.array([o.box for o in scene.objects])
    object_boxes = np.concatenate(_jittered_groups(true_boxes, counts, scene.width, scene.height, rng, knobs))
    owners = np.repeat(np.arange(len(scene.objects)), counts).tolist()
    n_background = int(rng.integers(BACKGROUND_PROPOSALS[0], BACKGROUND_PROPOSALS[1] + 1))
    background = _background_boxes(n_background, object_boxes, scene.width, scene.height, rng)
    all_boxes = np.concatenate([object_boxes, background])
    owner = np.array(owners + [-1] * len(background))
    # Detectors list proposals by score, not grouped by object.
    order = rng.permutation(len(all_boxes))
    all_boxes, owner = all_boxes[order], owner[order]
    n, dim = len(all_boxes), codes.kind.shape[1]

    # How well each proposal covers its object: looser boxes carry more background in their feature
    # and a flatter class distribution.
    is_object = owner >= 0
    owner_boxes = true_boxes[np.where(is_object, owner, 0)]
    quality = np.where(is_object, _rowwise_iou(all_boxes, owner_boxes), 0.0).astype(np.float32)
    kind, colour, size = (
        np.array([values.index(getattr(o, name)) for o in scene.objects])[np.where(is_object, owner, 0)]
        for values, name in ((KINDS, "kind"), (COLOURS, "colour"), (SIZES, "size"))
    )
    object_code = (codes.kind[kind] + codes.colour[colour] + codes.size[size]) / np.float32(np.sqrt(3.0))
    stuff = codes.background[rng.integers(BACKGROUND_CODES, size=n)]
    q = quality[:, None]
    features = q * object_code + (1 - q) * stuff
    # Uniform noise of standard deviation knobs.feature_noise: as good as Gaussian here, and five times
    # cheaper to draw (it is most of the detector's cost at 2048 dimensions).
    uniform = rng.random((n, dim), dtype=np.float32) - np.float32(0.5)
    features += np.float32(knobs.feature_noise * np.sqrt(12.0)) * uniform

    kind_class = np.where(is_object, 1 + kind, 0)
    class_probs = _class_distribution(kind_class, quality, num_classes, rng)
    return Detections(all_boxes.astype(np.float32), features, class_probs, owner)


def _rowwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / union


def _class_distribution(
    kind_class: np.ndarray, quality: np.ndarray, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """A floor over all classes plus a softmax over background, the true kind and two confusions
    (other kinds). Background proposals (kind_class 0) put most mass on class 0."""
    n = len(kind_class)
    # Two distinct kinds other than the true one: offsets 1..K-1 from it, modulo K.
    offsets = np.argsort(rng.random((n, len(KINDS) - 1)), axis=1)[:, :2] + 1
    confusions = 1 + (np.maximum(kind_class, 1)[:, None] - 1 + offsets) % len(KINDS)
    is_object = kind_class > 0
    classes = np.concatenate([np.zeros((n, 1), int), np.maximum(kind_class, 1)[:, None], confusions], axis=1)
    logits = np.stack([
        np.where(is_object, 4.0 * (1 - quality), 4.0),
        np.where(is_object, 2.0 + 4.0 * quality, 0.0),
        np.zeros(n), np.zeros(n),
    ], axis=1) + rng.normal(0.0, 0.5, size=(n, 4))
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights = (1 - CLASS_FLOOR) * weights / weights.sum(axis=1, keepdims=True)
    probs = np.full((n, num_classes), CLASS_FLOOR / num_classes, dtype=np.float32)
    np.add.at(probs, (np.repeat(np.arange(n), 4), classes.ravel()), weights.ravel().astype(np.float32))
    return probs
