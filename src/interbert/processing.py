"""``InterBertProcessor``: the tokenizer and the region preparation in one object, as CLIP's processor is.

    proc = AutoProcessor.from_pretrained(folder)         # after `import interbert`
    proc(text=["a red ball"], regions=store["42"])        # -> input_ids, attention_mask, token_type_ids,
                                                          #    region_features, region_boxes, region_mask

It is a transformers ``ProcessorMixin`` with one sub-processor, the tokenizer: ``save_pretrained`` writes the
tokenizer's files (with ``model_max_length``, the model's positions) and ``processor_config.json``
(``max_regions``), and ``AutoProcessor`` finds it by the folder's ``model_type``. Regions are not images,
so there is no image processor: the region side is :func:`interbert.data.prepare_regions` and
:func:`interbert.data.collate`, the very functions training, evaluation and the search index use, so
the processor's batches are the batches the model was trained and indexed on.

Images become regions only through a detector, ``interbert extract``'s (the ``[extract]`` extra):
``set_detector(weights, **settings)`` loads it, ``proc(images=[...])`` then runs it
(:mod:`interbert.detection.image_detector`) and gives what the store extracted from those files would. The
config records the weights path and settings; loading a folder never reads the weights unless asked.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoProcessor, BatchFeature, ProcessorMixin

from interbert.config import InterBertConfig
from interbert.data import DEFAULT_MAX_REGIONS  # the paper's 36, global region included: what an index uses
from interbert.data.batches import collate, prepare_regions
from interbert.data.features import Regions, read_npz_regions
from interbert.detection import require_torchvision
from interbert.errors import DataError, UsageError, shown
from interbert.extras import MissingExtraError
REGION_KEYS = ("region_features", "region_boxes", "region_mask")
# what transformers' tokenizers hold as model_max_length when nobody set it (VERY_LARGE_INTEGER)
_UNSET_MAX_LENGTH = int(1e20)

RegionsLike = Any  # Regions | str | os.PathLike | Mapping | tuple; see InterBertProcessor.regions_of
ImageLike = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray; see InterBertProcessor.detect


class InterBertProcessor(ProcessorMixin):
    """Text -> WordPiece ids, regions -> the model's region inputs (global region first, 5-d boxes), padded.

    ``max_regions``: regions per image the model sees, the global region included (the detector's first
    ``max_regions - 1``; detectors emit them by confidence). Text is padded to the batch's longest and
    truncated to the tokenizer's ``model_max_length`` (:meth:`for_model` sets it to the model's positions).
    """

    def __init__(self, tokenizer=None, max_regions: int = DEFAULT_MAX_REGIONS, detector: str | None = None,
                 detector_settings: dict | None = None, **kwargs):
        """``detector`` / ``detector_settings`` only record a detector (what ``processor_config.json`` holds):
        nothing is loaded here, since a folder's config is input; :meth:`set_detector` loads one."""
        if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 1:
            raise UsageError(f"max_regions must be a whole number >= 1 (the global region counts), not {shown(max_regions)}")
        if detector is not None and not isinstance(detector, str):
            raise UsageError(f"detector must be the path of detector weights, not {shown(detector)}")
        if detector_settings is not None and not isinstance(detector_settings, dict):
            raise UsageError(f"detector_settings must be a mapping of interbert extract's settings, not {shown(detector_settings)}")
        self.max_regions = max_regions
        self.detector, self.detector_settings = detector, detector_settings
        self._image_detector = None  # the loaded detector (interbert.detection.image_detector.ImageDetector)
        super().__init__(tokenizer, **kwargs)

    @classmethod
    def for_model(cls, tokenizer, config: InterBertConfig, max_regions: int = DEFAULT_MAX_REGIONS) -> "InterBertProcessor":
        """The processor of a model with ``config``: its tokenizer (a copy; ``tokenizer`` is not changed)
        truncates at the model's ``max_position_embeddings``, beyond which the model refuses text."""
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.model_max_length = config.max_position_embeddings
        return cls(tokenizer, max_regions=max_regions)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, detector: str | os.PathLike | bool | None = None,
                        detector_device: str | None = None, **kwargs) -> "InterBertProcessor":
        """As transformers loads a processor. A folder saved before the processor existed has a tokenizer
        without ``model_max_length`` and no ``processor_config.json``: the length is then the folder's
        ``config.json`` ``max_position_embeddings``, so ``truncation=True`` truncates there too.

        A detector the folder names is loaded only when asked (a folder is input, docs/security.md):
        ``detector=True`` loads the weights path it names, ``detector="weights.pth"`` other weights with
        the folder's detector settings; without ``detector`` the path is kept but nothing is read."""
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        config_file = Path(pretrained_model_name_or_path) / "config.json"
        if processor.tokenizer.model_max_length >= _UNSET_MAX_LENGTH and config_file.is_file():
            processor.tokenizer.model_max_length = InterBertConfig.from_pretrained(config_file.parent).max_position_embeddings
        if detector is not None and detector is not False:
            processor._load_named_detector(Path(pretrained_model_name_or_path) / "processor_config.json", detector,
                                           detector_device)
        return processor

    def _load_named_detector(self, config_file: Path, detector: str | os.PathLike | bool, device: str | None) -> None:
        """``from_pretrained``'s ``detector=``: what came from the folder (the settings; with ``True`` the
        weights path too) is named by its ``processor_config.json`` when it cannot be used."""
        if detector is True and self.detector is None:
            raise UsageError(f"{config_file}: names no detector; give detector='weights.pth' (interbert extract's --weights)")
        try:
            self.set_detector(self.detector if detector is True else detector, device=device)
        except MissingExtraError:
            raise
        except (UsageError, DataError) as error:
            if isinstance(error, DataError) and detector is not True:  # the caller's own weights path
                raise
            raise type(error)(f"{config_file}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """transformers' record, without detector keys where there is no detector: the config of a processor
        without one stays what it was before processors took images."""
        record = super().to_dict()
        for key in ("detector", "detector_settings"):
            if record.get(key) is None:
                record.pop(key, None)
        return record

    def set_detector(self, weights: str | os.PathLike, *, device: str | None = None, **settings) -> "InterBertProcessor":
        """Load ``interbert extract``'s detector, so that ``images=`` works: ``weights`` as ``--weights``
        (a torchvision Faster R-CNN state dict, or ``"random"`` for tests), ``settings`` as its flags
        (``min_size=``, ``max_regions=``, ``score_threshold=``, ...; the recorded ones, then the command's
        defaults, where not given). Use those the model's feature store was extracted with: ``images=``
        then gives its entries. ``save_pretrained`` records the path as given and the settings."""
        require_torchvision("InterBertProcessor's detector")
        from interbert.detection.image_detector import SETTING_TYPES, ImageDetector, detector_config

        config = detector_config(weights, {**(self.detector_settings or {}), **settings})
        self._image_detector = ImageDetector(config, device)
        self.detector = str(weights)  # as given: where the weights are is the user's to say, not the folder's
        self.detector_settings = {key: getattr(config, key) for key in SETTING_TYPES}
        return self

    def detect(self, images: ImageLike | Sequence[ImageLike]) -> list[Regions]:
        """The loaded detector's regions of each image (a path, a PIL image, or an H x W x 3 uint8 RGB
        array; or a list of them): the entries a feature store written by ``interbert extract`` holds."""
        if self._image_detector is None:
            if self.detector is not None:
                raise UsageError(f"images= needs the detector, and this processor names one ({self.detector}) but does "
                                 "not load it unless asked: InterBertProcessor.from_pretrained(folder, detector=True), "
                                 "or proc.set_detector(weights)")
            raise UsageError("images= needs a detector: proc.set_detector(weights) with interbert extract's weights "
                             "(docs/extract.md), or give regions= of a feature store")
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise UsageError("images is an empty list: give one image or a list of them")
        return [self._image_detector(item, f"images[{n}]") for n, item in enumerate(items)]

    def __call__(self, text: str | Sequence[str] | None = None, regions: RegionsLike | list[RegionsLike] | None = None,
                 padding: bool | str = True, truncation: bool | str = True, max_length: int | None = None,
                 return_tensors: str = "pt", images: ImageLike | Sequence[ImageLike] | None = None,
                 **tokenizer_kwargs) -> BatchFeature:
        """The model's inputs for ``text`` (a string or a list), ``regions`` (one image or a list; see
        :meth:`regions_of`), or both. With both, row i of the text goes with row i of the regions (pairs,
        as the models' ``forward`` and ``score_pairs`` take them); one caption or one image is repeated to
        the other side's count, so one query is scored against many images in one call. ``images`` instead
        of ``regions``: image files (or PIL images, arrays) through the detector, see :meth:`detect`."""
        if images is not None:
            if regions is not None:
                raise UsageError("give regions=... or images=..., not both")
            regions = self.detect(images)
        if text is None and regions is None:
            raise UsageError("give text=..., regions=..., or both (images=... in place of regions, with a detector)")
        out: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise UsageError(f"text must be a string or a non-empty list of strings, not {shown(text)}")
            encoded = self.tokenizer(texts, padding=padding, truncation=truncation, max_length=max_length,
                                     return_token_type_ids=True, return_tensors=return_tensors, **tokenizer_kwargs)
            out.update(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                       token_type_ids=encoded["token_type_ids"])
        if regions is not None:
            items = regions if isinstance(regions, list) else [regions]
            if not items:
                raise UsageError("regions is an empty list: give one image's regions or a list of them")
            examples = [{**prepare_regions(self.regions_of(item, f"regions[{n}]"), self.max_regions),
                         "image_id": n, "caption_id": None} for n, item in enumerate(items)]
            batch = collate(examples)
            out.update({key: batch[key] for key in REGION_KEYS})
            if return_tensors != "pt":
                out.update({key: out[key].numpy() for key in REGION_KEYS})
        if text is not None and regions is not None:
            out = _paired(out)
        return BatchFeature(out, tensor_type=return_tensors)

    @staticmethod
    def regions_of(item: RegionsLike, where: str = "regions") -> Regions:
        """One image's detector output as :class:`~interbert.data.Regions`, from any of:

        - a ``Regions`` (a feature store's entry: ``open_features(path)[image_id]``);
        - a path to an ``.npz`` with ``features``, ``boxes``, ``image_w``, ``image_h`` (the npz-folder layout);
        - a dict with ``features`` (N x D) and ``boxes``, plus ``image_w`` and ``image_h`` when the boxes are
          N x 4 ``x1 y1 x2 y2`` in pixels;
        - a tuple ``(features, boxes, (width, height))`` with pixel boxes, or ``(features, boxes)`` with
          boxes already N x 5 ``(x1/W, y1/H, x2/W, y2/H, area)``.

        The detector's regions only: the global region is added by :func:`~interbert.data.prepare_regions`.
        A list is a batch of images, a tuple one image's arrays."""
        if isinstance(item, Regions):
            return item
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if path.suffix != ".npz":
                raise UsageError(f"{where}: {path} is not an .npz file; give a feature store's entry "
                                 "(interbert.data.open_features(path)[image_id]) or arrays")
            if not path.is_file():
                raise DataError(f"{path}: no such file ({where})")
            return read_npz_regions(path)
        if isinstance(item, dict):
            missing = [key for key in ("features", "boxes") if key not in item]
            if missing:
                raise UsageError(f"{where}: the dict has no {' or '.join(missing)} (keys: {sorted(map(str, item))})")
            size = (item["image_w"], item["image_h"]) if "image_w" in item and "image_h" in item else None
            return _from_arrays(item["features"], item["boxes"], size, where, item.get("class_probs"))
        if isinstance(item, tuple) and len(item) in (2, 3):
            return _from_arrays(item[0], item[1], item[2] if len(item) == 3 else None, where)
        raise UsageError(f"{where}: cannot read regions from a {type(item).__name__}; give a Regions (a feature "
                         "store's entry), a path to an .npz, a dict of arrays, or (features, boxes[, (width, height)])")


def save_processor(folder: str | Path, tokenizer, config: InterBertConfig, recipe: dict | None = None) -> None:
    """What a recipe writes beside a model: the tokenizer's files (with ``model_max_length``) and
    ``processor_config.json``, whose ``max_regions`` is the run's ``data.max_regions`` when ``recipe`` (the
    run's ``recipe.json`` record) has one: the regions per image the model was trained with."""
    data = ((recipe or {}).get("config") or {}).get("data") or {}
    max_regions = data.get("max_regions") if isinstance(data, dict) else None
    processor = InterBertProcessor.for_model(tokenizer, config, max_regions=max_regions or DEFAULT_MAX_REGIONS)
    processor.save_pretrained(str(folder))


def _from_arrays(features, boxes, size, where: str, class_probs=None) -> Regions:
    """Regions from arrays: pixel boxes with the image size, or 5-d boxes (already divided by the size)."""
    features, boxes = np.asarray(features, dtype=np.float32), np.asarray(boxes, dtype=np.float32)
    if features.ndim != 2:
        raise UsageError(f"{where}: features must be N x D (one row per region), got shape {features.shape}")
    if boxes.ndim != 2 or len(boxes) != len(features) or boxes.shape[1] not in (4, 5):
        raise UsageError(f"{where}: boxes must be N x 4 (pixels, with the image size) or N x 5 (normalised) for "
                         f"{len(features)} regions, got shape {boxes.shape}")
    if boxes.shape[1] == 5:
        if size is not None:
            raise UsageError(f"{where}: 5-d boxes are already divided by the image size; give no size with them")
        corners = boxes[:, :4]
        area = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
        if not np.allclose(area, boxes[:, 4], atol=1e-4):
            raise UsageError(f"{where}: the 5th box column is not the box's area fraction (x2-x1)*(y2-y1); the 5-d form "
                             "is (x1/W, y1/H, x2/W, y2/H, area)")
        # normalised corners are pixel corners of a 1 x 1 image: prepare_regions then recomputes the same 5-d boxes
        return Regions(features, corners, 1, 1, class_probs)
    if size is None:
        raise UsageError(f"{where}: pixel boxes (N x 4) need the image size: give (features, boxes, (width, height)) "
                         "or image_w/image_h")
    try:
        width, height = (float(v) for v in size)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: the image size must be (width, height), not {shown(size)}") from None
    if not (width >= 1 and height >= 1):
        raise UsageError(f"{where}: the image size must be at least 1 x 1 pixels, not {shown(size)}")
    return Regions(features, boxes, width, height, class_probs)


def _paired(out: dict) -> dict:
    """Text and regions with the same number of rows: a side with one row is repeated to the other's count."""
    texts, images = len(out["input_ids"]), len(out["region_features"])
    if texts == images:
        return out
    if 1 not in (texts, images):
        raise UsageError(f"{texts} texts and {images} images: give as many of each (pairs), or one of either side")
    n = max(texts, images)
    keys = ("input_ids", "attention_mask", "token_type_ids") if texts == 1 else REGION_KEYS
    return {**out, **{key: _repeat(out[key], n) for key in keys}}


def _repeat(value, n: int):
    if isinstance(value, np.ndarray):
        return np.repeat(value, n, axis=0)
    return value.expand(n, *value.shape[1:]).contiguous()


# `AutoProcessor.from_pretrained(folder)` of an InterBERT folder (model_type "interbert") gives this class.
AutoProcessor.register(InterBertConfig, InterBertProcessor)

__all__ = ["InterBertProcessor", "DEFAULT_MAX_REGIONS", "save_processor"]
