"""CLI commands of the data layer: ``interbert data convert|check`` and ``interbert tokenizer train``.

Other modules add actions to the ``data`` group through :func:`get_data_subparsers` (it creates the
group on first use, so the order of ``COMMAND_MODULES`` does not matter)::

    from interbert.data.cli import get_data_subparsers

    def register(subparsers):
        p = get_data_subparsers(subparsers).add_parser("synth", help="...")
        p.set_defaults(func=_cmd_synth)
"""

from __future__ import annotations

import argparse
import sys


def get_data_subparsers(subparsers) -> argparse._SubParsersAction:
    """The sub-parsers of ``interbert data``, created on the first call for this top-level parser."""
    group = getattr(subparsers, "_interbert_data_group", None)
    if group is None:
        p = subparsers.add_parser("data", help="convert, check (and generate) captions and region features")
        group = p.add_subparsers(dest="data_command", metavar="<action>", required=True)
        subparsers._interbert_data_group = group
    return group


def _cmd_convert(args) -> int:
    from interbert.data.features import convert_features, nonfinite_message, open_features, source_fingerprint

    source = open_features(args.src, format=args.format, trust_pickle=args.trust_pickle)
    nonfinite: list[str] = []
    written, skipped = convert_features(source, args.dst, feature_dtype=args.dtype, chunk_size=args.chunk_size,
                                        fingerprint=source_fingerprint(args.src), nonfinite=nonfinite)
    print(f"{args.dst}: wrote {written} images, {skipped} already there (resumed); {len(source)} in {args.src}")
    if nonfinite:
        print(f"warning: {nonfinite_message(args.dst, nonfinite)}", file=sys.stderr)
    return 0


def _cmd_check(args) -> int:
    from interbert.data.check import check_files
    from interbert.errors import UsageError

    if args.config:
        if args.captions or args.vcr or args.features:
            raise UsageError("data check: give --config, or --captions/--vcr with --features, not both")
        return _check_sources(args.config, args.trust_pickle)
    if not args.features or (not args.captions and not args.vcr):
        raise UsageError("data check: give --captions FILE and/or --vcr FILE with --features, or --config RUN.yaml")
    report = check_files(args.features, captions=args.captions, captions_format=args.captions_format, vcr=args.vcr,
                         images_root=args.images_root, trust_pickle=args.trust_pickle, progress=True)
    print("\n".join(report.lines()))
    return 1 if report.errors else 0


def _check_sources(config: str, trust_pickle: bool) -> int:
    """Check every source a training config names (``data.sources``, or ``data.captions`` + ``data.features``),
    each as ``--captions``/``--features`` would, then whether their features can train one model together."""
    from interbert.data.check import check_files
    from interbert.data.features import open_features
    from interbert.data.sources import SourceStore, sources_from_config
    from interbert.errors import DataError
    from interbert.utils import load_config
    from interbert.utils.config_files import ConfigError

    data = load_config(config).get("data")
    if not isinstance(data, dict):
        raise ConfigError(f"{config}: no 'data' section to check")
    sources = sources_from_config(data, config)
    failed = False
    for source in sources:
        if source.name is not None:
            print(f"== source {source.name!r} ==")
        report = check_files(source.features, captions=source.captions, trust_pickle=trust_pickle, progress=True)
        print("\n".join(report.lines()))
        failed |= bool(report.errors)
    if len(sources) > 1 and not failed:  # each can train alone; can one model train on all of them?
        try:
            SourceStore({s.name: open_features(s.features, trust_pickle=trust_pickle) for s in sources})
        except DataError as e:
            print(f"ERROR: {e}\nFAILED: the sources cannot train together")
            failed = True
        else:
            print(f"OK: the {len(sources)} sources can train together (image ids become <name>/<id>)")
    return 1 if failed else 0


def _cmd_tokenizer_train(args) -> int:
    from interbert.data.captions import read_captions
    from interbert.data.tokenize import train_wordpiece

    texts = [c.text for c in read_captions(args.captions, format=args.format)]
    tokenizer = train_wordpiece(texts, args.out, vocab_size=args.vocab_size, lowercase=not args.cased,
                                min_frequency=args.min_frequency)
    print(f"{args.out}: WordPiece vocabulary of {len(tokenizer)} tokens from {len(texts)} captions")
    return 0


def register(subparsers) -> None:
    data = get_data_subparsers(subparsers)
    c = data.add_parser("convert", help="write any feature store (TSV, npz folder, HDF5, LMDB) into the project's store")
    c.add_argument("src", help="TSV file, folder of .npz, .h5 file, ViLBERT LMDB, or a project store")
    c.add_argument("dst", help="output folder (an existing partial store is resumed)")
    c.add_argument("--format", default="auto", choices=["auto", "tsv", "npz", "hdf5", "lmdb", "store"])
    c.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="feature dtype on disk")
    c.add_argument("--chunk-size", type=int, default=1000, help="images per chunk (the unit of resumption)")
    c.add_argument("--trust-pickle", action="store_true", help="allow reading pickled LMDB values or an HDF5 file's *_imgid2idx.pkl (runs code!)")
    c.set_defaults(func=_cmd_convert)

    k = data.add_parser("check", help="report whether captions (or VCR lines) and features can train together",
                        description="Reads every entry and every image once and lists every problem with its place "
                                    "(the first 20 of each kind, and the count). Exit 1 when the data cannot train, "
                                    "0 when it can (warnings allowed).")
    k.add_argument("--captions", help="Karpathy JSON, COCO JSON, Flickr8k token file, Flickr30k JSON, a LAVIS/ALBEF "
                                        "annotation list or JSON lines")
    k.add_argument("--captions-format", default="auto")
    k.add_argument("--vcr", help="a VCR jsonl file (its images are looked up in --features by the stem of img_fn)")
    k.add_argument("--images-root", help="the folder VCR's metadata_fn is relative to (default: as `finetune vcr`)")
    k.add_argument("--features", help="the feature store (TSV, npz folder, HDF5, LMDB, project store)")
    k.add_argument("--config", help="a training config: check each of its data.sources (or its data.captions + "
                                    "data.features) and whether they can train together")
    k.add_argument("--trust-pickle", action="store_true")
    k.set_defaults(func=_cmd_check)

    t = subparsers.add_parser("tokenizer", help="tokenizer tools")
    tsub = t.add_subparsers(dest="tokenizer_command", metavar="<action>", required=True)
    tt = tsub.add_parser("train", help="train a WordPiece vocabulary from captions into a BERT-style folder")
    tt.add_argument("captions")
    tt.add_argument("out")
    tt.add_argument("--vocab-size", type=int, default=30522)
    tt.add_argument("--min-frequency", type=int, default=2)
    tt.add_argument("--cased", action="store_true", help="keep case (default: lower-case, as bert-base-uncased)")
    tt.add_argument("--format", default="auto", help="caption format (default: sniffed)")
    tt.set_defaults(func=_cmd_tokenizer_train)


if __name__ == "__main__":  # pragma: no cover
    from interbert.cli import main

    sys.exit(main(["data", *sys.argv[1:]]))
