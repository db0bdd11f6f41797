"""Question families for generated scenes: all five CLEVR types, plain, relational and multi-hop,
same-attribute and and/or, each written as a CLEVR functional program and answered by executing
it on the scene, in CLEVR's words (its synonyms and the phrasings of its templates).

A family turns (scene, rng) into (text, program) or None when the scene does not admit it.
Which families a scene is asked and how answers are balanced: question_mix.py.
"""
from __future__ import annotations

import random

from .programs import ATTRIBUTES

# Written into each dataset's info: 1 = the first generator (one phrasing per family, eight
# families); 2 = CLEVR's synonyms and phrasings, chained references, same-attribute and and/or;
# 3 = CLEVR's proportions of families and hops (up to three), answers balanced given the words.
QUESTION_LANGUAGE = 3

# CLEVR's own words (its synonyms.json and templates): a model trained on these questions reads
# real CLEVR questions, which say "big", "tiny", "on the left side of", "either ... or", "its".
SIZE_WORDS = {"large": ("large", "big"), "small": ("small", "tiny")}
SHAPE_WORDS = {"cube": ("cube", "block"), "sphere": ("sphere", "ball"), "cylinder": ("cylinder",)}
MATERIAL_WORDS = {"metal": ("metal", "metallic", "shiny"), "rubber": ("rubber", "matte")}
NOUN_WORDS = ("thing", "object")
REL_WORDS = {"left": ("left of", "to the left of", "on the left side of"),
             "right": ("right of", "to the right of", "on the right side of"),
             "front": ("in front of",), "behind": ("behind",)}
# "the same {SAME_WORDS[attr]} as the ..."
SAME_WORDS = {"shape": "shape", "color": "color", "size": "size", "material": "material"}
# Ways to ask for an attribute of "the {x}", CLEVR's query templates.
QUERY_TEXTS = {
    "shape": ("What shape is the {x}?", "What is the shape of the {x}?", "The {x} is what shape?",
              "There is a {x}; what shape is it?", "There is a {x}; what is its shape?"),
    "color": ("What color is the {x}?", "What is the color of the {x}?", "The {x} is what color?",
              "There is a {x}; what color is it?", "There is a {x}; what is its color?"),
    "size": ("What size is the {x}?", "What is the size of the {x}?", "How big is the {x}?",
             "The {x} is what size?", "There is a {x}; how big is it?", "There is a {x}; what size is it?"),
    "material": ("What material is the {x}?", "What is the material of the {x}?", "What is the {x} made of?",
                 "The {x} is made of what material?", "There is a {x}; what is it made of?",
                 "There is a {x}; what material is it?"),
}


def rel_words(rel: str, rng: random.Random) -> str:
    return rng.choice(REL_WORDS[rel])


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
    words = [rng.choice(SIZE_WORDS[desc["size"]])] if "size" in desc else []
    if "color" in desc:
        words.append(desc["color"])
    if "material" in desc:
        words.append(rng.choice(MATERIAL_WORDS[desc["material"]]))
    noun = rng.choice(SHAPE_WORDS[desc["shape"]]) if "shape" in desc else rng.choice(NOUN_WORDS)
    if plural:
        noun = noun + ("es" if noun.endswith("s") else "s")
    return " ".join(words + [noun])


def a(text: str) -> str:
    """'a big cube', 'an object'."""
    return ("an " if text[0] in "aeiou" else "a ") + text


def _fill(template: str, **parts: str) -> str:
    """Fill a template; 'There is a {x}' takes the article that x needs."""
    text = template
    if "There is a {x}" in text:
        text = text.replace("There is a {x}", "There is " + a(parts["x"]))
    return text.format(**parts)


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


def _reference(scene, rng, p: Program, hops: int = 1, exclude=()):
    """One object named so that it is unique: "the red cube" (hops 1) or "the red cube left of the
    ball" (hops 2, CLEVR's chained templates). Adds its nodes to p; (object, node, text) or None."""
    ref = _the(scene, rng, exclude=() if hops > 1 else exclude)
    if ref is None:
        return None
    i, desc = ref
    node, text = p.add("unique", [p.filters(p.add("scene"), desc)]), phrase(desc, rng)
    for _ in range(hops - 1):
        rel = rng.choice(list(REL_WORDS))
        related = scene["relationships"][rel][i]
        if not related:
            return None
        j = rng.choice(related)
        d = unique_desc(scene, j, rng, candidates=related, exclude=exclude)
        if d is None:
            return None
        node = p.add("unique", [p.filters(p.add("relate", [node], [rel]), d)])
        text, i = f"{phrase(d, rng)} {rel_words(rel, rng)} the {text}", j
    return i, node, text


def _hops(rng) -> int:
    """References chained by relations, as CLEVR's zero- to three-hop templates write them (a
    reference of 1 is "the red cube"; the final relate adds one more where a family has one)."""
    x = rng.random()
    return 1 if x < 0.45 else 2 if x < 0.8 else 3


# -- families -------------------------------------------------------------------------------
def count_plain(scene, rng):
    desc = random_desc(rng)
    p = Program()
    p.add("count", [p.filters(p.add("scene"), desc)])
    xs = phrase(desc, rng, True)
    return rng.choice((f"How many {xs} are there?", f"What number of {xs} are there?",
                       f"How many {xs} are visible?")), p.nodes


def _relate(scene, rng, final: str, max_attrs: int):
    """[final](filter(relate(reference))): (program, reference text, relation, filter desc)."""
    p = Program()
    ref = _reference(scene, rng, p, _hops(rng))
    if ref is None:
        return None
    rel, desc = rng.choice(list(REL_WORDS)), random_desc(rng, max_attrs)
    p.add(final, [p.filters(p.add("relate", [ref[1]], [rel]), desc)])
    return p.nodes, ref[2], rel_words(rel, rng), desc


def count_relate(scene, rng):
    made = _relate(scene, rng, "count", 1)
    if made is None:
        return None
    nodes, ref, rel, desc = made
    xs = phrase(desc, rng, True)
    return rng.choice((f"How many {xs} are {rel} the {ref}?", f"What number of {xs} are {rel} the {ref}?",
                       f"How many {xs} are there {rel} the {ref}?",
                       f"There is {a(ref)}; how many {xs} are {rel} it?")), nodes


def exist_plain(scene, rng):
    desc = random_desc(rng, 3)
    p = Program()
    p.add("exist", [p.filters(p.add("scene"), desc)])
    return rng.choice((f"Are there any {phrase(desc, rng, True)}?", f"Is there {a(phrase(desc, rng))}?")), p.nodes


def exist_relate(scene, rng):
    made = _relate(scene, rng, "exist", 2)
    if made is None:
        return None
    nodes, ref, rel, desc = made
    x, xs = phrase(desc, rng), phrase(desc, rng, True)
    return rng.choice((f"Is there {a(x)} {rel} the {ref}?", f"Are there any {xs} {rel} the {ref}?",
                       f"Is there {a(x)} that is {rel} the {ref}?", f"Are there any {xs} that are {rel} the {ref}?",
                       f"There is {a(ref)}; is there {a(x)} {rel} it?",
                       f"There is {a(ref)}; are there any {xs} {rel} it?")), nodes


def query_plain(scene, rng):
    attr = rng.choice(list(ATTRIBUTES))
    p = Program()
    ref = _reference(scene, rng, p, 1, exclude=(attr,))
    if ref is None:
        return None
    p.add(f"query_{attr}", [ref[1]])
    return _fill(rng.choice(QUERY_TEXTS[attr]), x=ref[2]), p.nodes


def query_relate(scene, rng):
    """The object that is <rel> a unique reference, described uniquely among those."""
    p = Program()
    ref = _reference(scene, rng, p, _hops(rng))
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
    t = p.add("unique", [p.filters(p.add("relate", [ref[1]], [rel]), desc)])
    p.add(f"query_{attr}", [t])
    that = rng.choice(("that is ", ""))
    x = f"{phrase(desc, rng)} {that}{rel_words(rel, rng)} the {ref[2]}"
    return _fill(rng.choice(QUERY_TEXTS[attr]), x=x), p.nodes


def _count_side(scene, rng, p: Program):
    """A set to count for compare_numbers: "red cubes" or "red cubes left of the ball"."""
    desc = random_desc(rng, 2)
    if rng.random() < 0.3:
        ref = _reference(scene, rng, p, 1)
        if ref is None:
            return None
        rel = rng.choice(list(REL_WORDS))
        that = rng.choice(("that are ", ""))
        node = p.add("count", [p.filters(p.add("relate", [ref[1]], [rel]), desc)])
        return node, f"{phrase(desc, rng, True)} {that}{rel_words(rel, rng)} the {ref[2]}", desc
    return p.add("count", [p.filters(p.add("scene"), desc)]), phrase(desc, rng, True), desc


def compare_numbers(scene, rng):
    p = Program()
    first, second = _count_side(scene, rng, p), _count_side(scene, rng, p)
    if first is None or second is None or first[1] == second[1]:
        return None
    fn = rng.choice(("greater_than", "less_than", "equal_integer"))
    p.add(fn, [first[0], second[0]])
    pa, pb = first[1], second[1]
    text = rng.choice({
        "greater_than": (f"Are there more {pa} than {pb}?", f"Is the number of {pa} greater than the number of {pb}?"),
        "less_than": (f"Are there fewer {pa} than {pb}?", f"Is the number of {pa} less than the number of {pb}?"),
        "equal_integer": (f"Is the number of {pa} the same as the number of {pb}?",
                          f"Are there the same number of {pa} and {pb}?",
                          f"Are there an equal number of {pa} and {pb}?",
                          f"Is the number of {pa} equal to the number of {pb}?")}[fn])
    return text, p.nodes


def compare_attribute(scene, rng):
    attr = rng.choice(list(ATTRIBUTES))
    p = Program()
    first = _reference(scene, rng, p, _hops(rng), exclude=(attr,))
    if first is None:
        return None
    qa = p.add(f"query_{attr}", [first[1]])
    second = _reference(scene, rng, p, _hops(rng), exclude=(attr,))
    if second is None or first[0] == second[0]:
        return None
    qb = p.add(f"query_{attr}", [second[1]])
    p.add(f"equal_{attr}", [qa, qb])
    x, y, w = first[2], second[2], SAME_WORDS[attr]
    return rng.choice((f"Does the {x} have the same {w} as the {y}?", f"Do the {x} and the {y} have the same {w}?",
                       f"Is the {x} the same {w} as the {y}?", f"Is the {w} of the {x} the same as the {y}?",
                       f"There is {a(x)}; does it have the same {w} as the {y}?",
                       f"There is {a(x)}; is it the same {w} as the {y}?")), p.nodes


def same_relate(scene, rng):
    """CLEVR's same-attribute templates: the other objects sharing an attribute with a reference,
    counted, tested or queried ("How many other things are the same size as the red ball?")."""
    attr = rng.choice(list(ATTRIBUTES))
    p = Program()
    ref = _reference(scene, rng, p, 1 if rng.random() < 0.6 else 2, exclude=(attr,))
    if ref is None:
        return None
    same = p.add(f"same_{attr}", [ref[1]])
    w, y = SAME_WORDS[attr], ref[2]
    x = rng.random()                                   # CLEVR's same-attribute templates: mostly queries
    final = "query" if x < 0.5 else "count" if x < 0.8 else "exist"
    if final == "query":
        others = [j for j in range(len(scene["objects"])) if j != ref[0]
                  and scene["objects"][j][attr] == scene["objects"][ref[0]][attr]]
        if not others:
            return None
        asked = rng.choice([b for b in ATTRIBUTES if b != attr])
        desc = unique_desc(scene, rng.choice(others), rng, candidates=others, exclude=(asked,))
        if desc is None:
            return None
        p.add(f"query_{asked}", [p.add("unique", [p.filters(same, desc)])])
        x = rng.choice((f"{phrase(desc, rng)} that is the same {w} as the {y}",
                        f"other {phrase(desc, rng)} that has the same {w} as the {y}",
                        f"{phrase(desc, rng)} of the same {w} as the {y}"))
        return _fill(rng.choice(QUERY_TEXTS[asked]), x=x), p.nodes
    desc = random_desc(rng, 2) if rng.random() < 0.7 else {}
    p.add(final, [p.filters(same, desc)])
    xs, x = phrase(desc, rng, True), phrase(desc, rng)
    if final == "count":
        texts = [f"How many other {xs} are the same {w} as the {y}?", f"How many other {xs} have the same {w} as the {y}?",
                 f"What number of other {xs} have the same {w} as the {y}?",
                 f"How many {xs} are the same {w} as the {y}?", f"There is {a(y)}; how many other {xs} are the same {w} as it?"]
    else:
        texts = [f"Is there another {x} that has the same {w} as the {y}?", f"Are there any other {xs} that have the same {w} as the {y}?",
                 f"Is there {a(x)} of the same {w} as the {y}?", f"Are there any {xs} of the same {w} as the {y}?",
                 f"There is {a(y)}; is there another {x} of the same {w} as it?"]
        if not desc:
            texts.append(f"Is there anything else that is the same {w} as the {y}?")
    return rng.choice(texts), p.nodes


def logic(scene, rng):
    """CLEVR's and/or templates: "How many things are either big cubes or red things?" (union) and
    "Are there any balls that are both left of the cube and behind the cylinder?" (intersect)."""
    p = Program()
    if rng.random() < 0.5:
        da, db = random_desc(rng, 2), random_desc(rng, 2)
        if da == db:
            return None
        u = p.add("union", [p.filters(p.add("scene"), da), p.filters(p.add("scene"), db)])
        final = rng.choice(("count", "exist"))
        p.add(final, [u])
        xa, xb = phrase(da, rng, True), phrase(db, rng, True)
        if final == "count":
            texts = (f"How many things are either {xa} or {xb}?", f"How many objects are {xa} or {xb}?",
                     f"What number of objects are either {xa} or {xb}?", f"How many {xa} or {xb} are there?")
        else:
            texts = (f"Are there any {xa} or {xb}?", f"Is there either {a(phrase(da, rng))} or {a(phrase(db, rng))}?")
        return rng.choice(texts), p.nodes
    first = _reference(scene, rng, p, 1 if rng.random() < 0.7 else 2)
    second = _reference(scene, rng, p, 1)
    if first is None or second is None or first[0] == second[0]:
        return None
    ra, rb = rng.choice(list(REL_WORDS)), rng.choice(list(REL_WORDS))
    both = p.add("intersect", [p.add("relate", [first[1]], [ra]), p.add("relate", [second[1]], [rb])])
    desc = random_desc(rng, 2) if rng.random() < 0.7 else {}
    final = rng.choice(("count", "exist"))
    p.add(final, [p.filters(both, desc)])
    xs = phrase(desc, rng, True)
    where = f"{rel_words(ra, rng)} the {first[2]} and {rel_words(rb, rng)} the {second[2]}"
    if final == "count":
        texts = (f"How many {xs} are both {where}?", f"What number of {xs} are {where}?", f"How many {xs} are {where}?")
    else:
        texts = (f"Are there any {xs} that are both {where}?", f"Is there {a(phrase(desc, rng))} that is {where}?")
    return rng.choice(texts), p.nodes


FAMILIES = [count_plain, count_relate, exist_plain, exist_relate, query_plain, query_relate,
            compare_numbers, compare_attribute, same_relate, logic]
