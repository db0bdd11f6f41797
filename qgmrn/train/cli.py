"""The command line: one mapping from defaults < --config file < --set < named flags to a
TrainConfig and model overrides."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ModelConfig
from ..settings import SettingsError, field_types, split_assignment, typed
from .settings import TrainConfig

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
            except UnicodeDecodeError:
                raise SettingsError(f"--config {a.config}: not a JSON text file (a checkpoint continues with "
                                    "--resume --out RUN, or starts a new run with --init-from)") from None
            except json.JSONDecodeError as e:
                raise SettingsError(f"--config {a.config}: not valid JSON ({e})") from e
            except RecursionError:
                raise SettingsError(f"--config {a.config}: nested too deeply to be a settings file") from None
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
