"""Train QGMRN (paper 4.2: Adam 3e-4, betas 0.9/0.999, batch 64, linear warmup from 3e-6).

    python -m qgmrn.train                         # built-in generated CLEVR-style data, CPU preset
    python -m qgmrn.train --data-root CLEVR_v1.0 --preset brn-c32 --epochs 20
    python -m qgmrn.train --jsonl train.jsonl val.jsonl --preset small
    python -m qgmrn.train --init-from runs/clevr/ckpt.pt --data-root CLEVR_v1.0 \\
        --humans CLEVR-Humans-train.json CLEVR-Humans-val.json        # fine-tune on CLEVR-Humans
    torchrun --nproc_per_node=8 -m qgmrn.train --data-root CLEVR_v1.0 --preset frn
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path

from ..extras import require

require("torch", "training (python -m qgmrn.train)", cli_only=True)   # a base install: one line

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..files import os_error_line, remove_stale, write_atomic
from ..config import get_config
from ..data.datasets import collate
from ..data.sources import DataError, majority_baseline
from ..evaluate import evaluate_model, format_table, public
from ..routing import format_routing_use, load_balancing_loss, target_rate_loss
from ..settings import SettingsError
from .cli import parse_args
from .data import resolve_data
from .hardware import _all_sum, _dist_setup, cpu_has_amx_bf16, cpu_has_bf16, training_precision
from .report import Reporter
from .resume import (RunFolderLock, _finished_message, absolute_paths, check_out_dir, check_resumable, given_fields,
                     replace_run, restore_config, restore_model_overrides, trim_metrics)
from .run import Run, build_or_restore, planned_steps
from .schedule import lr_lambda, resolve_lr
from .settings import TrainConfig, TrainingStopped, validate, validate_model_overrides

__all__ = ["TrainConfig", "TrainingStopped", "train", "train_one_epoch", "main", "parse_args", "lr_lambda",
           "resolve_lr", "cpu_has_amx_bf16", "cpu_has_bf16", "training_precision"]

def validate_now(run: Run, reporter: Reporter, say, label: str) -> dict:
    """Stage 4: evaluate on the val split (rank 0), logged with samples and training seconds."""
    res = evaluate_model(run.model, run.val_ds, 256, run.device)
    use = res.get("routing", {}).get("use", {})
    reporter.write({"step": run.step, "split": "val", "samples": run.step * run.cfg.batch_size * run.world,
                    "train_seconds": round(run.train_seconds, 1),
                    **{k: v for k, v in public(res).items() if k in ("overall", "per_type", "per_subtype")},
                    **({"routing": use} if use else {})})
    say(f"\n{label}: val accuracy {res['overall']:.3f} "
        + " ".join(f"{k}={v:.3f}" for k, v in res["per_type"].items()))
    if use:
        say(format_routing_use(use))
    reporter.draw()
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


def training_loss(cfg: TrainConfig, layer_sizes, output, aux, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a step minimises: the answer's cross-entropy + load balancing (paper section 3.5) + the
    training-only scene and where losses and target execution rate, each with its weight; returns
    (loss, load-balancing term)."""
    vqa = F.cross_entropy(output.logits.float(), labels)
    lb = load_balancing_loss(output.gates.float(), layer_sizes)
    loss = (vqa + cfg.load_weight * lb + cfg.scene_weight * aux.scene + cfg.where_weight * aux.where
            + cfg.count_weight * aux.count)
    if cfg.exec_target:
        loss = loss + cfg.exec_weight * target_rate_loss(output.gates.float(), layer_sizes, cfg.exec_target)
    return loss, lb


def train_one_epoch(run: Run, reporter: Reporter, save, stop: dict, noise: torch.Generator, say) -> None:
    """Stage 3: steps until the epoch (or curriculum chunk) ends, the run ends, or a signal."""
    cfg, mcfg = run.cfg, run.model.cfg
    loader, in_curriculum = batches_from(run)
    # loss*n, correct, n, exec*n, load*n, scene*n, where*n, count*n
    acc = torch.zeros(8, dtype=torch.float64, device=run.device)
    t0 = mark = time.perf_counter()
    run.ddp.train()
    for image, tokens, lengths, labels, *targets in loader:
        # Noise seeded per step and rank: a resumed run draws exactly the same gates.
        noise.manual_seed((cfg.seed * 1_000_003 + run.step) * 64 + run.rank)
        image, tokens, lengths, labels = (image.to(run.device, non_blocking=True), tokens.to(run.device),
                                          lengths.to(run.device), labels.to(run.device))
        target = targets[0].to(run.device) if targets else None
        if run.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            output, aux = run.ddp(image, tokens, lengths, target, labels)
            loss, lb = training_loss(cfg, mcfg.layer_sizes, output, aux, labels)
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
                                lb.detach().float() * n, aux.scene.detach().float() * n,
                                aux.where.detach().float() * n, aux.count.detach().float() * n]).double()
        rec = None
        if run.step % cfg.log_every == 0 or run.step == run.total:
            tot = _all_sum(acc.clone()).tolist()
            now = time.perf_counter()
            rec = {"step": run.step, "epoch": run.step / run.per_epoch, "loss": tot[0] / tot[2],
                   "acc": tot[1] / tot[2], "exec_ratio": tot[3] / tot[2], "load_loss": tot[4] / tot[2],
                   "lr": run.scheduler.get_last_lr()[0], "samples_per_s": tot[2] / (now - t0)}
            if run.heads is not None:
                rec.update(scene_loss=tot[5] / tot[2], where_loss=tot[6] / tot[2])
                if cfg.count_weight:
                    rec["count_loss"] = tot[7] / tot[2]
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
    cfg, model_overrides, resume_state = settle_settings(cfg, model_overrides, resume, init_from, given)
    rank, world, device = _dist_setup()
    main_rank = rank == 0
    say = log if main_rank else (lambda *a, **k: None)
    out = Path(cfg.out)
    # --overwrite locks the folder before it removes the run there (a live run is refused first)
    lock = check_out_dir(out, resume if resume_state is not None else None, overwrite) if main_rank else None
    try:
        torch.manual_seed(cfg.seed)
        data = resolve_data(cfg, main_rank, say)
        if resume_state is not None:
            total = planned_steps(data.cfg, len(data.train), world)[1]
            if resume_state["step"] >= total:
                say(_finished_message(resume_state, out))          # nothing to do: nothing is touched
                return dict(resume_state.get("metrics") or {})
            say(f"resumed from {resume} at step {resume_state['step']} of {total}")
        run = build_or_restore(data.cfg, data, resume_state, init_from, model_overrides, device, rank, world, say)
        say(describe(run, "from checkpoint" if init_from or resume_state is not None else run.cfg.preset))
        if main_rank:
            replace_run(out, lock)                 # --overwrite: the new run starts, the old one goes
        if main_rank and lock is None:
            out.mkdir(parents=True, exist_ok=True)
            lock = RunFolderLock(out)
        if main_rank:
            # a killed save's temp files: the folder's lock is ours, so no live writer owns them
            for pattern in ("ckpt.pt.*.tmp", ".*.tmp"):
                remove_stale(out, pattern, max_age_s=-1)
            trim_metrics(out / "metrics.jsonl", run.step if resume_state is not None else None)
            write_atomic(out / "config.json", json.dumps({"train": dataclasses.asdict(run.cfg),
                                                          "model": run.model.cfg.to_dict()}, indent=2))
        baseline = majority_baseline(data.train, run.val_ds.samples) if main_rank else {}
        result = train_run(run, out, baseline, say)
        if on_finish is not None:
            on_finish(run.model)
    finally:
        if lock is not None:
            lock.release()
    return result


def train_run(run: Run, out: Path, baseline: dict, say) -> dict:
    """The epochs, then the final checkpoint and evaluation; a signal saves and stops."""
    ckpt_path = out / "ckpt.pt"
    save = checkpoint_writer(run, ckpt_path)
    reporter = Reporter(run, out / "metrics.jsonl", ckpt_path, say)
    noise = torch.Generator(device=run.device)
    run.model.router.noise_generator = noise
    try:
        with stop_on_signals() as stop:
            run_epochs(run, reporter, save, stop, noise, say)
            return finish(run, out, save, baseline, say)
    finally:
        reporter.close()
        run.model.router.noise_generator = None


def run_epochs(run: Run, reporter: Reporter, save, stop: dict, noise: torch.Generator, say) -> None:
    """Epochs (or curriculum chunks) until the run ends, evaluating where the settings ask."""
    while run.step < run.total:
        in_curriculum = run.curriculum is not None and run.curriculum.active(run.step)
        train_one_epoch(run, reporter, save, stop, noise, say)
        end_of_epoch = not in_curriculum and run.cfg.eval_every_epoch and run.step % run.per_epoch == 0
        if end_of_epoch or run.step >= run.total:
            if run.main:
                label = "final" if run.step >= run.total else f"epoch {run.step / run.per_epoch:.1f}"
                run.result = validate_now(run, reporter, say, label)
            if dist.is_initialized():
                dist.barrier()


def settle_settings(cfg: TrainConfig, model_overrides, resume, init_from, given):
    """(settings, model overrides, resumed checkpoint or None), checked before any work starts."""
    model_overrides = dict(model_overrides or {})
    if resume:
        resume_state = load_checkpoint(resume)
        check_resumable(resume_state, resume)
        if model_overrides:
            restore_model_overrides(model_overrides, resume_state["model_config"], resume)
        chosen = dict(given if given is not None else given_fields(cfg))
        chosen.setdefault("out", str(Path(resume).parent))
        cfg = absolute_paths(restore_config(resume_state.get("train_config") or {}, chosen, resume))
        return cfg, {}, resume_state
    cfg = absolute_paths(validate(cfg))
    if init_from and model_overrides:
        raise SettingsError(f"--init-from takes the model from {init_from}; model settings "
                            f"{sorted(model_overrides)} cannot change it")
    if model_overrides:
        model_overrides = validate_model_overrides(cfg.preset, model_overrides)
    else:
        get_config(cfg.preset)                                     # unknown presets fail here
    return cfg, model_overrides, None


def describe(run: Run, origin: str) -> str:
    mcfg = run.model.cfg
    n_params = sum(p.numel() for p in run.model.parameters())
    return (f"model: {origin} ({mcfg.arch}, {n_params / 1e6:.2f} M parameters, routing {mcfg.num_layers} x "
            f"{mcfg.max_modules}), {len(run.train_ds)} train / {len(run.val_ds)} val questions, "
            f"{len(run.vocab)} words, {len(run.answers)} answers, device {run.device} "
            f"({'bf16 autocast' if run.amp_dtype else 'float32'}), {run.world} process(es), {run.total} steps")


def checkpoint_writer(run: Run, ckpt_path: Path):
    """save(metrics=None): the resumable checkpoint, written atomically by rank 0."""
    def save(metrics=None):
        if not run.main:
            return
        try:
            save_checkpoint(ckpt_path, model=run.model, vocab=run.vocab.tokens, answers=run.answers,
                            max_question_len=run.max_len, train_config=dataclasses.asdict(run.cfg),
                            optimizer=run.optimizer, scheduler=run.scheduler, step=run.step,
                            epoch=run.step // run.per_epoch, metrics=metrics or {},
                            train_seconds=run.train_seconds, total_steps=run.total,
                            supervision=run.heads.state_dict() if run.heads is not None else None)
        except OSError as e:
            raise TrainingStopped(f"cannot write the checkpoint {ckpt_path} ({e.strerror or e}); "
                                  "the last good one is kept. Free space or choose another --out", 1) from e
    return save


@contextlib.contextmanager
def stop_on_signals():
    """{"signal": None}, set by SIGINT/SIGTERM; the loop saves and stops at the next step."""
    stop: dict = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():      # signals reach the main thread only
        old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)


# -- CLI -------------------------------------------------------------------------------------------
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
    except OSError as e:                          # an --out that is a file, read-only, full, ...
        print(f"error: {os_error_line(e, cfg.out)}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
