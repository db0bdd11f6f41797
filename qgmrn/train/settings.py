"""Training settings: the TrainConfig dataclass (what a run is), its validation before any work
starts, and the model overrides a run may carry."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ModelConfig, get_config
from ..settings import SettingsError, typed


SCENE_GATES = ("question", "open", "stem")   # the map the scene loss reads (qgmrn/train/supervision.py)
MAX_LOSS_WEIGHT = 100.0                 # a loss weight beyond this drowns the answer's cross-entropy


@dataclass(frozen=True)
class TrainConfig:
    data_root: str | None = None             # CLEVR layout; None and no jsonl: the built-in data
    jsonl: tuple[str, ...] = ()              # (train.jsonl, val.jsonl)
    humans: tuple[str, ...] = ()             # (train.json, val.json), images from data_root
    preset: str = "small"
    epochs: int | None = None                # None: 10, or 6 for the built-in data (the default run's
                                             # 20-minute promise on 2 cores; train/data.py)
    steps: int = 0                           # > 0 overrides epochs
    batch_size: int = 64
    lr: float | None = None                  # None: 3e-4 (paper 4.2), 1e-3 for the CPU presets
    warmup_steps: int = 500
    warmup_start_lr: float = 3e-6
    anneal_steps: int = 0                    # > 0: the last this many steps decay the lr linearly to 0
    load_weight: float = 0.01                # lambda of the load-balancing loss (eq. 13)
    exec_target: float | None = None         # training only, > 0: the fraction of each layer's modules
                                             # a batch should execute (ConvNet-AIG's target-rate loss,
                                             # the paper's "sparsity constraints"); 0: off. None: 0.6 for
                                             # the CPU presets where the data has scenes, else 0
    exec_weight: float = 1.0                 # weight of that loss (when exec_target > 0)
    scene_weight: float | None = None        # training only: objects' attributes and presence on the
                                             # final map, from the scene records (0: the paper's loss)
    where_weight: float | None = None        # training only: the cells of the objects the question's
                                             # program points at, on the gated final map. None: on for
                                             # the CPU presets where the data has scenes, else 0
    router_lr: float = 1.0                   # training only: the routing FC's learning rate as a multiple
                                             # of lr (gated networks often train their gates slower or
                                             # faster than the features; issue 39's rows measure it)
    count_weight: float = 0.0                # training only, with the model setting pool="max+sum": a
                                             # linear read of the head's sum over positions predicts
                                             # each count question's answer (smooth L1)
    scene_gates: str = "open"                # the scene loss reads the map with every module "open" (a
                                             # second visual pass), or under the question's gates
                                             # ("question": the routing then learns to stay open), or
                                             # the stem's map, before any routed block ("stem")
    seed: int = 0
    out: str = "runs/qgmrn"
    save_every: int = 500                    # steps between checkpoints
    log_every: int = 20
    eval_every_epoch: bool = True
    eval_every: int = 0                      # > 0: also evaluate every this many steps (learning curves)
    max_val: int = 0                         # evaluate on at most this many val questions (0: all)
    workers: int = 0                         # DataLoader processes
    generate_images: int = 5000              # size of the built-in dataset (train images)
    curriculum_objects: int = 0              # > 0: first train on scenes with at most this many objects,
    curriculum_steps: int = 0                # then raise that limit linearly to the largest scene over
                                             # these steps (scenes from the CLEVR scenes file)
    precision: str = "auto"                  # "auto": bf16 autocast on CUDA and on CPUs with bf16 hardware (AMX or AVX512-BF16); "bf16", "fp32"
                                             # (about 1.6x the samples/s there); "fp32": never
    cache_dir: str | None = None             # image cache; default beside the data, or ~/.cache/qgmrn
                                             # when the data directory is read-only
    progress_every: float = 30.0             # seconds between progress lines when stderr is no terminal
    recipe: str | None = None                # the --config file the run came from (exports record it)


class TrainingStopped(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# -- settings -----------------------------------------------------------------------------------
def validate(cfg: TrainConfig) -> TrainConfig:
    """Ranges, checked before any work starts (nothing is created for a run that cannot start)."""
    positive = ("batch_size", "log_every", "save_every")
    non_negative = ("epochs", "steps", "warmup_steps", "anneal_steps", "max_val", "workers", "eval_every",
                    "curriculum_objects", "curriculum_steps")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise SettingsError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise SettingsError(f"{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.epochs == 0 and cfg.steps == 0:
        raise SettingsError("give a positive number of epochs or steps")
    if not 0 <= cfg.seed < 2**32:
        raise SettingsError(f"seed must lie in 0..{2**32 - 1}, got {cfg.seed}")
    if not (math.isfinite(cfg.warmup_start_lr) and cfg.warmup_start_lr >= 0.0):
        raise SettingsError(f"warmup_start_lr must be a finite number, not negative, got {cfg.warmup_start_lr}")
    if cfg.lr is not None and not (0.0 < cfg.lr < 10.0):
        raise SettingsError(f"lr must lie in (0, 10), got {cfg.lr}")
    if not (math.isfinite(cfg.router_lr) and 0.0 < cfg.router_lr <= 100.0):
        raise SettingsError(f"router_lr (a multiple of lr) must lie in (0, 100], got {cfg.router_lr}")
    if cfg.exec_target is not None and not (0.0 <= cfg.exec_target < 1.0):
        raise SettingsError(f"exec_target must lie in [0, 1) (0: off), got {cfg.exec_target}")
    for name in ("load_weight", "scene_weight", "where_weight", "exec_weight", "count_weight"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value >= 0.0):
            raise SettingsError(f"{name} must be a finite number, not negative, got {value}")
        if value is not None and value > MAX_LOSS_WEIGHT:    # the answer's loss would vanish beside it
            raise SettingsError(f"{name} must be at most {MAX_LOSS_WEIGHT:g}, got {value}")
    if cfg.scene_gates not in SCENE_GATES:
        raise SettingsError(f"scene_gates must be one of {', '.join(SCENE_GATES)}, got {cfg.scene_gates!r}")
    if (cfg.scene_weight or cfg.where_weight) and (cfg.jsonl or cfg.humans):
        raise SettingsError("scene_weight and where_weight need CLEVR scene records and programs "
                            "(--data-root in CLEVR layout, or the built-in data); "
                            f"{'--jsonl' if cfg.jsonl else '--humans'} data has none")
    if cfg.generate_images < 6:
        raise SettingsError(f"generate_images must be at least 6, got {cfg.generate_images}")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise SettingsError(f"precision must be 'auto', 'bf16' or 'fp32', got {cfg.precision!r}")
    if cfg.jsonl and len(cfg.jsonl) != 2:
        raise SettingsError("jsonl takes two files: train and val")
    if cfg.humans and len(cfg.humans) != 2:
        raise SettingsError("humans takes two files: train and val")
    if cfg.jsonl and cfg.data_root:
        raise SettingsError("give one data source: --data-root (CLEVR layout) or --jsonl, not both")
    if sum(map(bool, (cfg.jsonl, cfg.humans))) > 1:
        raise SettingsError("give one data source: --jsonl or --humans (with --data-root)")
    if not (math.isfinite(cfg.progress_every) and cfg.progress_every > 0):
        raise SettingsError(f"progress_every must be a positive number of seconds, got {cfg.progress_every}")
    return cfg


def validate_model_overrides(preset: str, overrides: dict) -> dict:
    overrides = typed(ModelConfig, overrides, "model")
    for k in ("vocab_size", "num_answers"):
        if k in overrides:
            raise SettingsError(f"model {k} comes from the data; it cannot be set")
    try:
        get_config(preset, **overrides)
    except (TypeError, ValueError) as e:
        raise SettingsError(str(e)) from e
    return overrides
