"""Resume rules: what a resumed run takes from its checkpoint and what the command line may still
change (RESUME_MAY_CHANGE), when a folder holding a run may be reused, and what a finished run says."""
from __future__ import annotations

import dataclasses
from pathlib import Path

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


def _finished_message(state: dict, out: Path) -> str:
    m = state.get("metrics") or {}
    acc = f" (val accuracy {m['overall']:.3f})" if "overall" in m else ""
    return (f"the run in {out} is finished at step {state['step']}{acc}; nothing was changed. To train "
            f"longer, resume with more --epochs or --steps (more than {state['step']})")


