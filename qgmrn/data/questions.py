"""Question families for generated scenes: all five CLEVR types, plain, relational and multi-hop,
each written as a CLEVR functional program and answered by executing it on the scene.

A family turns (scene, rng) into (text, program) or None when the scene does not admit it.
Answers are balanced within each family by rejection (see AnswerBalancer).
"""
from __future__ import annotations

import random
from collections import Counter

from .programs import ATTRIBUTES, ProgramError, execute

SHAPE_WORDS = {"cube": ("cube", "block"), "sphere": ("sphere", "ball"), "cylinder": ("cylinder",)}
MATERIAL_WORDS = {"metal": ("metal", "metallic", "shiny"), "rubber": ("rubber", "matte")}
NOUN_WORDS = ("thing", "object")
REL_WORDS = {"left": "left of", "right": "right of", "front": "in front of", "behind": "behind"}


class Program:
    """Builds a CLEVR program (list of nodes) and returns node indices."""

    def __init__(self):
        self.nodes: list[dict] = []

    def add(self, function: str, inputs=(), values=()) -> int:
        self.nodes.append({"inputs": list(inputs), "function": function, "value_inputs": list(values)})
        return len(self.nodes) - 1

    def filters(self, src: int, desc: dict) -> int:
        for attr in ("size", "color", "material", "shape"):
            if attr in desc:
                src = self.add(f"filter_{attr}", [src], [desc[attr]])
        return src


def phrase(desc: dict, rng: random.Random, plural: bool = False) -> str:
    words = [desc[a] for a in ("size", "color") if a in desc]
    if "material" in desc:
        words.append(rng.choice(MATERIAL_WORDS[desc["material"]]))
    noun = rng.choice(SHAPE_WORDS[desc["shape"]]) if "shape" in desc else rng.choice(NOUN_WORDS)
    if plural:
        noun = noun + ("es" if noun.endswith("s") else "s")
    return " ".join(words + [noun])


def random_desc(rng: random.Random, max_attrs: int = 2) -> dict:
    attrs = rng.sample(list(ATTRIBUTES), rng.randint(1, max_attrs))
    return {a: rng.choice(ATTRIBUTES[a]) for a in attrs}


def unique_desc(scene: dict, i: int, rng: random.Random, candidates=None, exclude=()) -> dict | None:
    """A short description that picks out object i alone among `candidates` (default: all)."""
    objs = scene["objects"]
    pool = range(len(objs)) if candidates is None else candidates
    attrs = [a for a in ("shape", "color", "size", "material") if a not in exclude]
    rng.shuffle(attrs)
    for k in range(1, len(attrs) + 1):
        desc = {a: objs[i][a] for a in attrs[:k]}
        if [j for j in pool if all(objs[j][a] == v for a, v in desc.items())] == [i]:
            return desc
    return None


def _the(scene, rng, exclude=()):
    """Choose an object and a unique description of it: (index, desc) or None."""
    i = rng.randrange(len(scene["objects"]))
    desc = unique_desc(scene, i, rng, exclude=exclude)
    return None if desc is None else (i, desc)


# -- families -------------------------------------------------------------------------------
def count_plain(scene, rng):
    desc = random_desc(rng)
    p = Program()
    p.add("count", [p.filters(p.add("scene"), desc)])
    return f"How many {phrase(desc, rng, True)} are there?", p.nodes


def _relate(scene, rng, final: str, max_attrs: int):
    """[final](filter(relate(unique(reference)))): (program, reference desc, relation, filter desc)."""
    ref = _the(scene, rng)
    if ref is None:
        return None
    rel, desc = rng.choice(list(REL_WORDS)), random_desc(rng, max_attrs)
    p = Program()
    u = p.add("unique", [p.filters(p.add("scene"), ref[1])])
    p.add(final, [p.filters(p.add("relate", [u], [rel]), desc)])
    return p.nodes, ref[1], rel, desc


def count_relate(scene, rng):
    made = _relate(scene, rng, "count", 1)
    if made is None:
        return None
    nodes, ref, rel, desc = made
    return f"How many {phrase(desc, rng, True)} are {REL_WORDS[rel]} the {phrase(ref, rng)}?", nodes


def exist_plain(scene, rng):
    desc = random_desc(rng, 3)
    p = Program()
    p.add("exist", [p.filters(p.add("scene"), desc)])
    return f"Are there any {phrase(desc, rng, True)}?", p.nodes


def exist_relate(scene, rng):
    made = _relate(scene, rng, "exist", 2)
    if made is None:
        return None
    nodes, ref, rel, desc = made
    return f"Is there a {phrase(desc, rng)} {REL_WORDS[rel]} the {phrase(ref, rng)}?", nodes


def query_plain(scene, rng):
    attr = rng.choice(list(ATTRIBUTES))
    ref = _the(scene, rng, exclude=(attr,))
    if ref is None:
        return None
    p = Program()
    p.add(f"query_{attr}", [p.add("unique", [p.filters(p.add("scene"), ref[1])])])
    text = (f"What is the {attr} of the {phrase(ref[1], rng)}?" if rng.random() < 0.5 else
            f"What {attr} is the {phrase(ref[1], rng)}?" if attr != "shape" else
            f"What shape is the {phrase(ref[1], rng)}?")
    return text, p.nodes


def query_relate(scene, rng):
    """Two hops: the object that is <rel> the unique reference, described uniquely among those."""
    ref = _the(scene, rng)
    if ref is None:
        return None
    rel, attr = rng.choice(list(REL_WORDS)), rng.choice(list(ATTRIBUTES))
    related = scene["relationships"][rel][ref[0]]
    if not related:
        return None
    target = rng.choice(related)
    desc = unique_desc(scene, target, rng, candidates=related, exclude=(attr,))
    if desc is None:
        return None
    p = Program()
    u = p.add("unique", [p.filters(p.add("scene"), ref[1])])
    t = p.add("unique", [p.filters(p.add("relate", [u], [rel]), desc)])
    p.add(f"query_{attr}", [t])
    return (f"What {attr} is the {phrase(desc, rng)} that is {REL_WORDS[rel]} the "
            f"{phrase(ref[1], rng)}?"), p.nodes


def compare_numbers(scene, rng):
    a, b = random_desc(rng, 1), random_desc(rng, 1)
    if a == b:
        return None
    fn = rng.choice(("greater_than", "less_than", "equal_integer"))
    p = Program()
    ca = p.add("count", [p.filters(p.add("scene"), a)])
    cb = p.add("count", [p.filters(p.add("scene"), b)])
    p.add(fn, [ca, cb])
    pa, pb = phrase(a, rng, True), phrase(b, rng, True)
    text = {"greater_than": f"Are there more {pa} than {pb}?",
            "less_than": f"Are there fewer {pa} than {pb}?",
            "equal_integer": f"Is the number of {pa} the same as the number of {pb}?"}[fn]
    return text, p.nodes


def compare_attribute(scene, rng):
    attr = rng.choice(list(ATTRIBUTES))
    first, second = _the(scene, rng, exclude=(attr,)), _the(scene, rng, exclude=(attr,))
    if first is None or second is None or first[0] == second[0]:
        return None
    p = Program()
    qa = p.add(f"query_{attr}", [p.add("unique", [p.filters(p.add("scene"), first[1])])])
    qb = p.add(f"query_{attr}", [p.add("unique", [p.filters(p.add("scene"), second[1])])])
    p.add(f"equal_{attr}", [qa, qb])
    verb = {"shape": "have the same shape as", "color": "have the same color as",
            "size": "have the same size as", "material": "have the same material as"}[attr]
    return f"Does the {phrase(first[1], rng)} {verb} the {phrase(second[1], rng)}?", p.nodes


FAMILIES = [count_plain, count_relate, exist_plain, exist_relate, query_plain, query_relate,
            compare_numbers, compare_attribute]


class AnswerBalancer:
    """Rejection sampling towards uniform answers within each family and final function: an
    answer already seen more often than the average is accepted with probability
    (average / count)^2."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.counts: dict[tuple, Counter] = {}

    def accept(self, key: tuple, answer: str) -> bool:
        c = self.counts.setdefault(key, Counter())
        mean = (sum(c.values()) + 1) / max(1, len(c))
        if c[answer] + 1 > 1.1 * mean and self.rng.random() > (mean / (c[answer] + 1)) ** 2:
            return False
        c[answer] += 1
        return True


def make_questions(scene: dict, n: int, rng: random.Random, balancer: AnswerBalancer,
                   first_family: int = 0, tries: int = 30) -> list[dict]:
    """n questions for a scene, families taken in turn from first_family so all appear."""
    out = []
    fam = first_family
    while len(out) < n:
        family = fam % len(FAMILIES)
        fam += 1
        for _ in range(tries):
            made = FAMILIES[family](scene, rng)
            if made is None:
                continue
            text, program = made
            try:
                answer = execute(program, scene)
            except ProgramError:
                continue
            if balancer.accept((family, program[-1]["function"]), answer):
                out.append({"question": text, "program": program, "answer": answer,
                            "question_family_index": family})
                break
        if fam - first_family > 4 * n:      # a scene that admits too few questions
            break
    return out
