"""Train QGMRN (paper 4.2: Adam 3e-4, betas 0.9/0.999, batch 64, linear warmup from 3e-6).

    python -m qgmrn.train                         # built-in generated CLEVR-style data, CPU preset
    python -m qgmrn.train --data-root CLEVR_v1.0 --preset brn-c32 --epochs 20
    python -m qgmrn.train --jsonl train.jsonl val.jsonl --preset small
    python -m qgmrn.train --init-from runs/clevr/ckpt.pt --data-root CLEVR_v1.0 \\
        --humans CLEVR-Humans-train.json CLEVR-Humans-val.json        # fine-tune on CLEVR-Humans
    torchrun --nproc_per_node=8 -m qgmrn.train --data-root CLEVR_v1.0 --preset frn
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, remove_stale, save_checkpoint
from .config import ModelConfig, get_config
from .data.datasets import VQADataset, collate
from .data.prepare import cache_name, default_cache_dir, open_cache
from .data.sources import (DataError, answer_list, load_clevr, load_humans, load_jsonl, majority_baseline,
                           scene_object_counts)
from .evaluate import evaluate_model, format_table, public
from .model import QGMRN, grow_model
from .preprocess import UNK_ID, Vocab, tokenize
from .routing import load_balancing_loss
from .settings import SettingsError, field_types, split_assignment, typed


@dataclass(frozen=True)
class TrainConfig:
    data_root: str | None = None             # CLEVR layout; None and no jsonl: the built-in data
    jsonl: tuple[str, ...] = ()              # (train.jsonl, val.jsonl)
    humans: tuple[str, ...] = ()             # (train.json, val.json), images from data_root
    preset: str = "small"
    epochs: int = 10
    steps: int = 0                           # > 0 overrides epochs
    batch_size: int = 64
    lr: float | None = None                  # None: 3e-4 (paper 4.2), 1e-3 for the CPU presets
    warmup_steps: int = 500
    warmup_start_lr: float = 3e-6
    anneal_steps: int = 0                    # > 0: the last this many steps decay the lr linearly to 0
    load_weight: float = 0.01                # lambda of the load-balancing loss (eq. 13)
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
    precision: str = "auto"                  # "auto": bf16 autocast on CUDA and on CPUs with AMX-BF16
                                             # (about 1.6x the samples/s there); "fp32": never
    cache_dir: str | None = None             # image cache; default beside the data, or ~/.cache/qgmrn
                                             # when the data directory is read-only
    progress_every: float = 30.0             # seconds between progress lines when stderr is no terminal
    recipe: str | None = None                # the --config file the run came from (exports record it)


# What --resume may change: how long to train and how the run ends (the anneal is counted back from
# the last step, so it moves with `steps` anyway), how the run reports and reads; all else (data,
# preset, warmup, lr, batch size, seed, precision) comes from the checkpoint.
RESUME_MAY_CHANGE = ("epochs", "steps", "anneal_steps", "workers", "log_every", "save_every", "eval_every", "max_val",
                     "progress_every", "cache_dir", "out")


class TrainingStopped(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# Longest question (in tokens) an exported model accepts: at least this, or the longest training
# question. Real CLEVR questions reach about 45 tokens; the runtime refuses longer ones (never
# truncates), and TensorRT profiles are built up to this length.
MIN_QUESTION_LIMIT = 64


def question_limit(samples) -> int:
    return max(MIN_QUESTION_LIMIT, max(len(tokenize(s.question)) for s in samples))


def default_data_dir(images: int) -> Path:
    base = Path(os.environ.get("QGMRN_CACHE", Path.home() / ".cache" / "qgmrn"))
    return base / f"clevr-generated-v3-{images}"


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
        if getattr(cfg, name) < 0:
            raise SettingsError(f"{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.epochs == 0 and cfg.steps == 0:
        raise SettingsError("give a positive number of epochs or steps")
    if cfg.lr is not None and not (0.0 < cfg.lr < 10.0):
        raise SettingsError(f"lr must lie in (0, 10), got {cfg.lr}")
    if not cfg.load_weight >= 0.0:
        raise SettingsError(f"load_weight must not be negative, got {cfg.load_weight}")
    if cfg.generate_images < 6:
        raise SettingsError(f"generate_images must be at least 6, got {cfg.generate_images}")
    if cfg.precision not in ("auto", "fp32"):
        raise SettingsError(f"precision must be 'auto' or 'fp32', got {cfg.precision!r}")
    if cfg.jsonl and len(cfg.jsonl) != 2:
        raise SettingsError("jsonl takes two files: train and val")
    if cfg.humans and len(cfg.humans) != 2:
        raise SettingsError("humans takes two files: train and val")
    if sum(map(bool, (cfg.jsonl, cfg.humans))) > 1:
        raise SettingsError("give one data source: --jsonl or --humans (with --data-root)")
    if cfg.progress_every <= 0:
        raise SettingsError("progress_every must be positive")
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


def given_fields(cfg: TrainConfig) -> dict:
    """The fields of `cfg` that differ from the defaults (what a caller of train() chose)."""
    default = TrainConfig()
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)
            if getattr(cfg, f.name) != getattr(default, f.name)}


def restore_config(saved: dict, given: dict, path) -> TrainConfig:
    """The run's own settings from its checkpoint, with what --resume may change applied; a given
    setting that contradicts the run is refused."""
    known = field_types(TrainConfig)
    cfg = dict(typed(TrainConfig, {k: v for k, v in saved.items() if k in known}, f"{path}: train_config"))
    for k, v in given.items():
        if k in RESUME_MAY_CHANGE:
            cfg[k] = v
        elif cfg.get(k, getattr(TrainConfig(), k)) != v and not (k == "data_root" and _same_path(cfg.get(k), v)):
            raise SettingsError(f"--resume continues the run in {Path(path).parent} as it was set up: "
                                f"{k}={v!r} contradicts its {k}={cfg.get(k)!r} (only "
                                f"{', '.join(RESUME_MAY_CHANGE[:3])} and reporting may change; start a new "
                                "run with --out, or --init-from to fine-tune)")
    if "steps" in given and "epochs" not in given:
        cfg["epochs"] = TrainConfig().epochs if cfg.get("steps") else cfg.get("epochs", TrainConfig().epochs)
    if "epochs" in given and "steps" not in given:
        cfg["steps"] = 0
    return validate(TrainConfig(**cfg))


def _same_path(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


# -- data ------------------------------------------------------------------------------------
@dataclass
class Data:
    cfg: TrainConfig                         # with data_root set for the built-in data
    train: list
    val: list
    cache_dir: Path | None
    names: tuple[str, str]                   # cache names of the train and val images


def resolve_data(cfg: TrainConfig, main_rank: bool, say) -> Data:
    """Stage 1: where the samples come from (the built-in generated data is made once)."""
    if not cfg.data_root and not cfg.jsonl:
        root = default_data_dir(cfg.generate_images)
        if not (root / "questions" / "CLEVR_val_questions.json").exists():
            if main_rank:
                from .data.generate import generate
                say(f"generating the built-in CLEVR-style dataset into {root} (once)")
                generate(root, cfg.generate_images, max(1, cfg.generate_images // 6), 10, seed=0, log=say)
            if dist.is_initialized():
                dist.barrier()
        say(f"data: built-in generated CLEVR-style dataset at {root}")
        cfg = dataclasses.replace(cfg, data_root=str(root))
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
    return Data(cfg, train_s, val_s, cache_dir, names)


def warn_about_val(val, vocab: Vocab, answers: list[str], say) -> None:
    known = set(answers)
    unseen = sum(s.answer not in known for s in val)
    unk = sum(any(i == UNK_ID for i in vocab.encode(s.question)[0]) for s in val)
    if unseen:
        say(f"warning: {unseen} of {len(val)} val questions have an answer never seen in training "
            "(always counted wrong)")
    if unk:
        say(f"warning: {unk} of {len(val)} val questions have words never seen in training (read as UNK)")


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


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX), where oneDNN runs
    bf16 convolutions much faster than float32. Elsewhere bf16 autocast on a CPU is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


def training_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of the training step (None: float32). Evaluation always runs in float32,
    like the exported model."""
    if cfg.precision not in ("auto", "fp32"):
        raise ValueError(f"precision must be 'auto' or 'fp32', got {cfg.precision!r}")
    if cfg.precision == "fp32":
        return None
    if device.type == "cuda" or cpu_has_amx_bf16():
        return torch.bfloat16
    return None


# -- distributed -------------------------------------------------------------------------------
def _dist_setup():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# -- the run -------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything one training run holds; the stages below read and advance it."""
    cfg: TrainConfig
    model: QGMRN
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    vocab: Vocab
    answers: list[str]
    max_len: int
    train_ds: VQADataset
    val_ds: VQADataset
    curriculum: "Curriculum | None"
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    rank: int
    world: int
    per_epoch: int
    total: int
    step: int = 0
    train_seconds: float = 0.0
    result: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.rank == 0


def build_or_restore(cfg: TrainConfig, data: Data, resume_state, init_from, model_overrides, device, rank,
                     world, say) -> Run:
    """Stage 2: a new model, one restored from --resume, or one grown from --init-from."""
    train_samples = data.train
    if resume_state is not None:
        vocab = Vocab(list(resume_state["vocab"]))
        answers = list(resume_state["answers"])
        max_len = resume_state["max_question_len"]
        model = model_from_checkpoint(resume_state)
    elif init_from:
        init = load_checkpoint(init_from)
        model = model_from_checkpoint(init)
        vocab = Vocab(list(init["vocab"]))
        new_words = vocab.extend(s.question for s in train_samples)
        answers = list(init["answers"]) + [a for a in answer_list(train_samples) if a not in init["answers"]]
        model = grow_model(model, len(vocab), len(answers))
        max_len = max(init["max_question_len"], question_limit(train_samples))
        say(f"fine-tuning from {init_from}: {len(new_words)} new words, "
            f"{len(answers) - len(init['answers'])} new answers")
    else:
        vocab = Vocab.build(s.question for s in train_samples)
        answers = answer_list(train_samples)
        max_len = question_limit(train_samples)
        model = QGMRN(get_config(cfg.preset, vocab_size=len(vocab), num_answers=len(answers),
                                 **(model_overrides or {})))
    mcfg = model.cfg
    cfg = resolve_lr(cfg, mcfg)
    size = mcfg.image_size
    caches = []
    for samples, name in zip((train_samples, data.val), data.names):
        images = [s.image for s in samples]
        cache = open_cache(data.cache_dir, name, size, images, build=rank == 0, log=say)
        if dist.is_initialized():
            dist.barrier()
            cache = cache or open_cache(data.cache_dir, name, size, images, build=False)
        caches.append(cache)
    train_ds = VQADataset(train_samples, vocab, answers, size, caches[0])
    val_subset = data.val[:cfg.max_val] if cfg.max_val else data.val
    val_ds = VQADataset(val_subset, vocab, answers, size, caches[1])
    if rank == 0:
        warn_about_val(val_subset, vocab, answers, say)

    model.to(device)
    amp_dtype = training_precision(cfg, device)
    channels_last = device.type == "cuda" or amp_dtype is not None     # faster for both there
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    per_epoch = len(train_ds) // (cfg.batch_size * world)
    if per_epoch == 0:
        raise DataError(f"{len(train_ds)} training questions cannot fill one batch of "
                        f"{cfg.batch_size} on {world} process(es)")
    total = cfg.steps if cfg.steps > 0 else cfg.epochs * per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    step, seconds = 0, 0.0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        step, seconds = resume_state["step"], float(resume_state.get("train_seconds", 0.0))
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    return Run(cfg, model, ddp, optimizer, scheduler, vocab, answers, max_len, train_ds, val_ds,
               build_curriculum(cfg, train_samples), device, amp_dtype, channels_last, rank, world,
               per_epoch, total, step, seconds)


class Reporter:
    """metrics.jsonl, the tqdm bar on a terminal, and a plain progress line every ~30 s elsewhere
    (logs, CI, nohup)."""

    def __init__(self, run: Run, path: Path, ckpt_path: Path, say):
        self.run, self.say, self.ckpt_path = run, say, ckpt_path
        self.file = open(path, "a") if run.main else None
        self.bar = None
        self.plain = run.main and not sys.stderr.isatty()
        if run.main and not self.plain:
            from tqdm import tqdm
            self.bar = tqdm(total=run.total, initial=run.step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self.last_line = time.monotonic()
        self.latest: dict = {}
        self.start_step = run.step
        self.t_start = time.monotonic()

    def write(self, rec: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def step_done(self, rec: dict | None) -> None:
        run = self.run
        if rec is not None:
            self.latest = rec
            self.write(rec)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", lr=f"{rec['lr']:.1e}",
                                     exec=f"{rec['exec_ratio']:.2f}", sps=f"{rec['samples_per_s']:.0f}")
        if self.bar is not None:
            self.bar.update(1)
        elif self.plain and time.monotonic() - self.last_line >= run.cfg.progress_every and self.latest:
            self.last_line = time.monotonic()
            done = run.step - self.start_step
            rate = done / max(1e-9, time.monotonic() - self.t_start)
            eta = (run.total - run.step) / max(rate, 1e-9)
            r = self.latest
            print(f"step {run.step}/{run.total} ({100 * run.step / run.total:.1f}%)  loss {r['loss']:.3f}  "
                  f"acc {r['acc']:.3f}  {r['samples_per_s']:.0f} samples/s  ETA {_hms(eta)}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def validate_now(run: Run, reporter: Reporter, say, label: str) -> dict:
    """Stage 4: evaluate on the val split (rank 0), logged with samples and training seconds."""
    res = evaluate_model(run.model, run.val_ds, 256, run.device)
    reporter.write({"step": run.step, "split": "val", "samples": run.step * run.cfg.batch_size * run.world,
                    "train_seconds": round(run.train_seconds, 1),
                    **{k: v for k, v in public(res).items() if k in ("overall", "per_type", "per_subtype")}})
    say(f"\n{label}: val accuracy {res['overall']:.3f} "
        + " ".join(f"{k}={v:.3f}" for k, v in res["per_type"].items()))
    return res


def batches_from(run: Run) -> tuple[DataLoader, bool]:
    """The sample order from the current step to the end of its epoch (or curriculum chunk)."""
    cfg = run.cfg
    in_curriculum = run.curriculum is not None and run.curriculum.active(run.step)
    if in_curriculum:
        mine, _ = run.curriculum.plan(run.step, cfg.batch_size, run.rank, run.world)
    else:
        epoch, offset = divmod(run.step, run.per_epoch)
        order = torch.randperm(len(run.train_ds), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        mine = order[run.rank::run.world][:run.per_epoch * cfg.batch_size][offset * cfg.batch_size:].tolist()
    loader = DataLoader(Subset(run.train_ds, mine), batch_size=cfg.batch_size, shuffle=False,
                        collate_fn=collate, num_workers=cfg.workers, drop_last=True)
    return loader, in_curriculum


def train_one_epoch(run: Run, reporter: Reporter, save, stop: dict, noise: torch.Generator, say) -> None:
    """Stage 3: steps until the epoch (or curriculum chunk) ends, the run ends, or a signal."""
    cfg, mcfg = run.cfg, run.model.cfg
    loader, in_curriculum = batches_from(run)
    acc = torch.zeros(5, dtype=torch.float64, device=run.device)   # loss*n, correct, n, exec*n, load*n
    t0 = mark = time.perf_counter()
    run.ddp.train()
    for image, tokens, lengths, labels in loader:
        # Noise seeded per step and rank: a resumed run draws exactly the same gates.
        noise.manual_seed((cfg.seed * 1_000_003 + run.step) * 64 + run.rank)
        image, tokens, lengths, labels = (image.to(run.device, non_blocking=True), tokens.to(run.device),
                                          lengths.to(run.device), labels.to(run.device))
        if run.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            output = run.ddp(image, tokens, lengths)
            vqa = F.cross_entropy(output.logits.float(), labels)
            lb = load_balancing_loss(output.gates.float(), mcfg.layer_sizes)
            loss = vqa + cfg.load_weight * lb
        # One host sync per step: the non-finite check must precede the update, and every
        # rank must agree on stopping. Metrics accumulate on the device.
        nonfinite, stopping = _all_sum(torch.stack([
            (~torch.isfinite(loss.detach())).float(),
            loss.new_tensor(float(stop["signal"] is not None))])).tolist()
        if nonfinite > 0:
            kept = (f"The last good checkpoint is kept at {reporter.ckpt_path}" if reporter.ckpt_path.exists()
                    else "No checkpoint was written yet")
            raise TrainingStopped(f"non-finite loss at step {run.step} (loss {loss.item()}); stopping. "
                                  f"{kept}; try a lower --lr.", 3)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        run.step += 1
        n = labels.shape[0]
        with torch.no_grad():
            acc += torch.stack([loss.detach().float() * n, (output.logits.argmax(1) == labels).sum().float(),
                                loss.new_tensor(float(n)), output.gates.float().sum() / sum(mcfg.layer_sizes),
                                lb.detach().float() * n]).double()
        rec = None
        if run.step % cfg.log_every == 0 or run.step == run.total:
            tot = _all_sum(acc.clone()).tolist()
            now = time.perf_counter()
            rec = {"step": run.step, "epoch": run.step / run.per_epoch, "loss": tot[0] / tot[2],
                   "acc": tot[1] / tot[2], "exec_ratio": tot[3] / tot[2], "load_loss": tot[4] / tot[2],
                   "lr": run.scheduler.get_last_lr()[0], "samples_per_s": tot[2] / (now - t0)}
            acc.zero_()
            t0 = now
        run.train_seconds += time.perf_counter() - mark
        mark = time.perf_counter()
        if run.main:
            reporter.step_done(rec)
        if stopping > 0:
            save()
            sig = stop["signal"] or signal.SIGTERM
            raise TrainingStopped(f"stopped by {signal.Signals(sig).name} at step {run.step}; "
                                  f"resume with --resume --out {Path(cfg.out)}", 128 + int(sig))
        if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < run.total and run.main:
            validate_now(run, reporter, say, f"step {run.step}")
            t0 = mark = time.perf_counter()
        if run.step % cfg.save_every == 0:
            save()
        if run.step >= run.total or (in_curriculum and not run.curriculum.active(run.step)):
            break
        mark = time.perf_counter()


def finish(run: Run, out: Path, save, baseline: dict, say) -> dict:
    """Stage 5: final checkpoint with its evaluation, eval.json, the table."""
    if dist.is_initialized():
        # DDP broadcasts BatchNorm statistics at the start of each forward, so after the last
        # step each rank holds its own; make every rank end with rank 0's (the checkpoint's).
        for buf in run.model.buffers():
            dist.broadcast(buf, 0)
    if not run.main:
        return {}
    final = {**public(run.result), "majority_baseline": baseline}
    save(final)
    write_atomic(out / "eval.json", json.dumps(final, indent=2))
    say(format_table(run.result))
    say(f"majority-answer baseline: overall {baseline['overall']:.3f}; per-type majority "
        + " ".join(f"{k}={v:.3f}" for k, v in baseline["per_type_majority"].items()))
    say(f"checkpoint: {out / 'ckpt.pt'}")
    return final


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Nothing a user made is replaced without --overwrite: a folder holding a run is continued
    with --resume or replaced with --overwrite."""
    ckpt = out / "ckpt.pt"
    if resume or not ckpt.exists():
        return
    if not overwrite:
        raise SettingsError(f"{out} already holds a training run ({ckpt}); continue it with --resume "
                            f"--out {out}, or pass --overwrite to start over there")
    for name in ("ckpt.pt", "metrics.jsonl", "eval.json", "config.json"):
        (out / name).unlink(missing_ok=True)


# -- the loop ------------------------------------------------------------------------------------
def train(cfg: TrainConfig, model_overrides: dict | None = None, resume: str | None = None,
          init_from: str | None = None, log=print, on_finish=None, overwrite: bool = False,
          given: dict | None = None) -> dict:
    """Train; returns the final evaluation. Raises TrainingStopped on a signal or a non-finite loss
    (after keeping a resumable checkpoint, resp. the last good one), SettingsError for settings
    that contradict a resumed run or cannot work. on_finish(model) is called on every rank when
    training completes.

    With `resume`, the run's settings come from its checkpoint; of `cfg` only the fields a caller
    chose (`given`, default: those that differ from TrainConfig's defaults) apply, and only those
    a resumed run may change (RESUME_MAY_CHANGE)."""
    model_overrides = dict(model_overrides or {})
    resume_state = None
    if resume:
        resume_state = load_checkpoint(resume)
        if model_overrides:
            raise SettingsError(f"--resume continues the model in {resume}; model settings "
                                f"{sorted(model_overrides)} cannot change it")
        chosen = dict(given if given is not None else given_fields(cfg))
        chosen.setdefault("out", str(Path(resume).parent))
        cfg = restore_config(resume_state.get("train_config") or {}, chosen, resume)
    else:
        cfg = validate(cfg)
        if init_from and model_overrides:
            raise SettingsError(f"--init-from takes the model from {init_from}; model settings "
                                f"{sorted(model_overrides)} cannot change it")
        if model_overrides:
            model_overrides = validate_model_overrides(cfg.preset, model_overrides)
        else:
            get_config(cfg.preset)                                     # unknown presets fail here
    rank, world, device = _dist_setup()
    main_rank = rank == 0
    say = log if main_rank else (lambda *a, **k: None)
    out = Path(cfg.out)
    saved = (resume_state or {}).get("train_config") or {}
    if resume_state is not None and "total_steps" in resume_state and resume_state["step"] >= \
            resume_state["total_steps"] and (cfg.steps, cfg.epochs) == (saved.get("steps"), saved.get("epochs")):
        say(_finished_message(resume_state, out))
        return dict(resume_state.get("metrics") or {})
    if main_rank:
        check_out_dir(out, resume_state is not None, overwrite)
    torch.manual_seed(cfg.seed)

    data = resolve_data(cfg, main_rank, say)
    cfg = data.cfg
    run = build_or_restore(cfg, data, resume_state, init_from, model_overrides, device, rank, world, say)
    cfg = run.cfg
    if resume_state is not None:
        if run.step >= run.total:
            say(_finished_message(resume_state, out))
            return dict(resume_state.get("metrics") or {})
        say(f"resumed from {resume} at step {run.step} of {run.total}")
    mcfg = run.model.cfg
    n_params = sum(p.numel() for p in run.model.parameters())
    say(f"model: {cfg.preset if not init_from and resume_state is None else 'from checkpoint'} ({mcfg.arch}, "
        f"{n_params / 1e6:.2f} M parameters, routing {mcfg.num_layers} x {mcfg.max_modules}), "
        f"{len(run.train_ds)} train / {len(run.val_ds)} val questions, {len(run.vocab)} words, "
        f"{len(run.answers)} answers, device {device} ({'bf16 autocast' if run.amp_dtype else 'float32'}), "
        f"{world} process(es), {run.total} steps")
    ckpt_path = out / "ckpt.pt"
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale(out, "ckpt.pt.*.tmp", max_age_s=60)   # a killed save's temp file
        write_atomic(out / "config.json", json.dumps({"train": dataclasses.asdict(cfg), "model": mcfg.to_dict()},
                                                     indent=2))
    val_subset = run.val_ds.samples
    baseline = majority_baseline(data.train, val_subset) if main_rank else {}

    def save(metrics=None):
        if main_rank:
            try:
                save_checkpoint(ckpt_path, model=run.model, vocab=run.vocab.tokens, answers=run.answers,
                                max_question_len=run.max_len, train_config=dataclasses.asdict(cfg),
                                optimizer=run.optimizer, scheduler=run.scheduler, step=run.step,
                                epoch=run.step // run.per_epoch, metrics=metrics or {},
                                train_seconds=run.train_seconds, total_steps=run.total)
            except OSError as e:
                raise TrainingStopped(f"cannot write the checkpoint {ckpt_path} ({e.strerror or e}); "
                                      "the last good one is kept. Free space or choose another --out", 1) from e

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():      # signals reach the main thread only
        old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    reporter = Reporter(run, out / "metrics.jsonl", ckpt_path, say)
    noise = torch.Generator(device=device)
    run.model.router.noise_generator = noise
    result: dict = {}
    try:
        while run.step < run.total:
            in_curriculum = run.curriculum is not None and run.curriculum.active(run.step)
            train_one_epoch(run, reporter, save, stop, noise, say)
            end_of_epoch = not in_curriculum and cfg.eval_every_epoch and run.step % run.per_epoch == 0
            if end_of_epoch or run.step >= run.total:
                if main_rank:
                    label = "final" if run.step >= run.total else f"epoch {run.step / run.per_epoch:.1f}"
                    run.result = validate_now(run, reporter, say, label)
                if dist.is_initialized():
                    dist.barrier()
        result = finish(run, out, save, baseline, say)
        if on_finish is not None:
            on_finish(run.model)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        reporter.close()
        run.model.router.noise_generator = None
    return result


def _finished_message(state: dict, out: Path) -> str:
    m = state.get("metrics") or {}
    acc = f" (val accuracy {m['overall']:.3f})" if "overall" in m else ""
    return (f"the run in {out} is finished at step {state['step']}{acc}; nothing was changed. To train "
            f"longer, resume with more --epochs or --steps (more than {state['step']})")


# -- CLI -------------------------------------------------------------------------------------------
FLAGS = (("data_root", "data_root"), ("jsonl", "jsonl"), ("humans", "humans"), ("preset", "preset"),
         ("epochs", "epochs"), ("steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"), ("out", "out"),
         ("cache_dir", "cache_dir"), ("workers", "workers"))


def parse_args(argv=None):
    """(TrainConfig, model overrides, the fields the command line chose, namespace). One mapping:
    defaults < --config file < --set < named flags; every value typed by its field's annotation
    and validated before any work starts."""
    ap = argparse.ArgumentParser(prog="python -m qgmrn.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON file: TrainConfig fields, and model overrides under \"model\"")
    ap.add_argument("--data-root", help="CLEVR v1.0 layout (generated or the real download)")
    ap.add_argument("--jsonl", nargs=2, metavar=("TRAIN", "VAL"), help="own data as JSON lines")
    ap.add_argument("--humans", nargs=2, metavar=("TRAIN", "VAL"), help="CLEVR-Humans files (images from --data-root)")
    ap.add_argument("--preset", help="brn-c8, brn-c16, brn-c32, frn, small, ... with optional +attn")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--out")
    ap.add_argument("--cache-dir", help="image cache directory (default: beside the data, or ~/.cache/qgmrn "
                                        "when the data is read-only)")
    ap.add_argument("--workers", type=int, help="DataLoader processes")
    ap.add_argument("--resume", nargs="?", const="auto",
                    help="continue the run in --out (or the checkpoint given) with its own settings")
    ap.add_argument("--init-from", help="start from a checkpoint's weights (fine-tuning)")
    ap.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TrainConfig or model config field, e.g. --set load_weight=0.1 "
                         "--set block_norm=batch (repeatable)")
    a = ap.parse_args(argv)
    if a.resume and a.init_from:
        ap.error("--resume and --init-from exclude each other")
    train_fields = field_types(TrainConfig)
    chosen: dict = {}
    model_overrides: dict = {}
    try:
        if a.config:
            try:
                data = json.loads(Path(a.config).read_text())
            except OSError as e:
                raise SettingsError(f"--config {a.config}: {e.strerror or e}") from e
            except json.JSONDecodeError as e:
                raise SettingsError(f"--config {a.config}: not valid JSON ({e})") from e
            if not isinstance(data, dict):
                raise SettingsError(f"--config {a.config}: expected a JSON object, got {type(data).__name__}")
            data = dict(data)
            data.setdefault("recipe", Path(a.config).name)
            model_overrides.update(typed(ModelConfig, data.pop("model", {}), f"--config {a.config} model"))
            chosen.update(typed(TrainConfig, data, f"--config {a.config}"))
        for item in a.set:
            key, raw = split_assignment(item)
            if key in train_fields:
                chosen.update(typed(TrainConfig, {key: raw}, "--set"))
            else:
                model_overrides.update(typed(ModelConfig, {key: raw}, "--set"))
        for attr, name in FLAGS:
            value = getattr(a, attr)
            if value is not None:
                chosen[name] = tuple(value) if isinstance(value, list) else value
        cfg = TrainConfig(**chosen)                  # ranges are checked by train(), before any work
    except SettingsError as e:
        ap.error(str(e))
    return cfg, model_overrides, chosen, a


def main(argv=None) -> int:
    cfg, model_overrides, chosen, a = parse_args(argv)
    resume = a.resume
    if resume == "auto":
        resume = str(Path(cfg.out) / "ckpt.pt")
    try:
        train(cfg, model_overrides, resume=resume, init_from=a.init_from, overwrite=a.overwrite,
              given=chosen if resume else None)
    except TrainingStopped as e:
        print(f"\n{e}", file=sys.stderr)
        return e.code
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
