"""Perfect perception for the oracle study (study/oracle.py): each scene's objects painted into the
map that the routed blocks read, from its scene record, and each question's tokens, answer,
family and the objects each argument of its program points at. No image is decoded.

The map (16, h, w) per scene: at each object's cell, one-hots of its colour (8), shape (3), size (2)
and material (2) and a presence channel; objects that fall into one cell add up (`collisions`
says how often). Cells come from the object's pixel position as a fraction of the image, as the
square resize squashes it, so the painted cell is the cell the object occupies on the real map.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

from qgmrn.data.programs import ProgramError, _fn, _outputs_objects, _run, program_subtype, question_type  # noqa: E402
from qgmrn.data.sources import _question_list, _read_json, answer_list, clevr_questions_path  # noqa: E402
from qgmrn.data.supervision import ATTRIBUTE_ORDER, load_scene_targets  # noqa: E402
from qgmrn.preprocess import Vocab, encode_batch  # noqa: E402

ONE_HOTS = (8, 3, 2, 2)                 # colour, shape, size, material (ATTRIBUTE_ORDER)
CHANNELS = sum(ONE_HOTS) + 1            # + presence
FAMILIES = ("no relation", "relations", "same-attribute", "and-or")
TWO_ARGUMENT = ("equal_integer", "less_than", "greater_than", "equal_color", "equal_shape", "equal_size",
                "equal_material")


def family(program: list[dict]) -> str:
    """The program's structure: and/or over references, same-attribute references, spatial
    relations, or none of these (in that order of precedence)."""
    fns = [_fn(n) for n in program]
    if any(f in ("union", "intersect") for f in fns):
        return "and-or"
    if any(f.startswith("same_") for f in fns):
        return "same-attribute"
    if "relate" in fns:
        return "relations"
    return "no relation"


def hops(program: list[dict]) -> int:
    """Relate and same-attribute steps: the references a question chains."""
    return sum(_fn(n) == "relate" or _fn(n).startswith("same_") for n in program)


def argument_objects(program: list[dict], scene: dict) -> tuple[list[int], list[int] | None]:
    """The objects each input of the program's last step reads: (first, second); second is None
    for one-argument questions. A two-argument comparison keeps its two sides apart, so a where
    map per side can mark what each side names."""
    outs = _run(program, scene)

    def collect(i: int, into: set) -> None:
        if _outputs_objects(_fn(program[i])):
            into.update(outs[i] if isinstance(outs[i], list) else [outs[i]])
        else:
            for j in program[i].get("inputs", []):
                collect(j, into)

    inputs = program[-1].get("inputs", [])
    if _fn(program[-1]) in TWO_ARGUMENT and len(inputs) == 2:
        a, b = set(), set()
        collect(inputs[0], a)
        collect(inputs[1], b)
        return sorted(a), sorted(b)
    one: set = set()
    for j in inputs:
        collect(j, one)
    return sorted(one), None


@dataclass
class Split:
    maps: torch.Tensor          # (S, 16, h, w) float32: the painted scenes
    scene_of: torch.Tensor      # (N,) long
    tokens: torch.Tensor        # (N, T) long
    lengths: torch.Tensor       # (N,) long
    labels: torch.Tensor        # (N,) long; -1 for an answer the training split never gave
    where: torch.Tensor         # (N, 2, h*w) float32: cells of each argument's objects
    where_ok: torch.Tensor      # (N, 2) bool: that channel has a target
    counts: torch.Tensor        # (N,) float32: the answer of a count question, -1 otherwise
    types: list[str]
    families: list[str]
    images: list[str]
    collisions: float           # fraction of objects sharing their cell with another
    texts: list[str]            # the questions and their answers as written (the baselines read them)
    answers: list[str]

    def records(self) -> list[tuple[str, str, str]]:
        """(question, answer, type) per question."""
        return list(zip(self.texts, self.answers, self.types))


def paint(objects: np.ndarray, h: int, w: int) -> tuple[np.ndarray, float]:
    """objects (S, K, 6) from SceneTargets: x, y, attribute ids (-1 rows pad) -> (S, 16, h, w)."""
    maps = np.zeros((len(objects), CHANNELS, h, w), np.float32)
    shared = total = 0
    offsets = np.cumsum((0,) + ONE_HOTS[:-1])
    for s, rows in enumerate(objects):
        seen: dict = {}
        for x, y, *ids in rows:
            if x < 0:
                continue
            cy, cx = min(int(y * h), h - 1), min(int(x * w), w - 1)
            for off, k in zip(offsets, ids):
                maps[s, int(off + k), cy, cx] += 1.0
            maps[s, -1, cy, cx] += 1.0
            seen[cy, cx] = seen.get((cy, cx), 0) + 1
        total += sum(seen.values())
        shared += sum(n for n in seen.values() if n > 1)
    return maps, shared / max(1, total)


def load_split(root: str | Path, split: str, size: int, vocab: Vocab | None = None,
               answers: list[str] | None = None, max_len: int = 0) -> tuple[Split, Vocab, list[str]]:
    """One CLEVR-layout split painted at size x size; the vocabulary and answers come from the
    training split (pass them in for val)."""
    root = Path(root)
    records = _question_list(clevr_questions_path(root, split), "CLEVR v1.0")
    scenes = _read_json(root / "scenes" / f"CLEVR_{split}_scenes.json")["scenes"]
    targets = load_scene_targets(root, split, len(records))
    questions = [r["question"] for r in records]
    if vocab is None:
        vocab = Vocab.build(questions)
    if answers is None:
        from qgmrn.data.sources import Sample
        answers = answer_list([Sample("", "", str(r["answer"])) for r in records])
    index = {a: i for i, a in enumerate(answers)}
    tokens, lengths, _ = encode_batch(vocab, questions, max_len or None)
    maps, collisions = paint(targets.objects, size, size)
    n, cells = len(records), size * size
    where = np.zeros((n, 2, cells), np.float32)
    where_ok = np.zeros((n, 2), bool)
    counts = np.full(n, -1.0, np.float32)
    types, families = [], []
    for i, r in enumerate(records):
        program, scene = r["program"], scenes[targets.scene_of[i]]
        sub = program_subtype(program)
        types.append(question_type(sub))
        families.append(family(program))
        if sub == "count":
            counts[i] = float(r["answer"])
        try:
            sides = argument_objects(program, scene)
        except (ProgramError, KeyError, IndexError, TypeError):
            continue
        rows = targets.objects[targets.scene_of[i]]
        for k, objs in enumerate(sides):
            if objs is None:
                continue
            where_ok[i, k] = True
            for o in objs:
                cy, cx = min(int(rows[o, 1] * size), size - 1), min(int(rows[o, 0] * size), size - 1)
                where[i, k, cy * size + cx] = 1.0
    data = Split(torch.from_numpy(maps), torch.from_numpy(targets.scene_of.astype(np.int64)),
                 torch.as_tensor(np.asarray(tokens), dtype=torch.long),
                 torch.as_tensor(np.asarray(lengths), dtype=torch.long),
                 torch.tensor([index.get(str(r["answer"]), -1) for r in records]),
                 torch.from_numpy(where), torch.from_numpy(where_ok), torch.from_numpy(counts),
                 types, families, [r["image_filename"] for r in records], collisions, questions,
                 [str(r["answer"]) for r in records])
    return data, vocab, answers


__all__ = ["ATTRIBUTE_ORDER", "CHANNELS", "FAMILIES", "Split", "argument_objects", "family", "hops",
           "load_split", "paint"]
