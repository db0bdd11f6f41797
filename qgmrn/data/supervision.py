"""Training-only targets from CLEVR scenes and programs (DESIGN.md, "Training-only supervision").

For each question of a CLEVR-layout split: its scene's objects (colour, shape, size, material, and
the object's position as a fraction of the image's width and height: the square resize squashes
the image the same way, so a fraction is a cell of any feature map), and the objects its program
points at (programs.pointed_objects). Torch-free; the trainer's criterion reads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .programs import ATTRIBUTES, ProgramError, pointed_objects
from .sources import DataError, _question_list, _read_json, clevr_questions_path

ATTRIBUTE_ORDER = ("color", "shape", "size", "material")
MAX_OBJECTS = 10                       # CLEVR's scenes hold 3 to 10 objects
COLUMNS = 2 + len(ATTRIBUTE_ORDER) + 1   # x, y, four attribute ids, pointed (1/0; -1: no program)


@dataclass
class SceneTargets:
    """Per question: its scene's objects and which of them the question points at."""
    objects: np.ndarray        # (S, K, 6) float32 per scene: x, y in [0, 1), attribute ids; -1 rows pad
    scene_of: np.ndarray       # (N,) int32: each question's scene row
    pointed: np.ndarray        # (N, K) bool: objects the question's program points at
    where_ok: np.ndarray       # (N,) bool: the program ran on the scene and gave the recorded answer
    skipped: dict              # reason -> number of questions whose program was not used

    def __len__(self) -> int:
        return len(self.scene_of)

    def item(self, i: int) -> np.ndarray:
        """(K, 7) float32: x, y, colour, shape, size, material, pointed (-1 everywhere when the
        question's program could not be used; x = -1 on rows past the scene's objects)."""
        row = np.empty((MAX_OBJECTS, COLUMNS), np.float32)
        row[:, :6] = self.objects[self.scene_of[i]]
        row[:, 6] = self.pointed[i] if self.where_ok[i] else -1.0
        return row

    def summary(self) -> str:
        n, ok = len(self), int(self.where_ok.sum())
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return (f"{self.objects.shape[0]} scenes; {ok} of {n} questions point at objects through their "
                f"program" + (f" ({n - ok} not used: {why})" if n > ok else ""))


def _scene_rows(scenes: list, path: Path, image_dir: Path) -> tuple[np.ndarray, dict[str, int]]:
    from PIL import Image

    ids = {a: {v: i for i, v in enumerate(ATTRIBUTES[a])} for a in ATTRIBUTE_ORDER}
    rows = np.full((len(scenes), MAX_OBJECTS, 6), -1.0, np.float32)
    by_file: dict[str, int] = {}
    empty: list[str] = []
    for s, scene in enumerate(scenes):
        try:
            name, objects = scene["image_filename"], scene["objects"]
            if isinstance(objects, list) and not objects:
                empty.append(f"scene {s} ({name})")
            with Image.open(image_dir / name) as im:        # reads the header only
                width, height = im.size
            if len(objects) > MAX_OBJECTS:
                raise DataError(f"{len(objects)} objects (CLEVR scenes hold at most {MAX_OBJECTS})")
            for k, o in enumerate(objects):
                x, y = float(o["pixel_coords"][0]) / width, float(o["pixel_coords"][1]) / height
                if not (np.isfinite(x) and np.isfinite(y)):
                    raise DataError(f"object {k} has pixel_coords {o['pixel_coords']!r}")
                rows[s, k, 0], rows[s, k, 1] = min(max(x, 0.0), 0.999), min(max(y, 0.0), 0.999)
                for j, a in enumerate(ATTRIBUTE_ORDER):
                    if o[a] not in ids[a]:
                        raise DataError(f"object {k} has {a} {o[a]!r}, not one of CLEVR's {ATTRIBUTES[a]}")
                    rows[s, k, 2 + j] = ids[a][o[a]]
        except DataError as e:
            raise DataError(f"{path}: scene {s}: {e}") from e
        except (KeyError, TypeError, IndexError, ValueError, OSError) as e:
            raise DataError(f"{path}: scene {s}: not a usable CLEVR scene record ({type(e).__name__}: {e})") from e
        by_file[name] = s
    if empty:
        raise DataError(f"{path}: {len(empty)} scene record(s) list no objects ({', '.join(empty[:3])}"
                        f"{', ...' if len(empty) > 3 else ''}): the scene loss learns from each scene's objects; "
                        "fix those records, or train with --set scene_weight=0 --set where_weight=0")
    return rows, by_file


def load_scene_targets(root: str | Path, split: str, n_questions: int) -> SceneTargets:
    """Targets for the questions of a CLEVR-layout split, in load_clevr's order (one per record)."""
    root = Path(root)
    scenes_path = root / "scenes" / f"CLEVR_{split}_scenes.json"
    if not scenes_path.exists():
        raise DataError(f"{scenes_path} not found: scene and where supervision need the split's scene "
                        "records (CLEVR layout)")
    data = _read_json(scenes_path)
    scenes = data.get("scenes") if isinstance(data, dict) else None
    if not isinstance(scenes, list):
        raise DataError(f"{scenes_path}: expected an object with a 'scenes' list")
    objects, by_file = _scene_rows(scenes, scenes_path, root / "images" / split)
    qpath = clevr_questions_path(root, split)
    records = _question_list(qpath, "CLEVR v1.0")
    if len(records) != n_questions:
        raise DataError(f"{qpath}: {len(records)} records, but {n_questions} questions were loaded")
    scene_of = np.zeros(len(records), np.int32)
    pointed = np.zeros((len(records), MAX_OBJECTS), bool)
    where_ok = np.zeros(len(records), bool)
    skipped: dict[str, int] = {}
    for i, rec in enumerate(records):
        s = by_file.get(rec.get("image_filename"))
        if s is None:
            raise DataError(f"{qpath}: record {i}: its image {rec.get('image_filename')!r} has no scene in "
                            f"{scenes_path}")
        scene_of[i] = s
        reason = _point(rec, scenes[s], pointed[i])
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            where_ok[i] = True
    return SceneTargets(objects, scene_of, pointed, where_ok, skipped)


def _point(rec: dict, scene: dict, out: np.ndarray) -> str | None:
    """Mark the objects the record's program points at in `out`; the reason it cannot, or None."""
    program = rec.get("program")
    if not program:
        return "no program"
    try:
        objs, answer = pointed_objects(program, scene)
    except (ProgramError, KeyError, IndexError, TypeError, ValueError):
        return "program does not run on the scene"
    if rec.get("answer") is not None and answer != str(rec["answer"]):
        return "program's answer differs from the record's"
    out[objs] = True
    return None
