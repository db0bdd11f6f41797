"""Readers for the three data layouts; pure Python, torch-free. Each returns a list of Sample.

- CLEVR v1.0 (the real download or qgmrn.data.generate output):
  ROOT/questions/CLEVR_{split}_questions.json, ROOT/images/{split}/*.png
- CLEVR-Humans: a JSON file {"questions": [...]} without programs; images from a CLEVR root
- JSON lines for users' own data: one {"image": path relative to the file, "question", "answer"}
  object per line; one file per split
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..preprocess import tokenize
from .programs import program_subtype, question_type


class DataError(ValueError):
    """Data that cannot be used, with the file and record it comes from."""


@dataclass(frozen=True)
class Sample:
    image: str                       # absolute or root-relative image path
    question: str
    answer: str | None               # None where the split has no answers (CLEVR test)
    qtype: str | None = None         # one of the paper's five types, where a program tells
    subtype: str | None = None       # one of CLEVR's 13 subtypes (last program function)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file beside `path`, then rename: readers never see half a file."""
    from ..files import atomic_file
    with atomic_file(path) as f:                                   # two writers never share a temp file
        json.dump(obj, f, separators=(",", ":"))


def write_split(root: Path, split: str, info: dict, scenes: list, questions: list) -> None:
    """A split's CLEVR_{split}_scenes.json and CLEVR_{split}_questions.json, each written atomically."""
    for kind, records in (("scenes", scenes), ("questions", questions)):
        (root / kind).mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / kind / f"CLEVR_{split}_{kind}.json", {"info": {**info, "split": split}, kind: records})


def _read_json(path: Path):
    if not path.exists():
        raise DataError(f"file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def _field(rec, key, path, i, kind=str):
    if not isinstance(rec, dict) or key not in rec:
        raise DataError(f"{path}: record {i}: missing field {key!r}")
    value = rec[key]
    if not isinstance(value, kind):
        raise DataError(f"{path}: record {i}: field {key!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def _own_labels(rec, path, where: str) -> tuple[str | None, str | None]:
    """A record's own "type" and "subtype" (None where absent); DataError when one is not a string."""
    labels = []
    for key in ("type", "subtype"):
        value = rec.get(key) if isinstance(rec, dict) else None
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path}: {where}: field {key!r} should be a string, got "
                            f"{type(value).__name__} {json.dumps(value)[:40]}")
        labels.append(value)
    return labels[0], labels[1]


def _check_images(samples: list[Sample], source: Path) -> None:
    missing = [s.image for s in samples if not os.path.exists(s.image)]
    if missing:
        raise DataError(f"{source}: {len(missing)} image(s) not found, first: {missing[0]}")


def clevr_questions_path(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / "questions" / f"CLEVR_{split}_questions.json"


def _question_list(path: Path, layout: str) -> list:
    data = _read_json(path)
    records = data.get("questions") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise DataError(f"{path}: expected an object with a 'questions' list ({layout} layout)")
    return records


def _from_records(records: list, path: Path, image_dir: Path, require_answers: bool) -> list[Sample]:
    """CLEVR-schema records -> samples; type and subtype from the record's own "type"/"subtype" fields
    where it has them, else from its program where there is one."""
    samples = []
    for i, rec in enumerate(records):
        question = _field(rec, "question", path, i)
        filename = _field(rec, "image_filename", path, i)
        answer = rec.get("answer")
        if answer is None and require_answers:
            raise DataError(f"{path}: record {i}: question {question!r} has no answer in a training split")
        qtype, subtype = _own_labels(rec, path, f"record {i}")     # a data set's own (CLEVR's files have none)
        if not (qtype or subtype) and rec.get("program"):
            try:
                subtype = program_subtype(rec["program"])
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise DataError(f"{path}: record {i}: bad program ({e})") from e
            qtype = question_type(subtype)
        samples.append(Sample(str(image_dir / filename), question, None if answer is None else str(answer),
                              qtype, subtype))
    _check_images(samples, path)
    return samples


def load_clevr(root: str | os.PathLike, split: str, require_answers: bool = True) -> list[Sample]:
    """Questions of one CLEVR split; question type and subtype come from each program."""
    path = clevr_questions_path(root, split)
    return _from_records(_question_list(path, "CLEVR v1.0"), path, Path(root) / "images" / split, require_answers)


def scene_object_counts(root: str | os.PathLike, split: str) -> dict[str, int]:
    """Image path -> number of objects, from CLEVR's scenes file ({} where there is none)."""
    path = Path(root) / "scenes" / f"CLEVR_{split}_scenes.json"
    if not path.exists():
        return {}
    data = _read_json(path)
    scenes = data.get("scenes") if isinstance(data, dict) else None
    if not isinstance(scenes, list):
        raise DataError(f"{path}: expected an object with a 'scenes' list")
    image_dir = Path(root) / "images" / split
    try:
        return {str(image_dir / sc["image_filename"]): len(sc["objects"]) for sc in scenes}
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: a scene lacks image_filename or objects ({e})") from e


def load_humans(path: str | os.PathLike, image_dir: str | os.PathLike, require_answers: bool = True
                ) -> list[Sample]:
    """CLEVR-Humans questions (free-form, no programs) on images in image_dir."""
    path = Path(path)
    return _from_records(_question_list(path, "CLEVR-Humans"), path, Path(image_dir), require_answers)


def load_jsonl(path: str | os.PathLike, require_answers: bool = True) -> list[Sample]:
    """Users' own data: one JSON object per line, image path relative to the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"file not found: {path}")
    samples = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not UTF-8 text (byte {e.start + 1}: "
                                f"{raw[e.start:e.start + 1]!r})") from e
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not valid JSON ({e})") from e
            where = f"line {lineno}"
            qtype, subtype = _own_labels(rec, path, where)
            image = _field(rec, "image", path, where)
            question = _field(rec, "question", path, where)
            if not any(w[0].isalnum() for w in tokenize(question)):     # what Vocab.encode refuses
                raise DataError(f"{path}: {where}: question {question!r} has no words")
            answer = rec.get("answer")
            if answer is None and require_answers:
                raise DataError(f"{path}: {where}: question {question!r} has no answer in a training split")
            if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int))):
                raise DataError(f"{path}: {where}: field 'answer' should be a string (or an integer), "
                                f"got {type(answer).__name__} {json.dumps(answer)[:40]}")
            samples.append(Sample(str((path.parent / image).resolve()), question,
                                  None if answer is None else str(answer), qtype, subtype))
    if not samples:
        raise DataError(f"{path}: no records")
    _check_images(samples, path)
    return samples


def answer_list(samples: list[Sample]) -> list[str]:
    """The answer classes of a training split, sorted."""
    return sorted({s.answer for s in samples if s.answer is not None})


def question_only_baseline(train: list[Sample], val: list[Sample]) -> dict:
    """Accuracy on val of answering from the question alone: the training split's most common
    answer for the same question text, else for the same subtype (the prior a blind model learns)."""
    from collections import Counter, defaultdict

    by_text, by_sub = defaultdict(Counter), defaultdict(Counter)
    for s in train:
        by_text[s.question.lower()][s.answer] += 1
        by_sub[s.subtype][s.answer] += 1
    hits, totals = defaultdict(int), defaultdict(int)
    correct = 0
    for s in val:
        c = by_text.get(s.question.lower()) or by_sub.get(s.subtype) or Counter({"": 1})
        ok = c.most_common(1)[0][0] == s.answer
        correct += ok
        hits[s.qtype] += ok
        totals[s.qtype] += 1
    return {"overall": correct / max(1, len(val)),
            "per_type": {t: hits[t] / totals[t] for t in totals if t is not None}}


def majority_baseline(train: list[Sample], val: list[Sample]) -> dict:
    """Accuracy on val of always answering the training split's most common answer, overall and
    per question type (each type's own most common answer)."""
    from collections import Counter, defaultdict

    overall = Counter(s.answer for s in train).most_common(1)[0][0]
    by_type = defaultdict(Counter)
    for s in train:
        by_type[s.qtype][s.answer] += 1
    out = {"overall": sum(s.answer == overall for s in val) / max(1, len(val))}
    hits, totals = defaultdict(int), defaultdict(int)
    for s in val:
        totals[s.qtype] += 1
        guess = by_type[s.qtype].most_common(1)[0][0] if by_type[s.qtype] else overall
        hits[s.qtype] += s.answer == guess
    out["per_type_majority"] = {t: hits[t] / totals[t] for t in totals if t is not None}
    return out
