"""Downstream tasks over generated scenes: VCR-format questions and a GLUE-format caption pair task."""

from __future__ import annotations

import numpy as np

from interbert.synthetic.language import Caption, caption_holds, twin_captions
from interbert.synthetic.scenes import COLOURS, RELATIONS, Scene, make_twin, relations_between

# --------------------------------------------------------------------------------------------------
# VCR: questions that need the tagged object, 4 answers, 4 rationales
# --------------------------------------------------------------------------------------------------
# A rationale for a colour names something of that colour, so it justifies the answer by knowledge
# the question did not state; the wrong rationales name things of other colours.
COLOUR_EVIDENCE = {
    "red": ["a", "ripe", "tomato"], "green": ["fresh", "grass"], "blue": ["a", "clear", "sky"],
    "yellow": ["a", "lemon"], "purple": ["a", "bunch", "of", "grapes"], "orange": ["a", "pumpkin"],
    "brown": ["a", "bar", "of", "chocolate"], "gray": ["a", "rain", "cloud"],
}
EDGE_EVIDENCE = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}


def vcr_item(scene: Scene, rng: np.random.Generator, annot_id: str, img_fn: str, metadata_fn: str) -> dict:
    """One VCR-layout question about a scene; object tags index the scene's objects (= metadata boxes)."""
    n = len(scene.objects)
    single_relation = [pair for pair, holding in scene.relation_table.items() if len(holding) == 1]
    if single_relation and rng.random() < 0.5:
        question, answers, rationales = _where_question(scene, single_relation[rng.integers(len(single_relation))])
    else:
        question, answers, rationales = _colour_question(scene, int(rng.integers(n)), rng)
    answer_order, rationale_order = rng.permutation(4), rng.permutation(4)
    return {
        "question": question,
        "answer_choices": [answers[k] for k in answer_order],
        "rationale_choices": [rationales[k] for k in rationale_order],
        "answer_label": int(np.flatnonzero(answer_order == 0)[0]),
        "rationale_label": int(np.flatnonzero(rationale_order == 0)[0]),
        "objects": [o.kind for o in scene.objects],
        "img_fn": img_fn,
        "metadata_fn": metadata_fn,
        "annot_id": annot_id,
        "img_id": f"synth-{scene.image_id}",
        "question_number": 0,
    }


def _colour_question(scene: Scene, t: int, rng: np.random.Generator):
    """'What colour is [t] ?' Wrong answers prefer colours present elsewhere in the scene."""
    colour = scene.objects[t].colour
    present = [o.colour for o in scene.objects if o.colour != colour]
    absent = [c for c in COLOURS if c != colour and c not in present]
    wrong = list(dict.fromkeys(rng.permutation(present).tolist() if present else []))
    wrong = (wrong + rng.permutation(absent).tolist())[:3]
    question = ["What", "colour", "is", [t], "?"]
    answers = [[[t], "is", c, "."] for c in [colour, *wrong]]
    rationales = [[[t], "has", "the", "colour", "of", *COLOUR_EVIDENCE[c], "."] for c in [colour, *wrong]]
    return question, answers, rationales


def _where_question(scene: Scene, pair: tuple[int, int]):
    """'Where is [a] compared to [b] ?' for a pair in exactly one clear relation."""
    a, b = pair
    (true_relation,) = relations_between(scene, a, b)
    relations = [true_relation] + [r for r in RELATIONS if r != true_relation]
    question = ["Where", "is", [a], "compared", "to", [b], "?"]
    answers = [[[a], "is", *r.split(), [b], "."] for r in relations]
    rationales = [[[a], "is", "nearer", "the", EDGE_EVIDENCE[r], "edge", "of", "the", "picture", "than", [b], "."]
                  for r in relations]
    return question, answers, rationales


def vcr_metadata(scene: Scene, rng: np.random.Generator) -> dict:
    """The VCR metadata JSON: one detection per object (x1, y1, x2, y2, score), its class name, size."""
    scores = rng.uniform(0.9, 1.0, size=len(scene.objects))
    return {
        "boxes": [[round(float(v), 2) for v in o.box] + [round(float(s), 4)] for o, s in zip(scene.objects, scores)],
        "names": [o.kind for o in scene.objects],
        "width": scene.width,
        "height": scene.height,
    }


# --------------------------------------------------------------------------------------------------
# GLUE-layout pair task: can the second caption describe the first caption's scene?
# --------------------------------------------------------------------------------------------------
def caption_pairs(
    scene: Scene,
    captions: list[Caption],
    others: list[tuple[Scene, Caption]],
    rng: np.random.Generator,
    lang: str,
) -> list[tuple[int, Caption, Caption]]:
    """Two pairs per scene: (1, caption, another caption of the same scene) and (0, caption, a
    caption false of this scene). The false one is the caption of a colour-swapped twin when one
    can be made (same words, other binding), else a caption of another scene checked to be false.
    Returns (label, first, second); the negative pair is left out in the rare case that neither
    a twin nor 20 draws of other captions gives a false caption."""
    first, second = rng.choice(len(captions), size=2, replace=False)
    pairs = [(1, captions[first], captions[second])]
    negative: Caption | None = None
    twins = make_twin(scene, -1, "colour", rng)
    if twins is not None:
        pair_captions = twin_captions(*twins, rng, lang, count=1)
        if pair_captions is not None:
            negative = pair_captions[1][0]
    for _attempt in range(20 if others else 0):
        if negative is not None:
            break
        other_scene, other_caption = others[rng.integers(len(others))]
        if not caption_holds(other_caption.plan, other_scene, scene):
            negative = other_caption
    if negative is not None:
        pairs.append((0, captions[int(rng.integers(len(captions)))], negative))
    return pairs

