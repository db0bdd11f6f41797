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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import ModelConfig, get_config, parse_override
from .data.datasets import VQADataset, collate
from .data.prepare import DEFAULT_CACHE, ImageCache, prepare
from .data.sources import DataError, answer_list, load_clevr, load_humans, load_jsonl, majority_baseline
from .evaluate import evaluate_model, format_table, public
from .model import QGMRN, grow_model
from .preprocess import Vocab, tokenize
from .routing import load_balancing_loss


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
    load_weight: float = 0.01                # lambda of the load-balancing loss (eq. 13)
    seed: int = 0
    out: str = "runs/qgmrn"
    save_every: int = 500                    # steps between checkpoints
    log_every: int = 20
    eval_every_epoch: bool = True
    max_val: int = 0                         # evaluate on at most this many val questions (0: all)
    workers: int = 0                         # DataLoader processes
    generate_images: int = 5000              # size of the built-in dataset (train images)
    precision: str = "auto"                  # "auto": bf16 autocast on CUDA and on CPUs with AMX-BF16
                                             # (about 1.6x the samples/s there); "fp32": never


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


# -- data ------------------------------------------------------------------------------------
def load_splits(cfg: TrainConfig) -> tuple[list, list, str | None]:
    """(train samples, val samples, cache dir) for the configured source."""
    if cfg.jsonl:
        if len(cfg.jsonl) != 2:
            raise DataError("--jsonl takes two files: train and val")
        return load_jsonl(cfg.jsonl[0]), load_jsonl(cfg.jsonl[1]), str(Path(cfg.jsonl[0]).parent / DEFAULT_CACHE)
    if cfg.humans:
        if len(cfg.humans) != 2 or not cfg.data_root:
            raise DataError("--humans takes train and val files and needs --data-root for the images")
        root = Path(cfg.data_root)
        return (load_humans(cfg.humans[0], root / "images" / "train"),
                load_humans(cfg.humans[1], root / "images" / "val"), None)
    return load_clevr(cfg.data_root, "train"), load_clevr(cfg.data_root, "val"), str(Path(cfg.data_root) / DEFAULT_CACHE)


def _cache(cache_dir, name, size, samples, build: bool):
    if cache_dir is None:
        return None
    cache = ImageCache.find(cache_dir, name, size)
    if cache is not None and cache.covers(s.image for s in samples):
        return cache
    if not build:
        return None
    prepare([s.image for s in samples], cache_dir, name, size)
    return ImageCache(cache_dir, name, size)


# -- model set-up ------------------------------------------------------------------------------
def resolve_lr(cfg: TrainConfig, mcfg: ModelConfig) -> TrainConfig:
    """Unless given: the paper's 3e-4, or 1e-3 for CPU-sized models (input <= 96 px), which
    learn faster with it in the few epochs a CPU affords."""
    if cfg.lr is not None:
        return cfg
    return dataclasses.replace(cfg, lr=1e-3 if mcfg.image_size <= 96 else 3e-4)


def lr_lambda(cfg: TrainConfig):
    start = cfg.warmup_start_lr / cfg.lr

    def factor(step: int) -> float:               # linear warmup from 3e-6, then constant (paper 4.2)
        if cfg.warmup_steps <= 0 or step >= cfg.warmup_steps:
            return 1.0
        return start + (1.0 - start) * step / cfg.warmup_steps
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


# -- the loop ------------------------------------------------------------------------------------
def train(cfg: TrainConfig, model_overrides: dict | None = None, resume: str | None = None,
          init_from: str | None = None, log=print, on_finish=None) -> dict:
    """Train; returns the final evaluation. Raises TrainingStopped on a signal or a non-finite loss
    (after keeping a resumable checkpoint, resp. the last good one). on_finish(model) is called on
    every rank when training completes."""
    rank, world, device = _dist_setup()
    main_rank = rank == 0
    say = log if main_rank else (lambda *a, **k: None)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)

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
    train_samples, val_samples, cache_dir = load_splits(cfg)

    resume_state = load_checkpoint(resume) if resume else None
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
    build_cache = main_rank
    train_cache = _cache(cache_dir, "train", mcfg.image_size, train_samples, build_cache)
    val_cache = _cache(cache_dir, "val", mcfg.image_size, val_samples, build_cache)
    if dist.is_initialized():
        dist.barrier()
        train_cache = train_cache or _cache(cache_dir, "train", mcfg.image_size, train_samples, False)
        val_cache = val_cache or _cache(cache_dir, "val", mcfg.image_size, val_samples, False)
    train_ds = VQADataset(train_samples, vocab, answers, mcfg.image_size, train_cache)
    val_subset = val_samples[:cfg.max_val] if cfg.max_val else val_samples
    val_ds = VQADataset(val_subset, vocab, answers, mcfg.image_size, val_cache)

    model.to(device)
    amp_dtype = training_precision(cfg, device)
    channels_last = device.type == "cuda" or amp_dtype is not None     # faster for both there
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    step = 0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        step = resume_state["step"]
        say(f"resumed from {resume} at step {step}")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    noise = torch.Generator(device=device)
    model.router.noise_generator = noise

    per_epoch = len(train_ds) // (cfg.batch_size * world)
    if per_epoch == 0:
        raise DataError(f"{len(train_ds)} training questions cannot fill one batch of "
                        f"{cfg.batch_size} on {world} process(es)")
    total = cfg.steps if cfg.steps > 0 else cfg.epochs * per_epoch
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {cfg.preset if not init_from and not resume else 'from checkpoint'} ({mcfg.arch}, "
        f"{n_params / 1e6:.2f} M parameters, routing {mcfg.num_layers} x {mcfg.max_modules}), "
        f"{len(train_ds)} train / {len(val_ds)} val questions, {len(vocab)} words, {len(answers)} answers, "
        f"device {device} ({'bf16 autocast' if amp_dtype else 'float32'}), {world} process(es), {total} steps")
    ckpt_path = out / "ckpt.pt"
    metrics_path = out / "metrics.jsonl"
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"train": dataclasses.asdict(cfg), "model": mcfg.to_dict()},
                                                    indent=2))
    baseline = majority_baseline(train_samples, val_subset) if main_rank else {}

    def save(metrics=None):
        if main_rank:
            save_checkpoint(ckpt_path, model=model, vocab=vocab.tokens, answers=answers, max_question_len=max_len,
                            train_config=dataclasses.asdict(cfg), optimizer=optimizer, scheduler=scheduler,
                            step=step, epoch=step // per_epoch, metrics=metrics or {})

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():      # signals reach the main thread only
        old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = None
    if main_rank:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=None, file=sys.stderr)
    metrics_file = open(metrics_path, "a") if main_rank else None
    result: dict = {}
    try:
        acc = torch.zeros(5, dtype=torch.float64, device=device)   # loss*n, correct, n, exec*n, load*n
        t0 = time.perf_counter()
        ddp.train()
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
            mine = order[rank::world][:per_epoch * cfg.batch_size][offset * cfg.batch_size:].tolist()
            loader = DataLoader(Subset(train_ds, mine), batch_size=cfg.batch_size, shuffle=False,
                                collate_fn=collate, num_workers=cfg.workers, drop_last=True)
            for image, tokens, lengths, labels in loader:
                # Noise seeded per step and rank: a resumed run draws exactly the same gates.
                noise.manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)
                image, tokens, lengths, labels = (image.to(device, non_blocking=True), tokens.to(device),
                                                  lengths.to(device), labels.to(device))
                if channels_last:
                    image = image.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    output = ddp(image, tokens, lengths)
                    vqa = F.cross_entropy(output.logits.float(), labels)
                    lb = load_balancing_loss(output.gates.float(), mcfg.layer_sizes)
                    loss = vqa + cfg.load_weight * lb
                # One host sync per step: the non-finite check must precede the update, and every
                # rank must agree on stopping. Metrics accumulate on the device.
                nonfinite, stopping = _all_sum(torch.stack([
                    (~torch.isfinite(loss.detach())).float(),
                    loss.new_tensor(float(stop["signal"] is not None))])).tolist()
                if nonfinite > 0:
                    raise TrainingStopped(f"non-finite loss at step {step} (loss {loss.item()}); stopping. "
                                          f"The last good checkpoint is kept at {ckpt_path}; try a lower --lr.", 3)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                n = labels.shape[0]
                with torch.no_grad():
                    acc += torch.stack([loss.detach().float() * n, (output.logits.argmax(1) == labels).sum().float(),
                                        loss.new_tensor(float(n)),
                                        output.gates.float().sum() / sum(mcfg.layer_sizes),
                                        lb.detach().float() * n]).double()
                if bar is not None:
                    bar.update(1)
                if step % cfg.log_every == 0 or step == total:
                    tot = _all_sum(acc.clone()).tolist()
                    elapsed = time.perf_counter() - t0
                    rec = {"step": step, "epoch": step / per_epoch, "loss": tot[0] / tot[2], "acc": tot[1] / tot[2],
                           "exec_ratio": tot[3] / tot[2], "load_loss": tot[4] / tot[2],
                           "lr": scheduler.get_last_lr()[0], "samples_per_s": tot[2] / elapsed}
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", lr=f"{rec['lr']:.1e}",
                                        exec=f"{rec['exec_ratio']:.2f}", sps=f"{rec['samples_per_s']:.0f}")
                        metrics_file.write(json.dumps(rec) + "\n")
                        metrics_file.flush()
                    acc.zero_()
                    t0 = time.perf_counter()
                if stopping > 0:
                    save()
                    sig = stop["signal"] or signal.SIGTERM
                    raise TrainingStopped(f"stopped by {signal.Signals(sig).name} at step {step}; "
                                          f"resume with --resume {ckpt_path}", 128 + int(sig))
                if step % cfg.save_every == 0:
                    save()
                if step >= total:
                    break
            if (cfg.eval_every_epoch and step % per_epoch == 0) or step >= total:
                if main_rank:
                    result = evaluate_model(model, val_ds, 256, device)
                    rec = {"step": step, "split": "val", **{k: v for k, v in public(result).items()
                                                            if k in ("overall", "per_type")}}
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                    say(f"\nepoch {step / per_epoch:.1f}: val accuracy {result['overall']:.3f} "
                        + " ".join(f"{k}={v:.3f}" for k, v in result["per_type"].items()))
                if dist.is_initialized():
                    dist.barrier()
                t0 = time.perf_counter()
        if dist.is_initialized():
            # DDP broadcasts BatchNorm statistics at the start of each forward, so after the last
            # step each rank holds its own; make every rank end with rank 0's (the checkpoint's).
            for buf in model.buffers():
                dist.broadcast(buf, 0)
        if main_rank:
            final = {**public(result), "majority_baseline": baseline}
            save(final)
            (out / "eval.json").write_text(json.dumps(final, indent=2))
            say(format_table(result))
            say(f"majority-answer baseline: overall {baseline['overall']:.3f}; per-type majority "
                + " ".join(f"{k}={v:.3f}" for k, v in baseline["per_type_majority"].items()))
            say(f"checkpoint: {ckpt_path}")
            result = final
        if on_finish is not None:
            on_finish(model)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
        model.router.noise_generator = None
    return result


# -- CLI -------------------------------------------------------------------------------------------
def parse_args(argv=None) -> tuple[TrainConfig, dict, argparse.Namespace]:
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
    ap.add_argument("--resume", nargs="?", const="auto", help="continue from a checkpoint (default: OUT/ckpt.pt)")
    ap.add_argument("--init-from", help="start from a checkpoint's weights (fine-tuning)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TrainConfig or model config field, e.g. --set load_weight=0.1 "
                         "--set block_norm=batch (repeatable)")
    a = ap.parse_args(argv)
    fields: dict = {}
    model_overrides: dict = {}
    if a.config:
        try:
            data = json.loads(Path(a.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            ap.error(f"--config {a.config}: {e}")
        model_overrides.update(data.pop("model", {}))
        fields.update(data)
    for key, value in (("data_root", a.data_root), ("jsonl", a.jsonl and tuple(a.jsonl)),
                       ("humans", a.humans and tuple(a.humans)), ("preset", a.preset), ("epochs", a.epochs),
                       ("steps", a.steps), ("batch_size", a.batch_size), ("lr", a.lr), ("out", a.out)):
        if value is not None:
            fields[key] = value
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in a.set:
        key = item.partition("=")[0]
        try:
            if key in train_fields:
                k, v = parse_override(item, TrainConfig)
                fields[k] = v
            else:
                k, v = parse_override(item, ModelConfig)
                model_overrides[k] = v
        except ValueError as e:
            ap.error(str(e))
    unknown = set(fields) - train_fields
    if unknown:
        ap.error(f"unknown training fields in --config: {sorted(unknown)}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return TrainConfig(**fields), model_overrides, a


def main(argv=None) -> int:
    cfg, model_overrides, a = parse_args(argv)
    resume = a.resume
    if resume == "auto":
        resume = str(Path(cfg.out) / "ckpt.pt")
    try:
        train(cfg, model_overrides, resume=resume, init_from=a.init_from)
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
