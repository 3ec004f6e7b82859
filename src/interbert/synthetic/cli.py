"""``interbert data synth OUT``: write the generated benchmark (see :mod:`interbert.synthetic`)."""

from __future__ import annotations

import argparse
import time

from interbert.data.cli import get_data_subparsers
from interbert.errors import UsageError
from interbert.utils.argtypes import positive_int


def proposal_counts(text: str) -> tuple[int, int]:
    """``N`` or ``MIN-MAX`` (argparse type of --proposals-per-object; the range is checked with the other
    settings, so every bad knob value reads alike)."""
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX (whole numbers), got {text!r}") from None


def _cmd_synth(args) -> int:
    from interbert.synthetic.benchmark import generate

    started = time.perf_counter()
    try:
        manifest = generate(
            args.out, images=args.images, lang=args.lang, seed=args.seed, fmt=args.format,
            feature_dim=args.feature_dim, num_classes=args.num_classes, val_images=args.val_images,
            test_images=args.test_images, render_images=not args.no_images, workers=args.workers,
            proposals_per_object=args.proposals_per_object, group_iou=args.group_iou,
            feature_noise=args.feature_noise, twin_share=args.twin_share,
        )
    except ValueError as error:  # bad settings: the CLI prints the one `error:` line naming the setting, exit 2
        raise UsageError(f"data synth: {error}") from error
    splits, baseline = manifest["splits"], manifest["baseline_bag_of_words"]
    megabytes = sum(manifest["bytes"].values()) / 1e6
    train_twins = f" ({splits['train_twin_pairs']} twin pairs)" if splits["train_twin_pairs"] else ""
    print(f"{args.out}: {splits['train']} train{train_twins} / {splits['val']} val / {splits['test']} test images "
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
    knobs = p.add_argument_group(
        "knobs (issue 28)", "how much overlapping proposals leak a masked region, and how many training images have "
        "a near-duplicate; recorded in synth.json. At the defaults the output is byte for byte the same as without them")
    knobs.add_argument("--proposals-per-object", type=proposal_counts, default=(3, 4), metavar="N|MIN-MAX",
                       help="jittered proposals per object, drawn uniformly in MIN-MAX (default: 3-4; 1: nothing to leak)")
    knobs.add_argument("--group-iou", type=float, default=0.5,
                       help="least IoU of two proposals of one object; the jitter follows it (default: 0.5; at least 0.1; below "
                            "the masking threshold 0.4 an object's proposals leak even under group masking)")
    knobs.add_argument("--feature-noise", type=float, default=0.5,
                       help="standard deviation of the noise on every region feature (default: 0.5; codes have 1)")
    knobs.add_argument("--twin-share", type=float, default=0.0,
                       help="share of the train images that come as twin pairs like the test split's (default: 0)")
    p.set_defaults(func=_cmd_synth)
