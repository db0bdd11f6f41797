"""One small runner per format behind a suffix map: .onnx -> onnxruntime, .engine/.plan -> TensorRT.
Each runner takes numpy feeds and returns {"logits", "gates", "route_logits"} as float32 arrays."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from .errors import ModelError

log = logging.getLogger("runtime")
OUTPUTS = ("logits", "gates", "route_logits")
ENGINE_SUFFIXES = (".engine", ".plan")
# The self-description every QGMRN export carries (export.onnx_export writes it, this reads it).
METADATA_KEY = "qgmrn"
METADATA_FORMAT = "qgmrn-onnx"
METADATA_VERSION = 1


class OnnxRuntimeRunner:
    """onnxruntime session; InferenceSession.run is safe to call from several threads."""

    def __init__(self, path: Path, device: str = "auto"):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if device == "cpu":
            wanted = ["CPUExecutionProvider"]
        else:
            wanted = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
            wanted.append("CPUExecutionProvider")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=wanted)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelError(f"{path} is not a loadable ONNX model: {e}") from e
        self.providers = self.session.get_providers()
        self.name = f"onnxruntime ({self.providers[0]})"
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.metadata = _parse_metadata(raw, path)
        shapes = {o.name: o.shape for o in self.session.get_outputs()}
        missing = set(OUTPUTS) - set(shapes)
        if missing:
            raise ModelError(f"{path} is not a QGMRN export: it has no output {sorted(missing)}")
        check_metadata_against_shapes(self.metadata, shapes["logits"], shapes["gates"], path)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(OUTPUTS, self.session.run(list(OUTPUTS), feeds)))


class TensorRTRunner:
    def __init__(self, path: Path):
        try:
            from .trt_engine import TrtRunner
            self._runner = TrtRunner(path)
        except ImportError as e:
            raise ModelError(f"{path} is a TensorRT engine, but TensorRT or cuda-python is not installed "
                             f"({e}); pip install 'qgmrn[gpu]', or load the bundle's model.onnx") from e
        self.name = f"TensorRT {self._runner.info['tensorrt_version']} on {self._runner.info['gpu_name']}"
        self.metadata = _parse_metadata(json.dumps(self._runner.metadata), path)

    def run(self, feeds):
        return self._runner.run(feeds)


def _parse_metadata(raw: str | None, path) -> dict:
    if raw is None:
        raise ModelError(f"{path} is not a QGMRN export: it carries no '{METADATA_KEY}' metadata "
                         "(export it with python -m export.to_onnx)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: its QGMRN metadata is not valid JSON") from e
    if meta.get("format") != METADATA_FORMAT or meta.get("format_version") != METADATA_VERSION:
        raise ModelError(f"{path}: metadata format {meta.get('format')!r} v{meta.get('format_version')} "
                         "is not one this runtime reads")
    missing = {"vocab", "answers", "image_size", "max_question_len", "layer_sizes", "mean", "std"} - set(meta)
    if missing:
        raise ModelError(f"{path}: QGMRN metadata lacks {sorted(missing)}")
    return meta


def check_metadata_against_shapes(meta: dict, logits_shape, gates_shape, path) -> None:
    """Metadata that disagrees with the graph would index past the logits or read gates of other
    modules: refuse it at load. Dims that are symbolic (str or None) are not checked."""
    answers, sizes = meta["answers"], meta["layer_sizes"]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers) or \
            len(set(answers)) != len(answers):
        raise ModelError(f"{path}: its answer list is not a list of distinct strings")
    if not isinstance(sizes, list) or not sizes or not all(isinstance(m, int) and m > 0 for m in sizes):
        raise ModelError(f"{path}: its layer_sizes metadata is not a list of positive integers")
    width = logits_shape[-1] if len(logits_shape) == 2 else None
    if isinstance(width, int) and width != len(answers):
        raise ModelError(f"{path}: the graph scores {width} answers but its metadata lists {len(answers)}; "
                         "the file was altered or mis-exported")
    if len(gates_shape) != 3:
        raise ModelError(f"{path}: gates output has shape {gates_shape}, expected (batch, layers, modules)")
    layers, modules = gates_shape[1], gates_shape[2]
    if (isinstance(layers, int) and layers != len(sizes)) or (isinstance(modules, int) and modules != max(sizes)):
        raise ModelError(f"{path}: the graph routes {layers} x {modules} modules but its metadata's "
                         f"layer_sizes {sizes} say {len(sizes)} x {max(sizes)}")


def tensorrt_usable() -> bool:
    try:
        import tensorrt  # noqa: F401
        from .trt_engine import describe_gpu
        describe_gpu()
        return True
    except Exception:
        return False


def open_runner(path: str | os.PathLike, backend: str = "auto"):
    """backend: "auto" (TensorRT engine > onnxruntime TensorRT/CUDA provider > onnxruntime CPU),
    "tensorrt", "onnxruntime" (best onnxruntime provider) or "cpu"."""
    if backend not in ("auto", "tensorrt", "onnxruntime", "cpu"):
        raise ValueError(f"backend must be auto, tensorrt, onnxruntime or cpu, not {backend!r}")
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    if path.is_dir():
        engine, onnx_path = path / "model.engine", path / "model.onnx"
        if engine.exists() and (backend == "tensorrt" or (backend == "auto" and tensorrt_usable())):
            path = engine
        elif onnx_path.exists():
            path = onnx_path
        else:
            raise ModelError(f"{path} holds no model.onnx or model.engine: not a QGMRN bundle")
    if path.suffix in ENGINE_SUFFIXES:
        if backend in ("onnxruntime", "cpu"):
            raise ModelError(f"{path} is a TensorRT engine; backend {backend!r} needs the .onnx")
        runner = TensorRTRunner(path)
    else:
        if backend == "tensorrt":
            raise ModelError(f"backend 'tensorrt' needs an engine (.engine) or a bundle with one, not {path.name}")
        runner = OnnxRuntimeRunner(path, "cpu" if backend == "cpu" else "auto")
    log.info("runtime: %s chose %s", path, runner.name)
    return runner, path
