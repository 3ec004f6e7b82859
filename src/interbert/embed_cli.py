"""``interbert embed``: the command-line side of :func:`interbert.embedding.embed`.

Kept apart so that building the CLI (``interbert --help``) does not import torch.
"""

from __future__ import annotations

import argparse

from interbert.utils.argtypes import positive_int

TEXT_FORMATS = ("auto", "lines", "karpathy", "coco", "flickr8k", "flickr30k", "jsonl", "lavis")  # embedding.TEXT_FORMATS


def _cmd_embed(args: argparse.Namespace) -> int:
    from interbert.embedding import embed
    from interbert.utils.device import checked_device
    from interbert.utils.logs import SERVICE_FORMAT, setup_cli_logging

    setup_cli_logging(SERVICE_FORMAT, datefmt=None)
    report = embed(args.model, args.out, texts=args.texts, features=args.features, text_format=args.text_format,
                   split=args.split, image_ids=args.image_ids, trust_pickle=args.trust_pickle,
                   output_format=args.format, batch_size=args.batch_size, chunk_size=args.chunk_size,
                   max_regions=args.max_regions, device=str(checked_device(args.device)), progress=True)
    counts = ", ".join(f"{n} {kind}" for kind, n in report.counts.items())
    files = ", ".join(p.name for p in report.files)
    work = (f"{report.chunks_embedded} chunk(s) embedded, {report.chunks_reused} already done"
            if report.chunks_embedded or report.chunks_reused else "already complete")
    print(f"{args.out}: {counts}, {report.embedding_dim}-d ({files}); {work}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="write text and/or image embeddings (.npy + ids, or Parquet) for vector "
                                            "search; re-run to resume")
    p.add_argument("--model", required=True, help="saved InterBERT model folder (config.json, weights, tokenizer)")
    p.add_argument("--out", required=True, help="output folder (new, or one an interrupted run began: it resumes)")
    p.add_argument("--texts", help="texts, one a line, or a captions file (Karpathy, COCO, Flickr30k JSON, a "
                                   "LAVIS/ALBEF annotation list, a Flickr8k token file, JSON lines)")
    p.add_argument("--text-format", choices=TEXT_FORMATS, default="auto",
                   help="how --texts is laid out (default auto: a caption layout if it looks like one, else lines)")
    p.add_argument("--split", help="only the captions --texts puts in this split (e.g. test)")
    p.add_argument("--features", help="feature store of the images (npz folder, TSV, HDF5, LMDB, region store)")
    p.add_argument("--image-ids", metavar="FILE", help="embed only these images of --features (one id a line; "
                                                       "default: every image of the store)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow reading pickled LMDB values or an HDF5 file's *_imgid2idx.pkl (runs code!)")
    p.add_argument("--format", choices=("npy", "parquet"), default="npy",
                   help="npy: KIND.npy + KIND.ids.json (default); parquet: KIND.parquet with id and embedding "
                        "columns (needs pyarrow: pip install 'interbert[parquet]')")
    p.add_argument("--batch-size", type=positive_int, default=64, help="rows per forward (default 64)")
    p.add_argument("--chunk-size", type=positive_int, default=4096,
                   help="rows per resumable chunk written to disk (default 4096; a resumed run must use the same)")
    p.add_argument("--max-regions", type=positive_int,
                   help="regions per image, the global one included (default: the model folder's processor's; "
                        "give an index's max_regions to match its vectors)")
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu (default), cuda, cuda:N, or auto (the GPU if there is one)")
    p.set_defaults(func=_cmd_embed)
