"""``interbert export onnx``: the command-line side of :mod:`interbert.export_onnx`.

Kept apart so that building the CLI (``interbert --help``) imports neither torch nor the ``[export]`` extra.
"""

from __future__ import annotations


def _cmd_onnx(args) -> int:
    from interbert.extras import require_extra

    require_extra("export", "interbert export onnx")  # before the model is loaded: one line, nothing written
    from interbert.export_onnx import CHECK_BATCH_SIZES, CHECK_LENGTHS, GRAPHS, TOLERANCE, export_onnx

    worst = export_onnx(args.model, args.out)
    for graph in GRAPHS:
        print(f"wrote {args.out}/{graph.file}: {graph.method}({', '.join(graph.inputs)}) -> {graph.output}; "
              f"max |ONNX Runtime - PyTorch| = {worst[graph.name]:.2g}")
    sizes = ", ".join(map(str, CHECK_BATCH_SIZES))
    lengths = ", ".join(f"({t}, {r})" for t, r in CHECK_LENGTHS)
    print(f"checked at batch sizes {sizes} x (tokens, regions) {lengths}; all within {max(worst.values()):.2g} "
          f"(tolerance {TOLERANCE:g}); {args.out}/export.json records it")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a model folder for serving without PyTorch (ONNX)")
    sub = p.add_subparsers(dest="export_format", metavar="<format>", required=True)
    o = sub.add_parser("onnx", help="ONNX graphs of the text tower, the image tower and the ITM scorer, "
                       "checked in ONNX Runtime against PyTorch (needs pip install 'interbert[export]')")
    o.add_argument("--model", required=True, help="a retrieval or pretraining model folder (what `interbert serve` loads)")
    o.add_argument("--out", required=True, help="folder for text.onnx, image.onnx, itm.onnx and export.json")
    o.set_defaults(func=_cmd_onnx)
