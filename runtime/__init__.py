"""QGMRN runtime: answer questions about images with an exported model, without torch.

    import runtime
    model = runtime.load("runs/qgmrn/ckpt-export")       # bundle dir, .onnx or TensorRT .engine
    model.answer("scene.png", "What color is the large sphere?")
    runtime.answer("scene.png", "How many cubes are there?")   # default model: $QGMRN_MODEL, else built in
"""
from __future__ import annotations

import os
import threading

from pathlib import Path

from .errors import ImageError, ModelError, NoModelConfigured, QuestionError
from .model import Model, Prediction

__all__ = ["load", "BUILTIN", "builtin_path", "answer", "predict", "set_default_model", "get_default_model", "Model", "Prediction",
           "ImageError", "QuestionError", "ModelError", "NoModelConfigured"]

_lock = threading.Lock()
_default: Model | None = None
_default_source: str | None = None


# The model that ships inside the package (CLEVR-style scenes; see the README's model card).
BUILTIN = "builtin"


def builtin_path() -> Path:
    return Path(__file__).resolve().parent / "models" / "builtin.onnx"


def resolve(path: str | os.PathLike) -> str | os.PathLike:
    """"builtin" names the packaged model; anything else is a path."""
    if isinstance(path, str) and path == BUILTIN:
        p = builtin_path()
        if not p.exists():
            raise ModelError(f"the built-in model is missing from this installation ({p})")
        return p
    return path


def load(path: str | os.PathLike = BUILTIN, backend: str = "auto") -> Model:
    """Load an exported model ("builtin": the packaged one). backend: "auto" picks a TensorRT
    engine > onnxruntime with the TensorRT or CUDA provider > onnxruntime CPU; model.backend says
    which it chose."""
    return Model(resolve(path), backend)


def set_default_model(model: Model | str | os.PathLike | None) -> None:
    """Model used by runtime.answer() when none is given (a Model, a path, or None to clear)."""
    global _default, _default_source
    with _lock:
        _default = model if isinstance(model, Model) or model is None else Model(resolve(model))
        _default_source = None if _default is None else str(_default.path)


def get_default_model() -> Model:
    global _default, _default_source
    with _lock:
        env = os.environ.get("QGMRN_MODEL")
        if _default is None and env:
            _default, _default_source = Model(resolve(env)), env
        if _default is None and builtin_path().exists():
            _default, _default_source = Model(builtin_path()), BUILTIN
        if _default is None:
            raise NoModelConfigured("no model: pass model=, call runtime.set_default_model(path), "
                                    "or set QGMRN_MODEL to an exported .onnx, bundle or engine")
        return _default


def answer(image, question: str, model: Model | None = None) -> str:
    return (model or get_default_model()).answer(image, question)


def predict(image, question: str, model: Model | None = None, top_k: int = 5) -> Prediction:
    return (model or get_default_model()).predict(image, question, top_k)
