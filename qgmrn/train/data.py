"""The data a run trains on: where the samples come from (the built-in generated data, CLEVR
layout, CLEVR-Humans, JSON lines), their image caches, and the question length limit."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from ..data.prepare import cache_name, default_cache_dir
from ..data.sources import DataError, load_clevr, load_humans, load_jsonl
from ..data.supervision import SceneTargets, load_scene_targets
from ..preprocess import UNK_ID, Vocab, tokenize
from .settings import TrainConfig

# Longest question (in tokens) an exported model accepts: at least this, or the longest training
# question. Real CLEVR questions reach about 45 tokens; the runtime refuses longer ones (never
# truncates), and TensorRT profiles are built up to this length.
MIN_QUESTION_LIMIT = 64
# Epochs when none are given. The default run (the built-in data, 50,000 questions) takes 6: with
# the scene and where losses it learns more in 6 than the paper's loss did in 10, and stays within
# 20 minutes end to end on 2 cores (README, "Measured").
DEFAULT_EPOCHS, BUILTIN_EPOCHS = 10, 6


def question_limit(samples) -> int:
    return max(MIN_QUESTION_LIMIT, max(len(tokenize(s.question)) for s in samples))


def default_data_dir(images: int) -> Path:
    """Where the default run keeps its generated data; the name changes with the question
    generator's language, so data written by an older generator is never reused."""
    from ..data.questions import QUESTION_LANGUAGE
    base = Path(os.environ.get("QGMRN_CACHE", Path.home() / ".cache" / "qgmrn"))
    return base / f"clevr-generated-v{QUESTION_LANGUAGE + 2}-{images}"


# The CPU presets learn from the scene and the program unless told otherwise (docs/learning,
# "Learning from the scene and the program": +2.4 points overall, +10.6 on query attribute for
# small-frn at 256k samples, at the same samples/s); the paper's presets keep the paper's loss.
# With them, a target execution rate keeps the routing the question's (docs/learning/routing: 60% of
# the filters executed, 41% of gates differing between two questions about one image, vs 96% / 5%).
AUTO_SUPERVISION = {"scene_weight": 0.5, "where_weight": 1.0, "exec_target": 0.6}
SUPERVISED_PRESETS = ("small", "small-frn")


def resolve_supervision(cfg: TrainConfig, has_scenes: bool) -> TrainConfig:
    """scene_weight / where_weight left unset (None): AUTO_SUPERVISION for the CPU presets on data
    with scene records and programs, 0 (the paper's loss) otherwise."""
    on = has_scenes and cfg.preset.partition("+")[0] in SUPERVISED_PRESETS
    return dataclasses.replace(cfg, **{k: (v if on else 0.0) for k, v in AUTO_SUPERVISION.items()
                                       if getattr(cfg, k) is None})


def generate_builtin(root: Path, images: int, say, poll_s: float = 1.0) -> None:
    """Make the default run's dataset once. Two runs started together on an empty cache: the first
    generates it under a lock, the second waits for it and reuses it (each file is written whole)."""
    import time
    from ..data.generate import generate
    from ..files import Busy, FileLock
    root.parent.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        try:
            lock = FileLock(root.parent / f".{root.name}.lock", f"the built-in dataset {root}")
            break
        except Busy as e:
            if not waiting:
                say(f"waiting: {e} (generating it)")
                waiting = True
            time.sleep(poll_s)
    try:
        if not (root / "questions" / "CLEVR_val_questions.json").exists():   # the other run may have made it
            say(f"generating the built-in CLEVR-style dataset into {root} (once)")
            generate(root, images, max(1, images // 6), 10, seed=0, log=say)
    finally:
        lock.release()


# -- data ------------------------------------------------------------------------------------
@dataclass
class Data:
    cfg: TrainConfig                         # with data_root set for the built-in data
    train: list
    val: list
    cache_dir: Path | None
    names: tuple[str, str]                   # cache names of the train and val images
    targets: SceneTargets | None = None      # the training split's scene/program targets, when asked


def resolve_data(cfg: TrainConfig, main_rank: bool, say) -> Data:
    """Stage 1: where the samples come from (the built-in generated data is made once)."""
    if not cfg.data_root and not cfg.jsonl:
        root = default_data_dir(cfg.generate_images)
        if not (root / "questions" / "CLEVR_val_questions.json").exists():
            if main_rank:
                generate_builtin(root, cfg.generate_images, say)
            if dist.is_initialized():
                dist.barrier()
        say(f"data: built-in generated CLEVR-style dataset at {root}")
        cfg = dataclasses.replace(cfg, data_root=str(root),
                                  epochs=BUILTIN_EPOCHS if cfg.epochs is None else cfg.epochs)
    if cfg.epochs is None:
        cfg = dataclasses.replace(cfg, epochs=DEFAULT_EPOCHS)
    if cfg.jsonl:
        train_s, val_s = load_jsonl(cfg.jsonl[0]), load_jsonl(cfg.jsonl[1])
        where, names = Path(cfg.jsonl[0]).parent, (cache_name(cfg.jsonl[0]), cache_name(cfg.jsonl[1]))
    elif cfg.humans:
        if not cfg.data_root:
            raise DataError("--humans needs --data-root for the images")
        root = Path(cfg.data_root)
        train_s = load_humans(cfg.humans[0], root / "images" / "train")
        val_s = load_humans(cfg.humans[1], root / "images" / "val")
        where, names = root, ("humans-train", "humans-val")
    else:
        train_s, val_s = load_clevr(cfg.data_root, "train"), load_clevr(cfg.data_root, "val")
        where, names = Path(cfg.data_root), ("train", "val")
    if not train_s or not val_s:
        raise DataError("the training and validation splits must each hold at least one question")
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(where)
    has_scenes = not cfg.jsonl and not cfg.humans and (Path(cfg.data_root) / "scenes" / "CLEVR_train_scenes.json").exists()
    auto_where = cfg.where_weight is None
    cfg = resolve_supervision(cfg, has_scenes)
    targets = None
    if cfg.scene_weight or cfg.where_weight:
        targets = load_scene_targets(cfg.data_root, "train", len(train_s))
        say(f"supervision: {targets.summary()}")
        if cfg.where_weight and not targets.where_ok.any() and auto_where:
            # the preset's default, not the user's choice: data without programs trains without it
            say("supervision: no training question has a program that runs on its scene; the where loss "
                "is off (where_weight=0)")
            cfg = dataclasses.replace(cfg, where_weight=0.0)
            if not cfg.scene_weight:
                targets = None
        elif cfg.where_weight and not targets.where_ok.any():
            raise DataError(f"where_weight needs questions with programs that run on their scenes; none of "
                            f"the {len(train_s)} training questions has one")
    return Data(cfg, train_s, val_s, cache_dir, names, targets)


def warn_about_val(val, vocab: Vocab, answers: list[str], say) -> None:
    known = set(answers)
    unseen = sum(s.answer not in known for s in val)
    unk = sum(any(i == UNK_ID for i in vocab.encode(s.question)[0]) for s in val)
    if unseen:
        say(f"warning: {unseen} of {len(val)} val questions have an answer never seen in training "
            "(always counted wrong)")
    if unk:
        say(f"warning: {unk} of {len(val)} val questions have words never seen in training (read as UNK)")


