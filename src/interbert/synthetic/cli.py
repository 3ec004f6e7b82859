"""``interbert data synth OUT``: write the generated benchmark (see :mod:`interbert.synthetic`)."""

from __future__ import annotations

import sys
import time

from interbert.data.cli import get_data_subparsers
from interbert.utils.argtypes import positive_int


def _cmd_synth(args) -> int:
    from interbert.synthetic.benchmark import generate

    started = time.perf_counter()
    try:
        manifest = generate(
            args.out, images=args.images, lang=args.lang, seed=args.seed, fmt=args.format,
            feature_dim=args.feature_dim, num_classes=args.num_classes, val_images=args.val_images,
            test_images=args.test_images, render_images=not args.no_images, workers=args.workers,
        )
    except ValueError as error:  # bad settings: say which, without a traceback
        print(f"interbert data synth: error: {error}", file=sys.stderr)
        return 2
    splits, baseline = manifest["splits"], manifest["baseline_bag_of_words"]
    megabytes = sum(manifest["bytes"].values()) / 1e6
    print(f"{args.out}: {splits['train']} train / {splits['val']} val / {splits['test']} test images "
          f"({splits['test_twin_pairs']} twin pairs), {megabytes:.0f} MB in {time.perf_counter() - started:.1f} s")
    print(f"bag-of-words baseline: R@1 {100 * baseline['R@1']:.1f}%, twin R@1 {100 * baseline['twin_R@1']:.1f}% "
          f"(ties against; {100 * baseline['twin_R@1_coin']:.1f}% with coin flips); see {args.out}/README.md")
    return 0


def register(subparsers) -> None:
    p = get_data_subparsers(subparsers).add_parser(
        "synth", help="generate the built-in benchmark (scenes, simulated detector features, captions, VCR, GLUE)",
        description="Generate scenes of coloured objects with a *simulated* detector's region features, "
                    "Karpathy-format captions (the test split made of twin pairs), VCR questions and a GLUE "
                    "pair task. The same seed always writes the same bytes.",
    )
    p.add_argument("out", help="output folder")
    p.add_argument("--images", type=positive_int, default=1000, help="number of scenes (default: 1000)")
    p.add_argument("--lang", choices=["en", "zh"], default="en", help="caption language (default: en)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["tsv", "npz", "store"], default="tsv",
                   help="region feature layout: bottom-up TSV (default), npz folder, or interbert's store")
    p.add_argument("--feature-dim", type=positive_int, default=2048, help="region feature size (default: 2048)")
    p.add_argument("--num-classes", type=positive_int, default=1601,
                   help="detector classes incl. background (default: 1601, as Visual Genome)")
    p.add_argument("--val-images", type=int, help="default: 10%% of --images")
    p.add_argument("--test-images", type=int, help="default: 10%% of --images (whole twin pairs)")
    p.add_argument("--no-images", action="store_true", help="skip the PNG pictures (faster; the web page needs them)")
    p.add_argument("--workers", type=positive_int, help="processes (default: CPU count; never changes the output)")
    p.set_defaults(func=_cmd_synth)
