"""``interbert evaluate mechanisms``: the two mechanism measurements of issue 28 on a pretrained model.

    interbert evaluate mechanisms --model runs/demo/pretrain/model --captions data/captions.json \\
        --features data/regions --split test --out mechanisms.json

MRM with group vs plain masking at evaluation (how much neighbours leak a masked region's class; the
first caption of each image, unmasked) and ITM on twin pairs vs random pairs (every caption of an image
with a twin: the ``twin_of`` entries ``interbert data synth`` writes). See :mod:`interbert.mechanisms`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from interbert.data.batches import prepare_regions
from interbert.data.captions import read_karpathy_twins
from interbert.data.check import verify_images
from interbert.data.tokenize import encode_caption, load_tokenizer
from interbert.errors import DataError, UsageError
from interbert.loading import load_model, saved_architecture
from interbert.mechanisms import itm_twins, mrm_leakage
from interbert.recipes.common import captions_of_split, check_region_feature_size, feature_store, set_threads
from interbert.retrieval import RegionInput
from interbert.utils.files import atomic_write_text

logger = logging.getLogger(__name__)


def load_pretrained(model_dir: str | Path):
    """The pretraining model of ``model_dir``: both measurements read its pretraining heads (MRM, ITM)."""
    name = saved_architecture(model_dir)
    if name != "InterBertForPreTraining":
        raise UsageError(f"{model_dir} holds an {name}: the mechanism measurements read the MRM and ITM heads of a "
                         "pretraining model (the `model` folder `interbert pretrain` writes)")
    return load_model(model_dir, task="pretraining").eval()


def evaluate_mechanisms(model_dir: str | Path, captions: str | Path, features: str | Path, split: str | None = "test",
                        max_images: int | None = None, max_tokens: int = 36, max_regions: int = 36, seed: int = 0,
                        batch_size: int = 64, device: str = "cpu") -> dict:
    """Both measurements on the images of ``split``; ``itm_twins`` is ``{"skipped": reason}`` when no image of
    the split has a twin (a plain train split)."""
    from interbert.utils.device import checked_device

    started = time.perf_counter()
    target = checked_device(device, "--device")
    model = load_pretrained(model_dir).to(target)
    tokenizer = load_tokenizer(model_dir)
    caps = captions_of_split(captions, split, max_images)
    store = feature_store(features)
    check_region_feature_size(model, store, "evaluate mechanisms", f"the model {model_dir}")
    image_ids = list(dict.fromkeys(c.image_id for c in caps))
    missing = [i for i in image_ids if i not in store]
    if missing:  # a measurement over "the split" must not quietly leave images out
        raise DataError(f"{len(missing)} images of split {split!r} have no features in {store.path} (e.g. {missing[:5]})")
    verify_images(store, image_ids)
    regions = [prepare_regions(store[i], max_regions) for i in image_ids]
    token_ids = [encode_caption(tokenizer, c.text, max_tokens).input_ids for c in caps]
    first_caption = {}
    for c, ids in zip(caps, token_ids):
        first_caption.setdefault(c.image_id, ids)
    result = {"model": str(model_dir), "captions": str(captions), "split": split, "images": len(image_ids),
              "mrm_leakage": mrm_leakage(model, [first_caption[i] for i in image_ids], regions, image_ids, batch_size)}

    column = {image_id: n for n, image_id in enumerate(image_ids)}
    twins = {column[a]: column[b] for a, b in read_karpathy_twins(captions).items() if a in column and b in column}
    if twins:
        images = [RegionInput(r["region_features"], r["region_boxes"]) for r in regions]
        result["itm_twins"] = itm_twins(model, token_ids, [column[c.image_id] for c in caps], images, twins, seed=seed,
                                        pair_batch_size=8 * batch_size)
        result["itm_twins"]["twin_pairs"] = len(twins) // 2
    else:
        reason = f"no image of split {split!r} in {captions} has a twin (twin_of) in the split"
        logger.warning("itm_twins skipped: %s", reason)
        result["itm_twins"] = {"skipped": reason}
    result.update(seed=seed, device=str(target), seconds=round(time.perf_counter() - started, 2))
    return result


def run_cli(args) -> int:
    set_threads(args.threads)
    result = evaluate_mechanisms(args.model, args.captions, args.features, None if args.split == "all" else args.split,
                                 args.max_images, args.max_tokens, args.max_regions, args.seed, args.batch_size,
                                 args.device)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), text + "\n")
    print(text)
    return 0

