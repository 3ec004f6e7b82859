"""Caption-based image retrieval evaluation (Flickr30K protocol) and its two-stage variant.

    interbert evaluate retrieval --model runs/finetune/model --captions dataset.json --features feats.tsv --split test
    interbert evaluate retrieval --model runs/pretrain/model ... --zero-shot         # the pretraining ITM head
    interbert evaluate retrieval --model runs/finetune/model ... --two-stage 20       # + embedding candidates
    interbert evaluate retrieval --model runs/finetune/model ... --compile default    # static shapes, compiled

Every caption of the split is scored against every image of the split (5,000 x 1,000 on Flickr30K
test). Reported: image retrieval R@1/5/10, median and mean rank; text retrieval R@K (UNITER's); the
number of pair forwards and the wall time. Ties count against the model.

    torchrun --nproc_per_node 2 -m interbert.cli evaluate retrieval --model ... --out results.json

Under torchrun each rank scores its share of the pairs (every world_size-th caption; see
:func:`interbert.retrieval.score_pairs`), the ranks' scores are gathered, and rank 0 computes the metrics and
writes the JSON: the same JSON as one process, plus each rank's pair count in ``pair_forwards_per_rank``.

``--compile default`` scores every pair batch on bucketed shapes through ``torch.compile``
(:mod:`interbert.static_scoring`): the same scores to float rounding, and ``shapes`` in the JSON counts the
graphs compiled. Off by default: whether it pays is benchmarks/eval_cost.py's to say.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch.distributed as dist

from interbert.data.batches import prepare_regions
from interbert.data.check import verify_images
from interbert.data.tokenize import encode_caption, load_tokenizer
from interbert.errors import DataError, UsageError
from interbert.evaluate import image_retrieval_ranks, retrieval_metrics, write_rank_histogram
from interbert.loading import load_model
from interbert.modeling import InterBertForPreTraining
from interbert.recipes.common import captions_of_split, check_region_feature_size, feature_store, set_threads
from interbert.retrieval import RegionInput, score_pairs, two_stage_scores
from interbert.utils.files import atomic_write_text

logger = logging.getLogger(__name__)


def load_scoring_model(model_dir: str | Path, zero_shot: bool):
    """The fine-tuned retrieval head, or with ``zero_shot`` the ITM head of a pretrained model. The flag
    must say which the folder holds: a table of results must not call one the other."""
    model = load_model(model_dir, task="scoring").eval()
    pretrained = isinstance(model, InterBertForPreTraining)
    if zero_shot and not pretrained:
        raise UsageError(
            f"{model_dir} holds an {type(model).__name__}: --zero-shot scores with the pretraining ITM head of a "
            "model that was never fine-tuned for retrieval (an InterBertForPreTraining folder)"
        )
    if pretrained and not zero_shot:
        raise UsageError(f"{model_dir} holds an InterBertForPreTraining, not a fine-tuned retrieval model; "
                         "use --zero-shot to score with its ITM head")
    return model


def prepare_split(captions, store, tokenizer, max_tokens: int, max_regions: int):
    """Token ids per caption, prepared regions per image, and each caption's image column."""
    image_ids = list(dict.fromkeys(c.image_id for c in captions))
    missing = [i for i in image_ids if i not in store]
    if missing:  # every caption is ranked against every image: an image without features cannot be skipped
        raise DataError(f"{len(missing)} evaluated images have no features in {store.path} (e.g. {missing[:5]})")
    verify_images(store, image_ids)  # NaN would turn into ranks silently
    column = {image_id: n for n, image_id in enumerate(image_ids)}
    token_ids = [encode_caption(tokenizer, c.text, max_tokens).input_ids for c in captions]
    images = []
    for image_id in image_ids:
        r = prepare_regions(store[image_id], max_regions)
        images.append(RegionInput(r["region_features"], r["region_boxes"]))
    index = np.array([column[c.image_id] for c in captions])
    return token_ids, images, index, image_ids


def evaluate_retrieval(
    model_dir: str | Path,
    captions: str | Path,
    features: str | Path,
    split: str | None = "test",
    zero_shot: bool = False,
    two_stage: int | None = None,
    max_images: int | None = None,
    max_tokens: int = 36,
    max_regions: int = 36,
    pair_batch_size: int = 512,
    histogram: str | Path | None = None,
    progress: bool = True,
    device: str = "cpu",
    compile: str = "off",
) -> dict:
    """Score the split with the full protocol (and ``two_stage``), on ``device`` (``auto``: the GPU if any).
    Under torchrun the pairs are shared out over the ranks (every rank must call this alike)."""
    from interbert.train import init_distributed
    from interbert.utils.device import checked_device

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = checked_device(device, "--device", local_rank)
    context = init_distributed(target)  # one process: a no-op
    shard = (context.rank, context.world_size) if context.enabled else None
    model = load_scoring_model(model_dir, zero_shot).to(target)
    tokenizer = load_tokenizer(model_dir)
    caps = captions_of_split(captions, split, max_images)
    store = feature_store(features)
    check_region_feature_size(model, store, "evaluate retrieval", f"the model {model_dir}")
    token_ids, images, index, image_ids = prepare_split(caps, store, tokenizer, max_tokens, max_regions)
    logger.info("scoring %d captions x %d images (%d pairs)", len(caps), len(images), len(caps) * len(images))
    full = score_pairs(model, token_ids, images, pair_batch_size=pair_batch_size, progress=progress, shard=shard,
                       compile=compile)
    result = {
        "model": str(model_dir), "split": split, "zero_shot": zero_shot,
        **retrieval_metrics(full.scores, index),
        "pair_forwards": full.pair_forwards, "seconds": round(full.seconds, 2), "device": str(target),
        "pair_forwards_per_rank": full.pair_forwards_by_rank, "compile": compile,
        **({"shapes": full.shapes} if full.shapes is not None else {}),
    }
    ranks = {"full protocol": image_retrieval_ranks(full.scores, index)}
    if two_stage:
        staged = two_stage_scores(model, token_ids, images, k=two_stage, pair_batch_size=pair_batch_size,
                                  progress=progress, shard=shard, compile=compile)
        result["two_stage"] = {
            "k": int(two_stage), **retrieval_metrics(staged.scores, index),
            "pair_forwards": staged.pair_forwards, "seconds": round(staged.seconds, 2),
            "pair_forwards_per_rank": staged.pair_forwards_by_rank,
            "fewer_pair_forwards": round(full.pair_forwards / max(1, staged.pair_forwards), 2),
        }
        ranks[f"two-stage (top {two_stage})"] = image_retrieval_ranks(staged.scores, index)
    if histogram and context.is_main:
        write_rank_histogram(ranks, histogram, num_candidates=len(images))
        result["histogram"] = str(histogram)
    return result


def run_cli(args) -> int:
    set_threads(args.threads)
    out = Path(args.out) if args.out else None
    histogram = args.histogram or (out.with_suffix(".png") if out else None)
    result = evaluate_retrieval(
        args.model, args.captions, args.features, split=None if args.split == "all" else args.split, zero_shot=args.zero_shot,
        two_stage=args.two_stage, max_images=args.max_images, max_tokens=args.max_tokens,
        max_regions=args.max_regions, pair_batch_size=args.pair_batch_size, histogram=histogram, device=args.device,
        compile=args.compile,
    )
    if not _is_main_process():  # every rank has the result; rank 0 writes and prints it
        _leave_process_group()
        return 0
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")
    print(text)
    _leave_process_group()
    return 0


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _leave_process_group() -> None:
    """Under torchrun: wait for every rank (rank 0's file is complete when the command ends), then leave."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
