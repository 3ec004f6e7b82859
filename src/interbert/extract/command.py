"""``interbert extract``: the CLI face of :mod:`interbert.extract.run`.

Kept free of torch/torchvision imports at module level: ``interbert --help`` must work in the main
environment, which has no torchvision (extraction is the optional ``[extract]`` extra).
"""

from __future__ import annotations

import argparse
import sys

# the [extract] extra's hint is the library's (the processor gives it too); importable here as before
from interbert.detection import MISSING_TORCHVISION_HINT, require_torchvision

__all__ = ["MISSING_TORCHVISION_HINT", "register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract",
        help="region features from your own images (Faster R-CNN with local weights) into a feature store",
        description=(
            "Detect regions in every image under IMAGES with a torchvision Faster R-CNN R50-FPN whose "
            "weights come from a local file, and write each image's box-head features (1024-d), class "
            "distributions and boxes (original pixels) into the region store OUT. Restartable: ids "
            "already in OUT are skipped. Good features need trained detector weights."
        ),
    )
    parser.add_argument("images", help="a folder of images (searched recursively) or one image file")
    parser.add_argument("out", help="the region store folder to create or resume")
    parser.add_argument(
        "--weights",
        required=True,
        help="a torchvision detection state dict (.pt/.pth/.safetensors), or 'random' (tests/smoke runs only)",
    )
    parser.add_argument("--detector", default="frcnn-r50-fpn", choices=["frcnn-r50-fpn"])
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier size incl. background (read from --weights; 91 for random)")
    parser.add_argument("--min-regions", type=int, default=10)
    parser.add_argument("--max-regions", type=int, default=36)
    parser.add_argument("--score-threshold", type=float, default=0.2)
    parser.add_argument("--nms-threshold", type=float, default=0.3, help="per-class NMS IoU threshold")
    parser.add_argument("--num-proposals", type=int, default=1000, help="RPN proposals scored per image")
    parser.add_argument("--min-size", type=int, default=800, help="the detector resizes the shorter side to this")
    parser.add_argument("--max-size", type=int, default=1333, help="... keeping the longer side at most this")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    parser.add_argument("--seed", type=int, default=0, help="initialises --weights random")
    parser.add_argument("--tsv", action="store_true",
                        help="also write OUT/features.tsv in the bottom-up-attention layout (+ cls_prob)")
    parser.add_argument("--boxes", default=None, metavar="FILE",
                        help="pool features for given boxes: COCO instance annotations (JSON or JSON lines) "
                             "or VCR metadata JSONs (a file or a folder)")
    parser.add_argument("--shard", default=None, metavar="i/n",
                        help="process every n-th image from the i-th (default: torchrun's RANK/WORLD_SIZE)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_torchvision("interbert extract")
    from interbert.detection.detector import DetectorConfig
    from interbert.extract.images import parse_shard
    from interbert.extract.run import extract_features

    try:
        config = DetectorConfig(
            detector=args.detector,
            weights=args.weights,
            num_classes=args.num_classes,
            seed=args.seed,
            min_size=args.min_size,
            max_size=args.max_size,
            min_regions=args.min_regions,
            max_regions=args.max_regions,
            score_threshold=args.score_threshold,
            nms_threshold=args.nms_threshold,
            num_proposals=args.num_proposals,
        )
        report = extract_features(
            args.images,
            args.out,
            config,
            batch_size=args.batch_size,
            boxes_file=args.boxes,
            tsv=args.tsv,
            shard=parse_shard(args.shard) if args.shard else None,
            device=args.device,
            num_workers=args.num_workers,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as error:  # bad input: say which file, without a traceback
        print(f"interbert extract: error: {error}", file=sys.stderr)
        return 2
    # Non-zero when an image could not be used: the store holds all the others, and a rerun after
    # fixing or removing the listed files extracts only those.
    return 1 if report.failed else 0
