"""Schedules: the learning rate (paper 4.2 warm-up, optional anneal) and the object-count
curriculum (few objects first)."""
from __future__ import annotations

import dataclasses

import torch

from ..config import ModelConfig
from ..data.sources import DataError, scene_object_counts
from .settings import TrainConfig

# -- curriculum ------------------------------------------------------------------------------------
CURRICULUM_CHUNK = 250                       # steps drawn from one eligible set


class Curriculum:
    """Few objects first: up to step `steps`, batches come from scenes with at most
    limit(step) objects, the limit rising linearly from `start` to the largest scene. Batches are
    planned in chunks of CURRICULUM_CHUNK steps, each a permutation seeded by (seed, chunk), so a
    resumed run draws exactly the same samples."""

    def __init__(self, counts: list[int], start: int, steps: int, seed: int):
        self.counts = torch.tensor(counts)
        self.start, self.steps, self.seed = start, steps, seed
        self.largest = int(self.counts.max())

    def limit(self, step: int) -> int:
        return min(self.largest, self.start + (self.largest - self.start) * step // max(1, self.steps))

    def active(self, step: int) -> bool:
        return step < self.steps

    def plan(self, step: int, batch: int, rank: int, world: int) -> tuple[list[int], int]:
        """Sample indices for the steps from `step` to the chunk's end, and that end."""
        chunk, offset = divmod(step, CURRICULUM_CHUNK)
        end = min((chunk + 1) * CURRICULUM_CHUNK, self.steps)
        eligible = torch.nonzero(self.counts <= self.limit(chunk * CURRICULUM_CHUNK)).flatten()
        need = (end - chunk * CURRICULUM_CHUNK) * batch * world
        g = torch.Generator().manual_seed(self.seed * 7919 + chunk + 1)
        reps = -(-need // len(eligible))
        order = torch.cat([eligible[torch.randperm(len(eligible), generator=g)] for _ in range(reps)])[:need]
        return order[rank::world][offset * batch:].tolist(), end


def build_curriculum(cfg: "TrainConfig", samples) -> "Curriculum | None":
    if cfg.curriculum_objects <= 0 or cfg.curriculum_steps <= 0:
        return None
    if not cfg.data_root or cfg.jsonl or cfg.humans:
        raise DataError("a curriculum over objects needs CLEVR-layout data with a scenes file (--data-root)")
    counts = scene_object_counts(cfg.data_root, "train")
    missing = [s.image for s in samples if s.image not in counts]
    if missing:
        raise DataError(f"a curriculum over objects needs every training image in "
                        f"{cfg.data_root}/scenes/CLEVR_train_scenes.json; {len(missing)} are not, first {missing[0]}")
    cur = Curriculum([counts[s.image] for s in samples], cfg.curriculum_objects, cfg.curriculum_steps, cfg.seed)
    if not (cur.counts <= cfg.curriculum_objects).any():
        raise DataError(f"no training scene has at most {cfg.curriculum_objects} objects")
    return cur



# -- model ---------------------------------------------------------------------------------------
def resolve_lr(cfg: TrainConfig, mcfg: ModelConfig) -> TrainConfig:
    """Unless given: the paper's 3e-4, or 1e-3 for CPU-sized models (input <= 96 px), which
    learn faster with it in the few epochs a CPU affords."""
    if cfg.lr is not None:
        return cfg
    return dataclasses.replace(cfg, lr=1e-3 if mcfg.image_size <= 96 else 3e-4)


def lr_lambda(cfg: TrainConfig, total: int):
    """Linear warmup from 3e-6, then constant (paper 4.2); with anneal_steps, the last that many
    steps of the `total` decay linearly to 0 (a schedule the paper does not use; the learning study
    measures it)."""
    start = cfg.warmup_start_lr / cfg.lr

    def factor(step: int) -> float:
        f = 1.0
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            f = start + (1.0 - start) * step / cfg.warmup_steps
        if cfg.anneal_steps > 0:
            f = min(f, max(0.0, (total - step) / cfg.anneal_steps))
        return f
    return factor


