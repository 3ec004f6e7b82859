"""The region detector: torchvision's Faster R-CNN R50-FPN, weights from a local file only.

Two jobs, both on one backbone pass per batch:

- :meth:`RegionDetector.detect` proposes boxes (RPN), scores and regresses them, keeps the top
  regions after per-class NMS within ``[min_regions, max_regions]``, then pools the box head's
  1024-d feature for exactly those final boxes (``box_roi_pool`` + ``box_head``) and reads the class
  distribution off that feature (softmax of ``box_predictor``'s class logits), so feature, class
  distribution and box always describe the same rectangle.
- :meth:`RegionDetector.pool` does the second half for given boxes (RoIAlign on the same backbone).

Boxes go in and come out in original-image pixels (x1, y1, x2, y2); the resize the detector applies
internally (``min_size``/``max_size``) is undone here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

from interbert.data.features import Regions

DETECTORS = ("frcnn-r50-fpn",)
RANDOM_WEIGHTS = "random"
# torchvision's COCO label space (90 categories + background): the class count for random weights.
DEFAULT_NUM_CLASSES = 91
CLASSIFIER_WEIGHT_KEY = "roi_heads.box_predictor.cls_score.weight"


@dataclass(frozen=True)
class DetectorConfig:
    detector: str = "frcnn-r50-fpn"
    weights: str = RANDOM_WEIGHTS  # a path to a torchvision detection state dict, or "random"
    num_classes: int | None = None  # read from the weights file; DEFAULT_NUM_CLASSES for random
    seed: int = 0  # initialises random weights (and nothing else)
    min_size: int = 800  # the detector's resize: shorter side to min_size ...
    max_size: int = 1333  # ... unless the longer side would exceed max_size
    min_regions: int = 10
    max_regions: int = 36
    score_threshold: float = 0.2
    nms_threshold: float = 0.3  # per-class NMS, as the bottom-up-attention extractor
    num_proposals: int = 1000  # RPN boxes scored per image (torchvision's default; fewer is faster)

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown detector {self.detector!r}; choose one of {', '.join(DETECTORS)}")
        if not 0 <= self.min_regions <= self.max_regions or self.max_regions < 1:
            raise ValueError(
                f"need 0 <= min_regions <= max_regions and max_regions >= 1, "
                f"got min_regions={self.min_regions}, max_regions={self.max_regions}"
            )
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must lie in [0, 1], got {self.score_threshold}")
        if self.num_proposals < self.max_regions:
            raise ValueError(f"num_proposals ({self.num_proposals}) must be >= max_regions ({self.max_regions})")
        if not 0.0 < self.nms_threshold <= 1.0:
            raise ValueError(f"nms_threshold must lie in (0, 1], got {self.nms_threshold}")

    @property
    def random_weights(self) -> bool:
        return self.weights == RANDOM_WEIGHTS


@dataclass
class ImageRegions:
    """One image's regions; arrays are numpy float32, boxes in original-image pixels."""

    image_w: int
    image_h: int
    boxes: np.ndarray  # N x 4, x1 y1 x2 y2
    features: np.ndarray  # N x 1024, the box head's output for each box
    class_probs: np.ndarray  # N x num_classes, softmax over the classifier (column 0 = background)
    scores: np.ndarray  # N, detection score (best foreground class) or the given box's score

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    def as_regions(self) -> Regions:
        """What a feature store holds for the image (``interbert extract`` writes this; the processor's
        ``images=`` gives it): the detection score is not stored."""
        return Regions(self.features, self.boxes, self.image_w, self.image_h, self.class_probs)


def image_tensor(pixels: np.ndarray) -> Tensor:
    """H x W x 3 uint8 RGB -> the 3 x H x W float tensor in [0, 1] the detector takes (it normalises itself)."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)


def region_count(num_passing: int, num_candidates: int, min_regions: int, max_regions: int) -> int:
    """How many of the score-sorted candidates to keep.

    All that pass the score threshold, but at least ``min_regions`` (topped up with the best of the
    rest) and at most ``max_regions``; never more than there are candidates.
    """
    return min(max(num_passing, min_regions), max_regions, num_candidates)


def load_detector_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A torchvision detection state dict from ``.pt``/``.pth`` (tensors only) or ``.safetensors``.

    Also accepts the ``{"model": state_dict, ...}`` checkpoints of torchvision's reference training
    scripts. Never unpickles arbitrary objects (``weights_only=True``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detector weights not found: {path} (pass a local file, or 'random')")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # an unpickling error says more than we could
            raise ValueError(
                f"{path}: cannot load as a tensors-only state dict ({error}); save it with "
                f"torch.save(model.state_dict(), path)"
            ) from error
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or CLASSIFIER_WEIGHT_KEY not in state:
        raise ValueError(
            f"{path}: not a torchvision Faster R-CNN state dict (no {CLASSIFIER_WEIGHT_KEY!r} entry)"
        )
    # DistributedDataParallel checkpoints prefix every key with "module."
    return {key.removeprefix("module."): value for key, value in state.items()}


def build_detector(config: DetectorConfig) -> tuple[nn.Module, int]:
    """The detector in eval mode and its class count; nothing is ever downloaded."""
    state = None if config.random_weights else load_detector_state_dict(config.weights)
    if state is not None:
        num_classes = int(state[CLASSIFIER_WEIGHT_KEY].shape[0])
        if config.num_classes is not None and config.num_classes != num_classes:
            raise ValueError(
                f"{config.weights}: the classifier has {num_classes} classes, not {config.num_classes}"
            )
    else:
        num_classes = config.num_classes or DEFAULT_NUM_CLASSES
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(config.seed)
        model = fasterrcnn_resnet50_fpn(
            weights=None,
            weights_backbone=None,
            num_classes=num_classes,
            min_size=config.min_size,
            max_size=config.max_size,
            rpn_pre_nms_top_n_test=max(config.num_proposals, 1000),
            rpn_post_nms_top_n_test=config.num_proposals,
        )
    if state is not None:
        load_weights_into(model, state, source=str(config.weights))
    return model.eval(), num_classes


def load_weights_into(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Strict loading, except BatchNorm's ``num_batches_tracked`` counters.

    Trained torchvision detectors use frozen BatchNorm, whose state dicts have no counters; the
    counters play no part in eval mode, so only they may be missing.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in state
        if key in expected and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        details = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else ""]
        details += mismatched[:5]
        raise ValueError(
            f"{source}: does not fit the frcnn-r50-fpn detector: " + "; ".join(d for d in details if d)
        )
    model.load_state_dict({**expected, **state})


def warn_random_weights(stream=None) -> None:
    stream = sys.stderr if stream is None else stream  # looked up now: tests and wrappers swap it
    banner = "!" * 78
    print(
        f"{banner}\nWARNING: --weights random: the detector is randomly initialised. Its boxes, features\n"
        f"and class distributions carry no meaning; use this for tests and smoke runs only. The\n"
        f"store's metadata records random_weights: true.\n{banner}",
        file=stream,
        flush=True,
    )


class RegionDetector:
    """Wraps the torchvision model; see the module docstring for the two entry points."""

    def __init__(self, model: nn.Module, config: DetectorConfig, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.config = config
        self.device = torch.device(device)

    @property
    def feature_dim(self) -> int:
        return int(self.model.roi_heads.box_head.fc7.out_features)

    def _backbone(self, images: list[Tensor]):
        """Normalise + resize + pad (the model's own transform), then the FPN feature maps."""
        images = [image.to(self.device) for image in images]
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        image_list, _ = self.model.transform(images)
        return image_list, self.model.backbone(image_list.tensors), original_sizes

    def _features_and_class_probs(self, feature_maps, boxes: list[Tensor], image_sizes) -> tuple[Tensor, Tensor]:
        roi_heads = self.model.roi_heads
        pooled = roi_heads.box_roi_pool(feature_maps, boxes, image_sizes)
        features = roi_heads.box_head(pooled)
        class_logits, _ = roi_heads.box_predictor(features)
        return features, F.softmax(class_logits, dim=-1)

    @torch.no_grad()
    def detect(self, images: list[Tensor]) -> list[ImageRegions]:
        """Regions for each image (3 x H x W float tensors in [0, 1])."""
        if not images:
            return []
        image_list, feature_maps, original_sizes = self._backbone(images)
        proposals, _ = self.model.rpn(image_list, feature_maps)
        roi_heads = self.model.roi_heads
        pooled = roi_heads.box_roi_pool(feature_maps, proposals, image_list.image_sizes)
        class_logits, box_regression = roi_heads.box_predictor(roi_heads.box_head(pooled))
        boxes_per_class = roi_heads.box_coder.decode(box_regression, proposals)
        class_probs = F.softmax(class_logits, dim=-1)

        final_boxes, final_scores = [], []
        offsets = np.cumsum([0] + [len(p) for p in proposals])
        for i, image_size in enumerate(image_list.image_sizes):
            span = slice(offsets[i], offsets[i + 1])
            boxes, scores = self._select(boxes_per_class[span], class_probs[span], image_size)
            final_boxes.append(boxes)
            final_scores.append(scores)
        features, probs = self._features_and_class_probs(feature_maps, final_boxes, image_list.image_sizes)
        return self._to_original_pixels(
            final_boxes, features, probs, final_scores, image_list.image_sizes, original_sizes
        )

    def _select(self, boxes_per_class: Tensor, class_probs: Tensor, image_size) -> tuple[Tensor, Tensor]:
        """One image: each proposal becomes one candidate (its best foreground class's regressed box
        and score), per-class NMS removes duplicates, then the top ``region_count`` survive."""
        foreground = class_probs[:, 1:]
        scores, best = foreground.max(dim=1)
        labels = best + 1
        boxes = boxes_per_class[torch.arange(len(labels), device=labels.device), labels]
        boxes = box_ops.clip_boxes_to_image(boxes, image_size)
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, self.config.nms_threshold)  # sorted by score
        boxes, scores = boxes[keep], scores[keep]
        count = region_count(
            int((scores >= self.config.score_threshold).sum()),
            len(scores),
            self.config.min_regions,
            self.config.max_regions,
        )
        return boxes[:count], scores[:count]

    @torch.no_grad()
    def pool(self, images: list[Tensor], boxes: list[np.ndarray], scores: list[np.ndarray]) -> list[ImageRegions]:
        """Features and class distributions for given boxes (original pixels, N_i x 4 each)."""
        if not images:
            return []
        image_list, feature_maps, original_sizes = self._backbone(images)
        resized = [
            resize_boxes(torch.as_tensor(b, dtype=torch.float32, device=self.device).reshape(-1, 4), original, new)
            for b, original, new in zip(boxes, original_sizes, image_list.image_sizes)
        ]
        features, probs = self._features_and_class_probs(feature_maps, resized, image_list.image_sizes)
        given_scores = [torch.as_tensor(s, dtype=torch.float32) for s in scores]
        regions = self._to_original_pixels(
            resized, features, probs, given_scores, image_list.image_sizes, original_sizes
        )
        for image_regions, given in zip(regions, boxes):  # the given boxes exactly, not a resize round trip
            image_regions.boxes = np.asarray(given, dtype=np.float32).reshape(-1, 4)
        return regions

    def _to_original_pixels(self, boxes, features, probs, scores, image_sizes, original_sizes) -> list[ImageRegions]:
        regions = []
        counts = [len(b) for b in boxes]
        for image_boxes, image_features, image_probs, image_scores, size, original in zip(
            boxes, features.split(counts), probs.split(counts), scores, image_sizes, original_sizes
        ):
            # rescaling can overshoot the border by a float ulp: clip again in original pixels
            original_boxes = box_ops.clip_boxes_to_image(resize_boxes(image_boxes, list(size), list(original)), original)
            regions.append(
                ImageRegions(
                    image_w=int(original[1]),
                    image_h=int(original[0]),
                    boxes=original_boxes.float().cpu().numpy(),
                    features=image_features.float().cpu().numpy(),
                    class_probs=image_probs.float().cpu().numpy(),
                    scores=image_scores.float().cpu().numpy(),
                )
            )
        return regions


def default_device() -> str:
    """This process's GPU (``cuda:LOCAL_RANK``: under torchrun each rank its own) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "torchvision": torchvision.__version__}
