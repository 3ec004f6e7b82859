"""``interbert convert bert|official``: the command-line side of :mod:`interbert.convert`.

Kept apart so that building the CLI (``interbert --help``) does not import torch and transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

PRESET_NAMES = ["base", "small", "tiny"]  # interbert.config.PRESETS; a test keeps the two in step


# --------------------------------------------------------------------------------------------------
# CLI: interbert convert bert|official
# --------------------------------------------------------------------------------------------------
def _cmd_bert(args) -> int:
    from interbert.convert import from_bert
    from interbert.utils.hub_cache import local_pretrained

    bert_dir = local_pretrained(args.bert_dir)  # a folder, or a name in the local Hugging Face cache
    model = from_bert(bert_dir, args.preset, **_split_layers(args))
    model.save_pretrained(args.out_dir)
    _copy_tokenizer(bert_dir, Path(args.out_dir))
    c = model.config
    print(
        f"wrote {args.out_dir}: text path from {args.bert_dir} "
        f"({c.num_single_stream_layers} single-stream + {c.num_text_stream_layers} text-stream layers, "
        f"hidden {c.hidden_size}), image stream {c.num_image_stream_layers} layers; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters"
    )
    return 0


def _split_layers(args) -> dict:
    out = {}
    if args.single_stream_layers is not None:
        out["num_single_stream_layers"] = args.single_stream_layers
    if args.text_stream_layers is not None:
        out["num_text_stream_layers"] = args.text_stream_layers
    return out


def _copy_tokenizer(src: Path, dst: Path) -> None:
    import shutil

    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def _cmd_official(args) -> int:
    from interbert.convert import from_official, load_state_dict

    original = json.loads(Path(args.config).read_text())
    model = from_official(load_state_dict(args.checkpoint), original)
    model.save_pretrained(args.out_dir)
    print(f"wrote {args.out_dir} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert checkpoints (BERT -> InterBERT, original code -> ours)")
    sub = p.add_subparsers(dest="convert_command", metavar="<source>", required=True)
    b = sub.add_parser("bert", help="initialise InterBERT's text path from a local BERT checkpoint folder")
    b.add_argument("bert_dir", help="folder with config.json and model.safetensors/pytorch_model.bin, or a Hub "
                   "name (bert-base-uncased) in the local Hugging Face cache")
    b.add_argument("out_dir")
    b.add_argument("--preset", default="base", choices=PRESET_NAMES, help="image-side sizes (default: base)")
    b.add_argument("--single-stream-layers", type=int, help="BERT layers used as the single stream (default: half)")
    b.add_argument("--text-stream-layers", type=int, help="BERT layers used as the text stream (default: the rest)")
    b.set_defaults(func=_cmd_bert)
    o = sub.add_parser("official", help="convert a checkpoint saved by the authors' code")
    o.add_argument("checkpoint", help=".bin/.pt (loaded weights-only), .npz or .safetensors")
    o.add_argument("out_dir")
    o.add_argument("--config", required=True, help="the original code's config JSON (bert_base_6layer_interbert.json)")
    o.set_defaults(func=_cmd_official)
