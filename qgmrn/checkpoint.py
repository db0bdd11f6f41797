"""One-file checkpoints: config, vocabulary, answers, weights, optimizer/scheduler state, step,
metrics and RNG state. Loadable with torch.load(weights_only=True); written atomically."""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import torch

from . import __version__
from .config import ModelConfig
from .files import current_umask
from .model import QGMRN
from .preprocess import NULL, UNK

FORMAT = "qgmrn-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is missing, unreadable, or not a usable QGMRN checkpoint."""


def save_checkpoint(path: str | os.PathLike, *, model: QGMRN, vocab: list[str], answers: list[str],
                    max_question_len: int, train_config: dict | None = None, optimizer=None,
                    scheduler=None, step: int = 0, epoch: int = 0, metrics: dict | None = None,
                    rng: dict | None = None, train_seconds: float = 0.0,
                    total_steps: int | None = None, supervision: dict | None = None) -> Path:
    """Write to a temporary file in the same directory, fsync, then rename over `path`:
    a crash mid-save never destroys the last good checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "qgmrn_version": __version__,
        "model_config": model.cfg.to_dict(), "train_config": train_config or {},
        "vocab": list(vocab), "answers": list(answers), "max_question_len": int(max_question_len),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step), "epoch": int(epoch), "metrics": metrics or {}, "rng": rng or {},
        "train_seconds": float(train_seconds),
    }
    if total_steps is not None:
        state["total_steps"] = int(total_steps)
    if supervision is not None:              # training-only heads (qgmrn.train.supervision): never exported
        state["supervision"] = {k: v.detach().cpu() for k, v in supervision.items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())          # mkstemp makes it 0600; a run's files share one mode
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def check_fits(state: dict, model, source) -> None:
    """The answer list and vocabulary must fit the classifier and the embedding they index:
    otherwise answers are mislabelled or word ids run past the table. Export and evaluate both ask."""
    answers = list(state["answers"])
    if len(answers) != model.cfg.num_answers or len(set(answers)) != len(answers):
        raise CheckpointError(f"{source}: its answer list ({len(answers)} answers"
                              f"{', with repeats' if len(set(answers)) != len(answers) else ''}) does not match "
                              f"its classifier ({model.cfg.num_answers} outputs)")
    vocab = state["vocab"]
    if not isinstance(vocab, (list, tuple)) or list(vocab[:2]) != [NULL, UNK] or \
            not all(isinstance(w, str) for w in vocab):
        raise CheckpointError(f"{source}: its vocabulary is not a list of words starting with {NULL}, {UNK} "
                              "(a tampered checkpoint)")
    if len(state["vocab"]) != model.cfg.vocab_size:
        raise CheckpointError(f"{source}: its vocabulary ({len(state['vocab'])} words) does not match its "
                              f"embedding ({model.cfg.vocab_size} rows)")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read and validate a checkpoint; clear errors for missing, corrupt and foreign files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                              "it is not a torch.save archive")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from e
    except Exception as e:  # pickle.UnpicklingError for files holding arbitrary objects
        raise CheckpointError(f"{path} is not a QGMRN checkpoint (it holds objects a checkpoint "
                              f"never contains): {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a QGMRN checkpoint (no '{FORMAT}' marker): a foreign file")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {state.get('format_version')}; "
                              f"this qgmrn reads version {FORMAT_VERSION}")
    try:
        cfg = ModelConfig.from_dict(state["model_config"])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: its model config does not fit this qgmrn version: {e}") from e
    _check_shapes(path, cfg, state.get("model"))
    return state


MAX_IMAGE_SIZE = 2048       # input side; the paper's is 224: a claim of 10^6 would allocate terabytes


def _check_shapes(path, cfg: ModelConfig, weights) -> None:
    """The config's sizes must be the stored weights' sizes, checked before anything is allocated:
    the model is built on the meta device (shapes only), so a config that claims 10^10 words or
    10^5 channels costs nothing and is refused in one line."""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: its weights are not a set of tensors (a tampered checkpoint)")
    if cfg.image_size > MAX_IMAGE_SIZE:
        raise CheckpointError(f"{path}: its model config claims {cfg.image_size} px images; at most "
                              f"{MAX_IMAGE_SIZE} are supported (a tampered checkpoint?)")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in QGMRN(cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != got:
        name = next((k for k in expected if expected[k] != got.get(k)), None) or next(k for k in got if k not in expected)
        raise CheckpointError(f"{path}: its model config does not match its weights ({name}: the config makes "
                              f"{expected.get(name, 'nothing')}, the file holds {got.get(name, 'nothing')}); "
                              "a tampered or foreign checkpoint")


def model_from_checkpoint(state: dict) -> QGMRN:
    """Rebuild the model from the checkpoint alone (its stored config) and load the weights."""
    model = QGMRN(ModelConfig.from_dict(state["model_config"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not match its config: {e}") from e
    return model
