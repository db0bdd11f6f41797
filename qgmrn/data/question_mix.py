"""How a scene's questions are chosen: families in about CLEVR's proportions (FAMILY_WEIGHTS,
spread by SCHEDULE) and answers balanced given the words (AnswerBalancer), so a model cannot read
the answer from how many attributes a question names (issue 48; docs/data.md)."""
from __future__ import annotations

import random
from collections import Counter

from .programs import ProgramError, execute, named_attributes
from .questions import FAMILIES


# How often each family is asked (per 100 questions), so that families, types and hops come out
# near the real CLEVR questions' (docs/data.md: same-attribute 33%, relations 41%, no relation
# 14%, and/or 11%; query 38%, count 23%, compare attribute 17%, exist 15%, compare numbers 8%).
FAMILY_WEIGHTS = {"count_plain": 3, "count_relate": 6, "exist_plain": 2, "exist_relate": 5, "query_plain": 4,
                  "query_relate": 14, "compare_numbers": 8, "compare_attribute": 17, "same_relate": 30, "logic": 11}


def _schedule() -> list[int]:
    """FAMILIES indices, 100 slots, each family as often as its weight and spread evenly (smooth
    weighted round robin): consecutive questions of a scene come from different families."""
    weights = [FAMILY_WEIGHTS[f.__name__] for f in FAMILIES]
    current, slots = [0] * len(weights), []
    for _ in range(sum(weights)):
        current = [c + w for c, w in zip(current, weights)]
        best = max(range(len(weights)), key=lambda i: current[i])
        current[best] -= sum(weights)
        slots.append(best)
    return slots


SCHEDULE = _schedule()


class AnswerBalancer:
    """Answers balanced within each family, final function and number of attributes the question
    names (as CLEVR's generator rejects questions per template), so the words alone do not tell
    the answer: a yes/no question is accepted only with the answer its key wants next (alternating,
    so exactly half are "yes"); any other answer already seen more often than the average is
    accepted with probability (average / count)^2."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.counts: dict[tuple, Counter] = {}
        self.wanted: dict[tuple, str] = {}

    def accept(self, key: tuple, answer: str) -> bool:
        if answer in ("yes", "no"):
            want = self.wanted.setdefault(key, self.rng.choice(("yes", "no")))
            if answer != want:
                return False
            self.wanted[key] = "no" if want == "yes" else "yes"
            return True
        c = self.counts.setdefault(key, Counter())
        mean = (sum(c.values()) + 1) / max(1, len(c))
        if c[answer] + 1 > 1.1 * mean and self.rng.random() > (mean / (c[answer] + 1)) ** 2:
            return False
        c[answer] += 1
        return True


def make_questions(scene: dict, n: int, rng: random.Random, balancer: AnswerBalancer,
                   first_family: int = 0, tries: int = 30) -> list[dict]:
    """n questions for a scene, families taken in turn from slot `first_family` of SCHEDULE (pass
    image index x n: over consecutive images every slot, so every family, comes up)."""
    out = []
    fam = first_family
    while len(out) < n:
        family = SCHEDULE[fam % len(SCHEDULE)]
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
            if balancer.accept((family, program[-1]["function"], named_attributes(program)), answer):
                out.append({"question": text, "program": program, "answer": answer,
                            "question_family_index": family})
                break
        if fam - first_family > 4 * n:      # a scene that admits too few questions
            break
    return out
