"""Resume rules: what a resumed run takes from its checkpoint and what the command line may still
change (RESUME_MAY_CHANGE; model settings only repeat the checkpoint's), when a folder holding a run may be reused, and what a finished run says."""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import socket
from pathlib import Path

from ..config import ModelConfig
from ..files import write_atomic, write_private
from ..settings import SettingsError, field_types, typed
from .settings import TrainConfig, validate

# What --resume may change: how long to train and how the run ends (the anneal is counted back from
# the last step, so it moves with `steps` anyway), how the run reports and reads; all else (data,
# preset, warmup, lr, batch size, seed, precision) comes from the checkpoint.
RESUME_MAY_CHANGE = ("epochs", "steps", "anneal_steps", "workers", "log_every", "save_every", "eval_every", "max_val",
                     "progress_every", "cache_dir", "out")


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
    for k in ("scene_weight", "where_weight", "exec_target"):   # runs from before these losses: without them
        cfg.setdefault(k, 0.0)
    cfg.setdefault("scene_gates", "question")                  # the scene loss's map before it was a setting
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


def check_resumable(state: dict, path) -> None:
    """What --resume needs of a checkpoint, checked before any work: one CheckpointError line for a
    tampered or truncated one, instead of a traceback mid-setup or a run that trains on nonsense."""
    from ..checkpoint import CheckpointError
    cfg = state.get("model_config") or {}

    def words(key):
        value = state.get(key)
        if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) for w in value):
            raise CheckpointError(f"{path}: its {key} is not a list of strings; it cannot be resumed")
        if len(set(value)) != len(value):
            raise CheckpointError(f"{path}: its {key} repeats entries; it cannot be resumed")
        return value
    vocab, answers = words("vocab"), words("answers")
    if len(vocab) != cfg.get("vocab_size"):
        raise CheckpointError(f"{path}: its vocabulary has {len(vocab)} words but its model embeds "
                              f"{cfg.get('vocab_size')}; it cannot be resumed")
    if len(answers) != cfg.get("num_answers"):
        raise CheckpointError(f"{path}: it has {len(answers)} answers but its model predicts "
                              f"{cfg.get('num_answers')}; it cannot be resumed")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: its step {step!r} is not a count of steps; it cannot be resumed")
    limit = state.get("max_question_len")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise CheckpointError(f"{path}: its question limit {limit!r} is not a positive integer")
    for key in ("optimizer", "scheduler"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path} holds no {key} state (a model-only or tampered checkpoint): it "
                                  "cannot be resumed; start from its weights with --init-from instead")
    if state.get("supervision") is not None and not isinstance(state["supervision"], dict):
        raise CheckpointError(f"{path}: its scene/where heads are not a set of weights; it cannot be resumed")
    _check_numbers(state, path, CheckpointError)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_numbers(state: dict, path, error) -> None:
    """The numbers a resumed run computes with: its settings, learning rates and clock."""
    if not isinstance(state.get("train_config", {}), dict):
        raise error(f"{path}: its train_config is not a set of settings; it cannot be resumed")
    groups = state["optimizer"].get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise error(f"{path}: its optimizer state has no parameter groups; it cannot be resumed")
    for g in groups:
        if not _finite(g.get("lr")) or g["lr"] < 0:
            raise error(f"{path}: its optimizer's learning rate {str(g.get('lr'))[:20]!r} is not a number "
                        "(a tampered checkpoint); it cannot be resumed")
    base = state["scheduler"].get("base_lrs", [])
    if not isinstance(base, list) or not all(_finite(x) and x >= 0 for x in base):
        raise error(f"{path}: its scheduler's base learning rates {str(base)[:40]} are not numbers; it cannot be resumed")
    if "train_seconds" in state and not (_finite(state["train_seconds"]) and state["train_seconds"] >= 0):
        raise error(f"{path}: its training time {str(state['train_seconds'])[:20]!r} is not a number of seconds; "
                    "it cannot be resumed")


def restore_model_overrides(overrides: dict, model_config: dict, resume) -> None:
    """On --resume, --set MODEL_FIELD=V may repeat the checkpoint's model (so the command that
    started a run continues it) but never change it: one line names each field that differs."""
    overrides = typed(ModelConfig, overrides, "model")
    saved = ModelConfig.from_dict(model_config)
    differ = [f"{k}={v!r} (the checkpoint has {getattr(saved, k)!r})"
              for k, v in sorted(overrides.items()) if v != getattr(saved, k)]
    if differ:
        raise SettingsError(f"--resume continues the model in {resume}; model settings cannot change it: "
                            + ", ".join(differ))


def _same_path(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def check_out_dir(out: Path, resume, overwrite: bool) -> "RunFolderLock | None":
    """Nothing a user made is replaced without --overwrite: a folder holding a run is continued
    with --resume (of its own checkpoint) or replaced with --overwrite. `resume`: the checkpoint a
    resumed run continues (None for a new run); continuing another folder's run into a folder that
    holds a run of its own replaces that run, so it needs --overwrite too. Replacing takes the
    folder's lock first (a live run there is refused) and returns it, held, to the caller with
    `replace` set: nothing is removed here. The caller removes the old run (replace_run) only once
    the new one is sure to start, so a mistake in the new command loses nothing."""
    ckpt = out / "ckpt.pt"
    # a new run may start where a killed one left no checkpoint; a resumed one never mixes with them
    held = [p for p in ((ckpt, out / "metrics.jsonl", out / "eval.json") if resume else (ckpt,)) if p.exists()]
    if not held or (resume and _same_path(resume, ckpt)):
        return None
    if not overwrite:
        if resume:
            raise SettingsError(f"--resume {resume} would continue that run into {out}, which holds another "
                                f"run ({held[0]}); give an empty --out, or --overwrite to replace the run there")
        raise SettingsError(f"{out} already holds a training run ({held[0]}); continue it with --resume "
                            f"--out {out}, or pass --overwrite to start over there")
    lock = RunFolderLock(out)
    lock.replace = True
    return lock


def replace_run(out: Path, lock: "RunFolderLock | None") -> None:
    """Remove the run that --overwrite replaces (check_out_dir said so through its lock), once the
    new run has its data, model and optimizer: only then is the new run sure to start."""
    if lock is not None and getattr(lock, "replace", False):
        _remove_run(out, out / "ckpt.pt")
        lock.replace = False


def _remove_run(out: Path, ckpt: Path) -> None:
    for name in ("ckpt.pt", "metrics.jsonl", "eval.json", "config.json"):
        (out / name).unlink(missing_ok=True)
    # an export of the replaced checkpoint, in the run folder or beside it, would answer for the new
    # run: it goes with the checkpoint it came from
    from export.bundle import bundle_files, default_out
    for stale in bundle_files(out) + bundle_files(default_out(ckpt)):
        stale.unlink(missing_ok=True)


def trim_metrics(path: Path, step: int | None) -> None:
    """metrics.jsonl as the run continues from `step`: rows a killed process wrote past its last
    checkpoint would appear twice, so they go; a new run (step None) starts the file afresh."""
    if step is None or not path.exists():
        path.unlink(missing_ok=True)
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue                              # a half-written last line of a killed process
    write_atomic(path, "".join(k + "\n" for k in kept))


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Data and cache paths as absolute paths: a run resumed from another directory reads the same
    files, and a path given again is compared with the stored one as the same folder."""
    def absolute(p):
        return str(Path(p).resolve()) if p else p
    return dataclasses.replace(cfg, data_root=absolute(cfg.data_root), cache_dir=absolute(cfg.cache_dir),
                               jsonl=tuple(absolute(p) for p in cfg.jsonl),
                               humans=tuple(absolute(p) for p in cfg.humans))


def _finished_message(state: dict, out: Path) -> str:
    m = state.get("metrics") or {}
    acc = f" (val accuracy {m['overall']:.3f})" if "overall" in m else ""
    return (f"the run in {out} is finished at step {state['step']}{acc}; nothing was changed. To train "
            f"longer, resume with more --epochs or --steps (more than {state['step']})")




class RunFolderLock:
    """One training process writes a run folder at a time: a second one (another --out typed the
    same, a --resume while the run goes on) stops with one line naming the holder, before it has
    written anything. The lock is the kernel's (flock on the folder), so a killed holder frees it."""
    PID_FILE = ".training"

    def __init__(self, out: Path):
        self.fd = os.open(out, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            try:
                holder = (out / self.PID_FILE).read_text().strip()
            except OSError:
                holder = "another process"
            raise SettingsError(f"{out} is being trained by {holder}; wait for it to end, or give another "
                                "--out") from None
        self.pid_file = out / self.PID_FILE
        self.replace = False                      # check_out_dir: the run here goes once the new one starts
        write_private(self.pid_file, f"pid {os.getpid()} on {socket.gethostname()}\n")

    def release(self) -> None:
        self.pid_file.unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
