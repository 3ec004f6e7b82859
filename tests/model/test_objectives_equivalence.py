"""Every pretraining variant gives the losses, outputs and gradients recorded from main before the
objectives became modules (issue 25).

Each case is one model config (itm_inputs x itm_negatives x mrm_target x msm_pairs x ITC off / on through
projections / on through the pooled outputs, plus fusion "sum") run on one kind of batch: a joint step of
the original, a masked step and a matching step of ``task_sampling=alternate`` (a data-level switch: it
decides which labels a batch carries), a batch with no matched pair, a single pair, nothing masked,
``full_logits``, and inference without labels. Training mode with dropout on and a fixed seed: the passes
must also draw their random numbers in the same order. For each case the file holds every output field
(shape, sum and sum of absolute values), every loss, the names of the parameters left without a gradient,
and the gradients of the total loss: sum and norm of a few named parameters, and a fingerprint of all of
them (each gradient's dot product with a fixed random tensor seeded by the parameter's name).

Re-record (only when a change of the numbers is intended, and say why in the commit):
    PYTHONPATH=src python tests/model/test_objectives_equivalence.py --record
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_modeling import C, D, V, small_config  # noqa: E402

from interbert.modeling import InterBertForPreTraining  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "objectives_reference.json"
# the parameter and state_dict names, shapes and order of InterBertForPreTraining: saved folders (and the
# optimizer states of a run, indexed by parameter order) load only while these stay as they are
PARAMETER_NAMES = REFERENCE.parent / "pretraining_parameter_names.json"
RTOL = 1e-6  # fp32 on the CPU, one thread: the same operations in the same order give the same bits

# (name, config overrides): every value of every variant switch, crossed
_ITC = {"itc_off": dict(embedding_size=8, itc_loss_weight=0.0),
        "itc_proj": dict(embedding_size=8, itc_loss_weight=0.5),
        "itc_pooled": dict(embedding_size=0, itc_loss_weight=0.5)}
CONFIGS = {
    f"{inputs}-{negatives}-{target}-{pairs}-{itc}": dict(
        itm_inputs=inputs, itm_negatives=negatives, mrm_target=target, msm_pairs=pairs, **_ITC[itc])
    for inputs, negatives, target, pairs, itc in itertools.product(
        ("masked", "clean"), ("data", "in_batch"), ("classes", "features"), ("all", "matched"), _ITC)
}
CONFIGS["fusion_sum"] = dict(fusion="sum", itm_inputs="clean", embedding_size=8, itc_loss_weight=0.5)
# weights other than 1 so that the total checks the weighting too
WEIGHTS = dict(msm_loss_weight=1.0, mrm_loss_weight=0.7, itm_loss_weight=1.3)

NAMED_GRADS = (
    "interbert.embeddings.word_embeddings.weight",
    "interbert.region_embeddings.feature_projection.weight",
    "interbert.single_stream.0.query.weight",
    "interbert.text_stream.0.ffn_out.weight",
    "interbert.image_stream.1.ffn_out.weight",
    "interbert.text_pooler.dense.weight",
    "interbert.image_pooler.dense.weight",
    "interbert.text_projection.weight",
    "msm_transform.dense.weight",
    "msm_bias",
    "mrm_transform.dense.weight",
    "mrm_class_decoder.weight",
    "mrm_feature_decoder.weight",
    "itm_classifier.weight",
)
OUTPUT_FIELDS = ("loss", "msm_loss", "mrm_loss", "itm_loss", "itc_loss", "itm_labels", "msm_logits",
                 "mrm_class_logits", "mrm_feature_predictions", "itm_logits", "text_sequence", "image_sequence",
                 "text_pooled", "image_pooled")


def _base(b: int, seed: int) -> dict:
    """A padded batch of ``b`` pairs: captions of 4..9 tokens, 3..6 regions, one pair of captions of the
    same picture (image_index), padded positions never masked."""
    g = torch.Generator().manual_seed(seed)
    t, r = 9, 6
    text_len = torch.tensor([9, 4, 7, 5, 9, 6])[:b]
    region_len = torch.tensor([6, 3, 4, 6, 5, 6])[:b]
    keep_t = torch.arange(t) < text_len[:, None]
    keep_r = torch.arange(r) < region_len[:, None]
    ids = torch.randint(4, V, (b, t), generator=g) * keep_t
    ids[:, 0] = 2
    features = torch.randn(b, r, D, generator=g) * keep_r[..., None]
    boxes = torch.rand(b, r, 5, generator=g)
    text_masked = (torch.rand(b, t, generator=g) < 0.35) & keep_t
    text_masked[:, 0] = False
    text_masked[:, 1] |= True  # every caption has a masked token
    region_masked = (torch.rand(b, r, generator=g) < 0.35) & keep_r
    region_masked[:, 0] = False
    region_masked[:, 1] = True
    return dict(
        clean=dict(input_ids=ids, attention_mask=keep_t.long(), region_features=features, region_boxes=boxes,
                   region_mask=keep_r.long()),
        masked_ids=ids.masked_fill(text_masked, 3),
        masked_features=features.masked_fill(region_masked[..., None], 0.0),
        msm_labels=torch.where(text_masked, ids, -100),
        mrm_mask=region_masked,
        mrm_class_targets=torch.softmax(torch.randn(b, r, C, generator=g), -1),
        image_index=torch.tensor([0, 0, 1, 2, 3, 4])[:b],
    )


def batch_for(kind: str, config: dict) -> tuple[dict, bool]:
    """``(inputs, train)``: the batch of ``kind`` as the data pipeline makes it for ``config``."""
    in_batch = config.get("itm_negatives") == "in_batch"
    features_target = config.get("mrm_target") == "features"
    b = 1 if kind == "single" else 6
    parts = _base(b, seed=7)
    clean = parts["clean"]
    itm = torch.ones(b, dtype=torch.long) if in_batch else torch.tensor([1, 0, 1, 0, 1, 1])[:b]
    if kind == "no_matched":
        itm = torch.zeros(b, dtype=torch.long)  # in_batch refuses it: the refusal is recorded too
    masked = {**clean, "input_ids": parts["masked_ids"], "region_features": parts["masked_features"],
              "msm_labels": parts["msm_labels"], "mrm_mask": parts["mrm_mask"]}
    targets = {"mrm_feature_targets": clean["region_features"]}
    if not features_target:  # class targets, and the clean features when something reads them
        targets = {"mrm_class_targets": parts["mrm_class_targets"],
                   **(targets if kind != "joint_no_features" else {})}
    if kind == "matching_step":
        return {**clean, "itm_labels": itm, "image_index": parts["image_index"]}, True
    if kind == "masked_step":  # no ITM labels; feature targets only where MRM regresses them
        return {**masked, **{k: v for k, v in targets.items() if k != "mrm_feature_targets" or features_target}}, True
    if kind == "inference":
        return dict(clean), False
    out = {**masked, **targets, "itm_labels": itm, "image_index": parts["image_index"]}
    if kind == "nothing_masked":
        out["msm_labels"] = torch.full_like(out["msm_labels"], -100)
        out["mrm_mask"] = torch.zeros_like(out["mrm_mask"])
    if kind == "full_logits":
        out["full_logits"] = True
    return out, True


KINDS = ("joint", "joint_no_features", "masked_step", "matching_step", "no_matched", "single", "nothing_masked",
         "full_logits", "inference")


def _stats(t) -> list | None:
    if t is None:
        return None
    t = t.detach().double()
    return [list(t.shape), float(t.sum()), float(t.abs().sum())]


def _probe(name: str, shape) -> torch.Tensor:
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rounded(value):
    """9 significant digits: enough for a 1e-6 comparison, and a smaller file."""
    if isinstance(value, float):
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def run_case(config_name: str, kind: str) -> dict:
    """One forward/backward of the case, summarised."""
    config = CONFIGS[config_name]
    torch.manual_seed(0)
    model = InterBertForPreTraining(small_config(**config, **WEIGHTS))
    with torch.no_grad():  # ITM logits O(1-10), not O(1e-3): its gradients are then not rounding noise
        model.itm_classifier.weight.normal_(0.0, 30.0)
    inputs, train = batch_for(kind, config)
    model.train(train)
    torch.manual_seed(1)
    try:
        out = model(**inputs)
    except ValueError as error:
        return {"error": str(error)}
    record = {"outputs": [_stats(getattr(out, name)) for name in OUTPUT_FIELDS]}  # in OUTPUT_FIELDS' order
    if out.loss is None:
        return record
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    record["no_grad"] = sorted(n for n, _ in model.named_parameters() if n not in grads)
    record["grads"] = [[float(grads[n].double().sum()), float(grads[n].double().norm())] if n in grads else None
                       for n in NAMED_GRADS]  # in NAMED_GRADS' order
    record["grad_fingerprint"] = float(sum((g.double() * _probe(n, g.shape)).sum() for n, g in grads.items()))
    record["grad_norm"] = float(torch.stack([g.double().norm() for g in grads.values()]).norm())
    return record


def parameter_names() -> dict:
    names = {}
    for target in ("classes", "features"):
        model = InterBertForPreTraining(small_config(mrm_target=target, embedding_size=8))
        names[target] = {"parameters": [[n, list(p.shape)] for n, p in model.named_parameters()],
                         "state_dict": [[n, list(t.shape)] for n, t in model.state_dict().items()]}
    return names


def record_reference() -> None:
    PARAMETER_NAMES.write_text(json.dumps(parameter_names()))
    with _one_thread():
        cases = {f"{c}/{k}": _rounded(run_case(c, k)) for c in CONFIGS for k in KINDS}
    REFERENCE.parent.mkdir(exist_ok=True)
    lines = [f"{json.dumps(name)}: {json.dumps(case, sort_keys=True, separators=(',', ':'))}" for name, case in cases.items()]
    REFERENCE.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one case a line: a diff names the cases
    print(f"recorded {len(cases)} cases in {REFERENCE}")


class _one_thread:
    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _close(got, want, scale: float, where: str) -> None:
    if want is None or isinstance(want, str):
        assert got == want, where
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, scale, f"{where}[{i}]")
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: {sorted(got)} != {sorted(want)}"
        for k in want:
            _close(got[k], want[k], scale, f"{where}.{k}")
    elif isinstance(want, int):  # a shape
        assert got == want, where
    else:  # a float: relative, or relative to the case's scale where it is a sum that cancels to ~0
        assert math.isclose(got, want, rel_tol=RTOL, abs_tol=RTOL * scale), f"{where}: {got!r} != {want!r}"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


def test_the_reference_covers_every_case(reference):
    assert set(reference) == {f"{c}/{k}" for c in CONFIGS for k in KINDS}
    # the cases exercise what they are meant to: every loss somewhere, refusals, and steps without a loss
    outputs = [dict(zip(OUTPUT_FIELDS, case["outputs"])) for case in reference.values() if "outputs" in case]
    for name in ("msm_loss", "mrm_loss", "itm_loss", "itc_loss"):
        assert sum(o[name] is not None for o in outputs) > 20, name
    assert sum("error" in case for case in reference.values()) >= 24  # in_batch with a mismatched pair


def test_parameter_names_shapes_and_order_are_the_recorded_ones():
    assert parameter_names() == json.loads(PARAMETER_NAMES.read_text())


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_losses_outputs_and_gradients_equal_the_recorded_ones(config_name, reference):
    for kind in KINDS:
        want = reference[f"{config_name}/{kind}"]
        got = run_case(config_name, kind)
        scale = max([1.0, want.get("grad_norm", 0.0)] + [abs(v[2]) for v in want.get("outputs", []) if v])
        # a sum over many elements may cancel to ~0: compare it relative to the largest value of the case
        _close(got, want, scale * 1e-3, f"{config_name}/{kind}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    record_reference()
