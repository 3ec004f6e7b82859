"""Captions of generated scenes, in English and Chinese, and a checker of what a caption claims.

A caption is first a *plan* (which objects it mentions, with which attributes, and which relation,
count or total it states), then words. The plan is what makes twins work: the twin's caption is the
same plan with the swapped objects exchanged, so both captions use exactly the same words, and
:func:`caption_holds` decides from the plan alone whether a caption is true of a scene.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from interbert.synthetic.scenes import Scene, relation_holds, relations_between

LANGUAGES = ("en", "zh")

EN_PLURAL = {
    "cube": "cubes", "ball": "balls", "cylinder": "cylinders", "cone": "cones", "star": "stars", "ring": "rings",
}
EN_NUMBER = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
# Synonyms are chosen once per caption (never per mention) so that a twin's caption, which may
# describe the swapped objects in the other order, uses the very same words.
EN_SIZE_WORDS = ({"small": "small", "large": "large"}, {"small": "little", "large": "big"})
EN_RELATION_WORDS = (
    {"left of": "left of", "right of": "right of", "above": "above", "below": "below"},
    {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "under"},
)
ZH_KIND = {"cube": "立方体", "ball": "球", "cylinder": "圆柱体", "cone": "圆锥", "star": "星星", "ring": "圆环"}
ZH_COLOUR = {
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色",
    "purple": "紫色", "orange": "橙色", "brown": "棕色", "gray": "灰色",
}
ZH_SIZE = {"small": "小", "large": "大"}
ZH_NUMBER = {1: "一个", 2: "两个", 3: "三个", 4: "四个", 5: "五个"}
ZH_RELATION = ({"left of": "左边", "right of": "右边", "above": "上方", "below": "下方"},
               {"left of": "左边", "right of": "右边", "above": "上面", "below": "下面"})
PUNCTUATION = {",", ":", "、", "：", "，"}

TEMPLATES = ("relation", "list", "count", "total")
TEMPLATE_CUMULATIVE = np.cumsum([0.4, 0.25, 0.15])  # how often each template is drawn (total: the rest)


@dataclass(frozen=True)
class Mention:
    obj: int  # index into scene.objects
    show_size: bool
    show_colour: bool


@dataclass(frozen=True)
class CaptionPlan:
    """What a caption says. `relation` links mentions[0] and mentions[1]; `count_kind` states the
    exact number of objects of that kind; template "total" states the exact number of objects."""

    template: str
    mentions: tuple[Mention, ...]
    relation: str | None = None
    count_kind: str | None = None
    variant: int = 0  # phrasing
    lexicon: int = 0  # synonym set


@dataclass(frozen=True)
class Caption:
    raw: str
    tokens: list[str]
    plan: CaptionPlan


# --------------------------------------------------------------------------------------------------
# What a caption claims, and whether a scene satisfies it
# --------------------------------------------------------------------------------------------------
def caption_holds(plan: CaptionPlan, plan_scene: Scene, scene: Scene) -> bool:
    """Whether the caption written from `plan` on `plan_scene` is true of `scene`.

    Mentions are existential and refer to distinct objects ("a red cube left of a blue ball" holds
    if some red cube is clearly left of some other, blue, ball); counts and totals are exact.
    """
    described = [_described(m, plan_scene) for m in plan.mentions]
    if plan.template == "total" and len(scene.objects) != len(plan_scene.objects):
        return False
    if plan.count_kind is not None:
        wanted = sum(o.kind == plan.count_kind for o in plan_scene.objects)
        if sum(o.kind == plan.count_kind for o in scene.objects) != wanted:
            return False
    candidates = [
        [k for k, o in enumerate(scene.objects) if all(v is None or v == a for v, a in zip(d, o.attributes))]
        for d in described
    ]
    for assignment in itertools.product(*candidates):
        if len(set(assignment)) != len(assignment):
            continue
        if plan.relation is not None:
            a, b = scene.objects[assignment[0]], scene.objects[assignment[1]]
            if not relation_holds(a, b, plan.relation, scene.width, scene.height):
                continue
        return True
    return False


def _described(m: Mention, scene: Scene) -> tuple[str | None, str | None, str]:
    o = scene.objects[m.obj]
    return (o.size if m.show_size else None, o.colour if m.show_colour else None, o.kind)


# --------------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------------
def _random_mention(obj: int, rng: np.random.Generator) -> Mention:
    return Mention(obj, show_size=bool(rng.random() < 0.5), show_colour=bool(rng.random() < 0.85))


def sample_plan(scene: Scene, rng: np.random.Generator) -> CaptionPlan:
    """A random true caption plan for a scene: a relation, a list, a count or the full inventory."""
    n = len(scene.objects)
    kind_counts = {k: sum(o.kind == k for o in scene.objects) for k in {o.kind for o in scene.objects}}
    countable = sorted(k for k, c in kind_counts.items() if c >= 2)
    related = [pair for pair, holding in scene.relation_table.items() if holding]
    variant, lexicon = int(rng.integers(3)), int(rng.integers(2))
    template = TEMPLATES[int(np.searchsorted(TEMPLATE_CUMULATIVE, rng.random(), side="right"))]
    if template == "relation" and related:
        i, j = related[rng.integers(len(related))]
        holding = relations_between(scene, i, j)
        relation = holding[rng.integers(len(holding))]
        mentions = (_random_mention(i, rng), _random_mention(j, rng))
        return CaptionPlan("relation", mentions, relation, None, variant, lexicon)
    if template == "count" and countable:
        kind = countable[rng.integers(len(countable))]
        others = [k for k, o in enumerate(scene.objects) if o.kind != kind]
        extra = (_random_mention(others[rng.integers(len(others))], rng),) if others and rng.random() < 0.7 else ()
        return CaptionPlan("count", extra, None, kind, variant, lexicon)
    if template == "total":
        order = sorted(range(n), key=lambda k: scene.objects[k].centre[0])
        return CaptionPlan("total", tuple(_random_mention(k, rng) for k in order), None, None, variant, lexicon)
    k = int(rng.integers(2, min(n, 3) + 1))
    chosen = rng.permutation(n)[:k]
    return CaptionPlan("list", tuple(_random_mention(int(c), rng) for c in chosen), None, None, variant, lexicon)


def sample_twin_plan(scene: Scene, rng: np.random.Generator) -> CaptionPlan:
    """A caption plan for one of two twins that mentions both swapped objects alike.

    Both swapped objects are described with the same attributes (the colour always, for a colour
    swap), so the twin's version of the caption (see :func:`twin_plan`) has the same bag of words.
    """
    i, j = scene.twin_pair
    a, b = scene.objects[i], scene.objects[j]
    show_colour = True if scene.twin_mode == "colour" else bool(rng.random() < 0.7)
    show_size = True if a.kind == b.kind else bool(rng.random() < 0.5)
    mi, mj = Mention(i, show_size, show_colour), Mention(j, show_size, show_colour)
    variant, lexicon = int(rng.integers(3)), int(rng.integers(2))
    relations = relations_between(scene, i, j)
    choices = ["relation"] if scene.twin_mode == "position" else ["relation", "list", "total", "count"]
    if not relations:
        choices = [c for c in choices if c != "relation"]
    template = choices[rng.integers(len(choices))]
    if template == "relation":
        first, second = (mi, mj) if rng.random() < 0.5 else (mj, mi)
        holding = relations_between(scene, first.obj, second.obj)
        relation = holding[rng.integers(len(holding))]
        return CaptionPlan("relation", (first, second), relation, None, variant, lexicon)
    others = [k for k in range(len(scene.objects)) if k not in (i, j)]
    if template == "total":
        mentions = {i: mi, j: mj} | {k: _random_mention(k, rng) for k in others}
        order = sorted(mentions, key=lambda k: scene.objects[k].centre[0])
        return CaptionPlan("total", tuple(mentions[k] for k in order), None, None, variant, lexicon)
    if template == "count":
        kinds = sorted({scene.objects[k].kind for k in others} - {a.kind, b.kind})
        countable = [k for k in kinds if sum(o.kind == k for o in scene.objects) >= 2]
        if countable:
            pair = (mi, mj) if rng.random() < 0.5 else (mj, mi)
            return CaptionPlan("count", pair, None, countable[rng.integers(len(countable))], variant, lexicon)
    mentions = [mi, mj] + ([_random_mention(int(rng.choice(others)), rng)] if others and rng.random() < 0.4 else [])
    order = rng.permutation(len(mentions))
    return CaptionPlan("list", tuple(mentions[k] for k in order), None, None, variant, lexicon)


def twin_plan(plan: CaptionPlan, scene: Scene) -> CaptionPlan:
    """The same caption for the other twin: after a position swap the two objects trade places in
    the sentence (so "X left of Y" becomes "Y left of X", the same words); after a colour swap the
    sentence keeps its objects and the colour words trade places."""
    if scene.twin_mode != "position":
        return plan
    i, j = scene.twin_pair
    swap = {i: j, j: i}
    return replace(plan, mentions=tuple(replace(m, obj=swap.get(m.obj, m.obj)) for m in plan.mentions))


# --------------------------------------------------------------------------------------------------
# Words
# --------------------------------------------------------------------------------------------------
def render(plan: CaptionPlan, scene: Scene, lang: str) -> Caption:
    if lang == "en":
        pieces = _render_en(plan, scene)
        text = " ".join(pieces).replace(" ,", ",").replace(" :", ":")
        raw = text[0].upper() + text[1:] + "."
    elif lang == "zh":
        pieces = _render_zh(plan, scene)
        raw = "".join(pieces) + "。"
    else:
        raise ValueError(f"unknown caption language {lang!r}; expected one of {LANGUAGES}")
    tokens = [p for p in pieces if p not in PUNCTUATION]
    return Caption(raw, tokens, plan)


def _join_list(items: list[list[str]], comma: str, conjunction: str) -> list[str]:
    out: list[str] = []
    for k, item in enumerate(items):
        if k > 0:
            out.append(conjunction if k == len(items) - 1 else comma)
        out.extend(item)
    return out


def _en_noun_phrase(m: Mention, scene: Scene, lexicon: int) -> list[str]:
    o = scene.objects[m.obj]
    words = ([EN_SIZE_WORDS[lexicon][o.size]] if m.show_size else []) + ([o.colour] if m.show_colour else []) + [o.kind]
    return ["an" if words[0][0] in "aeiou" else "a"] + words


def _render_en(plan: CaptionPlan, scene: Scene) -> list[str]:
    nps = [_en_noun_phrase(m, scene, plan.lexicon) for m in plan.mentions]
    if plan.template == "relation":
        relation = EN_RELATION_WORDS[plan.lexicon][plan.relation].split()
        lead = ([], ["there", "is"], [])[plan.variant]
        verb = ([], [], ["is"])[plan.variant]
        return lead + nps[0] + verb + relation + nps[1]
    if plan.template == "count":
        n = sum(o.kind == plan.count_kind for o in scene.objects)
        counted = [EN_NUMBER[n], EN_PLURAL[plan.count_kind]]
        lead = ([], ["there", "are"], ["a", "picture", "of"])[plan.variant]
        return lead + _join_list([counted, *nps], ",", "and")
    if plan.template == "total":
        lead = [EN_NUMBER[len(scene.objects)], "objects", ":"]
        lead = (lead, ["there", "are"] + lead, ["a", "scene", "with"] + lead)[plan.variant]
        return lead + _join_list(nps, ",", "and")
    lead = ([], ["a", "picture", "of"], ["there", "is"])[plan.variant]
    return lead + _join_list(nps, ",", "and")


def _zh_noun_phrase(m: Mention, scene: Scene, variant: int, quantifier: bool = True) -> list[str]:
    o = scene.objects[m.obj]
    words = ["一个"] if quantifier else []
    if m.show_colour:
        words += [ZH_COLOUR[o.colour]] + (["的"] if variant != 1 else [])
    return words + ([ZH_SIZE[o.size]] if m.show_size else []) + [ZH_KIND[o.kind]]


def _render_zh(plan: CaptionPlan, scene: Scene) -> list[str]:
    v = plan.variant
    if plan.template == "relation":
        where = ZH_RELATION[plan.lexicon][plan.relation]
        a = _zh_noun_phrase(plan.mentions[0], scene, v)
        if v == 1:  # "一个蓝色小球的左边有一个红色的大立方体"
            return _zh_noun_phrase(plan.mentions[1], scene, v, quantifier=False) + ["的", where, "有"] + a
        b = _zh_noun_phrase(plan.mentions[1], scene, v)
        return (["图中"] if v == 2 else []) + a + ["在"] + b + ["的", where]
    nps = [_zh_noun_phrase(m, scene, v) for m in plan.mentions]
    if plan.template == "count":
        n = sum(o.kind == plan.count_kind for o in scene.objects)
        return (["图中", "有"] if v else []) + _join_list([[ZH_NUMBER[n], ZH_KIND[plan.count_kind]], *nps], "、", "和")
    if plan.template == "total":
        return ["图中", "一共", "有", ZH_NUMBER[len(scene.objects)], "物体", "："] + _join_list(nps, "、", "和")
    return (["图中", "有"] if v else []) + _join_list(nps, "、", "和")


# --------------------------------------------------------------------------------------------------
# Five captions per image
# --------------------------------------------------------------------------------------------------
def scene_captions(scene: Scene, rng: np.random.Generator, lang: str, count: int = 5) -> list[Caption]:
    """`count` distinct true captions (distinct when the scene allows; a two-object scene has few)."""
    captions: list[Caption] = []
    for _attempt in range(count * 20):
        caption = render(sample_plan(scene, rng), scene, lang)
        if caption.raw not in {c.raw for c in captions}:
            captions.append(caption)
            if len(captions) == count:
                return captions
    while len(captions) < count:
        captions.append(render(sample_plan(scene, rng), scene, lang))
    return captions


def twin_captions(scene: Scene, twin: Scene, rng: np.random.Generator, lang: str, count: int = 5):
    """Captions for a pair of twins: caption k of the scene and caption k of the twin have the same
    bag of words, each is true of its own twin and false of the other. None if the scene cannot
    give `count` such captions (the caller then draws another pair)."""
    ours: list[Caption] = []
    theirs: list[Caption] = []
    for _attempt in range(count * 20):
        plan = sample_twin_plan(scene, rng)
        other = twin_plan(plan, scene)
        if not caption_holds(plan, scene, scene) or caption_holds(plan, scene, twin):
            continue
        if not caption_holds(other, twin, twin) or caption_holds(other, twin, scene):
            continue
        caption = render(plan, scene, lang)
        if caption.raw in {c.raw for c in ours} and _attempt < count * 10:
            continue
        ours.append(caption)
        theirs.append(render(other, twin, lang))
        if len(ours) == count:
            return ours, theirs
    return None


def label_words(scene: Scene, lang: str) -> list[str]:
    """Every word a perfect but unbound detector could name for the scene's objects (all synonyms,
    plurals and number words): the 'image' side of the bag-of-words baseline."""
    words: list[str] = []
    for o in scene.objects:
        if lang == "en":
            words += [EN_SIZE_WORDS[0][o.size], EN_SIZE_WORDS[1][o.size], o.colour, o.kind, EN_PLURAL[o.kind]]
        else:
            words += [ZH_SIZE[o.size], ZH_COLOUR[o.colour], ZH_KIND[o.kind]]
    return words
