"""GLUE-style text classification files (TSV with a header) -> examples -> padded text-only batches.

Known layouts, recognised by their header (or named with ``task=``):

| task | header columns used | label |
|---|---|---|
| ``sst2`` | ``sentence`` | ``label`` 0/1 |
| ``mrpc`` | ``#1 String``, ``#2 String`` | ``Quality`` 0/1 |
| ``qqp`` | ``question1``, ``question2`` | ``is_duplicate`` 0/1 |
| ``qnli`` | ``question``, ``sentence`` | ``label`` entailment / not_entailment |
| ``rte`` | ``sentence1``, ``sentence2`` | ``label`` entailment / not_entailment |

Fields are split on tabs only (MRPC's strings hold unbalanced quotes, so no CSV quoting); a byte-order
mark is ignored. A row with the wrong number of fields, an unknown label or bytes that are not UTF-8 raises
:class:`DataFormatError` naming file and line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from interbert.data.errors import DataFormatError
from interbert.data.text_files import text_lines
from interbert.errors import UsageError


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_a: str
    text_b: str | None
    label: str
    labels: tuple[str, ...]  # label strings in class-index order
    f1: bool  # report F1 of class 1 too (the paraphrase tasks, where classes are unbalanced)


TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("sst2", "sentence", None, "label", ("0", "1"), f1=False),
    "mrpc": GlueTask("mrpc", "#1 String", "#2 String", "Quality", ("0", "1"), f1=True),
    "qqp": GlueTask("qqp", "question1", "question2", "is_duplicate", ("0", "1"), f1=True),
    "qnli": GlueTask("qnli", "question", "sentence", "label", ("entailment", "not_entailment"), f1=False),
    "rte": GlueTask("rte", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), f1=False),
}


@dataclass(frozen=True)
class TextExample:
    text_a: str
    text_b: str | None
    label: int
    source: str  # "file:line"


def sniff_task(header: Sequence[str], path: str | Path = "?") -> GlueTask:
    """The task whose columns the header holds (most specific first: pairs before single sentences)."""
    columns = set(header)
    for task in sorted(TASKS.values(), key=lambda t: t.text_b is None):
        wanted = {task.text_a, task.label} | ({task.text_b} if task.text_b else set())
        if wanted <= columns:
            return task
    raise DataFormatError(path, f"header {list(header)} matches no known task ({', '.join(TASKS)}); give --task", 1)


def read_glue(path: str | Path, task: str | None = None) -> tuple[GlueTask, list[TextExample]]:
    """Read a GLUE TSV; ``task`` names the layout, else the header decides."""
    path = Path(path)
    lines = list(text_lines(path))  # a line that is not UTF-8 is an error naming it
    if not lines or not lines[0][1].strip():
        raise DataFormatError(path, "no header line (empty file?)", 1)
    header = lines[0][1].split("\t")
    if task is None:
        spec = sniff_task(header, path)
    elif task in TASKS:
        spec = TASKS[task]
    else:
        raise UsageError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    columns = [spec.text_a, spec.label] + ([spec.text_b] if spec.text_b else [])
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataFormatError(path, f"header lacks column(s) {missing} of task {spec.name}", 1)
    at = {name: header.index(name) for name in columns}
    label_index = {label: n for n, label in enumerate(spec.labels)}
    examples = []
    for line_no, line in lines[1:]:
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataFormatError(path, f"{len(fields)} tab-separated fields, the header has {len(header)}", line_no)
        label = fields[at[spec.label]].strip()
        if label not in label_index:
            raise DataFormatError(path, f"label {label!r} is not one of {list(spec.labels)}", line_no)
        text_b = fields[at[spec.text_b]].strip() if spec.text_b else None
        examples.append(TextExample(fields[at[spec.text_a]].strip(), text_b, label_index[label], f"{path}:{line_no}"))
    if not examples:
        raise DataFormatError(path, "no examples")
    return spec, examples


def split_examples(examples: Sequence[TextExample], test_fraction: float, seed: int) -> tuple[list, list]:
    """A fixed seeded split into (train, test), e.g. SST-2's labelled dev set when test labels are hidden."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_test = round(test_fraction * len(examples))
    return [examples[i] for i in order[n_test:]], [examples[i] for i in order[:n_test]]


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], f1: bool = False) -> dict[str, float]:
    """Accuracy (and F1 of class 1) in percent."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if len(p) != len(y) or len(y) == 0:
        raise ValueError(f"{len(p)} predictions for {len(y)} labels")
    out = {"accuracy": 100.0 * float((p == y).mean())}
    if f1:
        tp = float(((p == 1) & (y == 1)).sum())
        precision_denominator, recall_denominator = float((p == 1).sum()), float((y == 1).sum())
        out["f1"] = 100.0 * 2 * tp / (precision_denominator + recall_denominator) if tp else 0.0
    return out


class TextClassificationDataset(torch.utils.data.Dataset):
    """``[CLS] a [SEP] (b [SEP])`` per example, truncated to ``max_tokens``; no regions."""

    def __init__(self, examples: Sequence[TextExample], tokenizer, max_tokens: int = 128):
        self.examples, self.tokenizer, self.max_tokens = list(examples), tokenizer, max_tokens

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        e = self.examples[index]
        enc = self.tokenizer(e.text_a, e.text_b, truncation=True, max_length=self.max_tokens)
        return {"input_ids": np.asarray(enc["input_ids"], np.int64), "token_type_ids": np.asarray(enc["token_type_ids"], np.int64),
                "labels": e.label}


def collate_text(examples: Sequence[dict], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad to the batch's longest text."""
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    token_type_ids = torch.zeros_like(input_ids)
    attention_mask = torch.zeros_like(input_ids)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n], token_type_ids[i, :n], attention_mask[i, :n] = torch.from_numpy(e["input_ids"]), torch.from_numpy(e["token_type_ids"]), 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
            "labels": torch.tensor([int(e["labels"]) for e in examples])}
