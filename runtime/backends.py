"""One small runner per format behind a suffix map: .onnx -> onnxruntime, .engine/.plan -> TensorRT.
Each runner takes numpy feeds and returns {"logits", "gates", "route_logits"} as float32 arrays."""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ModelError
from .metadata import METADATA_KEY, check_metadata_against_shapes, check_weights_finite, parse_metadata
from .precision import Choice, check_sha, rank, read_report, report_rows, require_regular, rows_of

log = logging.getLogger("runtime")
OUTPUTS = ("logits", "gates", "route_logits")
ENGINE_SUFFIXES = (".engine", ".plan")


class OnnxRuntimeRunner:
    """onnxruntime session; InferenceSession.run is safe to call from several threads."""

    def __init__(self, path: Path, device: str = "auto", check_weights: bool = True):
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
        self.metadata = parse_metadata(raw, path)
        shapes = {o.name: o.shape for o in self.session.get_outputs()}
        missing = set(OUTPUTS) - set(shapes)
        if missing:
            raise ModelError(f"{path} is not a QGMRN export: it has no output {sorted(missing)}")
        if check_weights:                         # export's parity measures the graph as it is
            check_weights_finite(path)
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        check_metadata_against_shapes(self.metadata, shapes["logits"], shapes["gates"], path, inputs.get("image"))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(OUTPUTS, self.session.run(list(OUTPUTS), feeds)))


class TensorRTRunner:
    def __init__(self, path: Path):
        try:
            from .trt_engine import TrtRunner
            self._runner = TrtRunner(path)
        except ImportError as e:
            raise ModelError(f"{path} is a TensorRT engine, but TensorRT or cuda-python is not installed "
                             f"({e}); pip install -e '.[gpu]', or load the bundle's model.onnx") from e
        self.name = f"TensorRT {self._runner.info['tensorrt_version']} on {self._runner.info['gpu_name']}"
        self.metadata = parse_metadata(json.dumps(self._runner.metadata), path)

    def run(self, feeds):
        return self._runner.run(feeds)


BACKENDS = ("auto", "tensorrt", "onnxruntime", "openvino", "cpu")


def _candidates(path: Path, backend: str) -> list[tuple[str, Callable[[], Any]]]:
    """(description, factory) in the order auto tries them; one entry for an explicit backend."""
    engine = path / "model.engine" if path.is_dir() else (path if path.suffix in ENGINE_SUFFIXES else None)
    onnx_path = path / "model.onnx" if path.is_dir() else (path if path.suffix not in ENGINE_SUFFIXES else None)
    if path.is_dir() and not (engine and engine.exists()) and not (onnx_path and onnx_path.exists()):
        raise ModelError(f"{path} holds no model.onnx or model.engine: not a QGMRN bundle")
    if engine is not None and not engine.exists():
        engine = None
    if onnx_path is not None and not onnx_path.exists():
        onnx_path = None
    for model_file in (engine, onnx_path):
        if model_file is not None:
            require_regular(model_file)
    if path.is_dir():
        check_bundle(path, onnx_path)

    def need_onnx(name):
        if onnx_path is None:
            raise ModelError(f"{path} is a TensorRT engine; backend {name!r} needs the .onnx")
        return onnx_path

    if backend == "tensorrt":
        if engine is None:
            raise ModelError(f"backend 'tensorrt' needs an engine (.engine) or a bundle with one, not {path.name}")
        return [("TensorRT engine", lambda: TensorRTRunner(engine))]
    if backend == "onnxruntime":
        return [("onnxruntime", lambda: OnnxRuntimeRunner(need_onnx(backend), "auto"))]
    if backend == "cpu":
        return [("onnxruntime CPU", lambda: OnnxRuntimeRunner(need_onnx(backend), "cpu"))]
    if backend == "openvino":
        from .openvino_backend import OpenVINORunner
        return [("OpenVINO", lambda: OpenVINORunner(need_onnx(backend)))]
    out: list[tuple[str, Callable[[], Any]]] = []
    if engine is not None:
        out.append(("TensorRT engine", lambda: TensorRTRunner(engine)))
    if onnx_path is not None:
        import onnxruntime as ort
        gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()]
        if gpu:
            out.append((f"onnxruntime {gpu[0]}", lambda: _require_gpu(OnnxRuntimeRunner(onnx_path, "auto"))))
        choices, skipped = rank(*report_rows(path))
        if skipped:
            log.info("runtime: auto left out %s", "; ".join(skipped))
        for choice in choices:
            if choice.key != "onnx-fp32":
                out.append((choice.key, functools.partial(_runner_for, choice)))
            else:
                break                  # onnxruntime fp32 comes last anyway: the reference
        out.append(("onnxruntime CPU", lambda: OnnxRuntimeRunner(onnx_path, "cpu")))
    return out


def runner_for(engine: str, precision: str, path: Path, check_weights: bool = True):
    """The CPU runner of one parity row: onnxruntime, or OpenVINO with its visual path in bf16
    (precision "bf16") or float32 (any other: an int8 file keeps its int8 convolutions)."""
    if engine == "openvino":
        from .openvino_backend import OpenVINORunner
        return OpenVINORunner(path, "bf16" if precision == "bf16" else "f32", check_weights=check_weights)
    return OnnxRuntimeRunner(path, "cpu", check_weights=check_weights)


def _runner_for(choice: Choice):
    """A reduced-precision (or OpenVINO) row of the parity report, checked to be the proven file."""
    check_sha(choice.path, choice.sha256)
    runner = runner_for(choice.engine, choice.precision, choice.path)
    runner.name += f" [{choice.key}]"
    runner.source = choice.path
    runner.reason = choice.reason
    return runner


def check_bundle(directory: Path, onnx_path: Path | None) -> None:
    """A bundle is what export published: refuse one whose parity.json says it failed, or whose
    model.onnx is not the file parity was proven on (its sha256 differs: altered or corrupt)."""
    report_path = directory / "parity.json"
    if not report_path.exists():
        raise ModelError(f"{directory} has no parity.json: not a bundle export published (a bundle holds "
                         "the report that proves its model); load the .onnx file itself, or re-export")
    report = read_report(report_path, "a parity report")
    if report.get("passed") is not True:
        raise ModelError(f"{directory}: its parity.json says passed={report.get('passed')!r}: this export "
                         "failed its parity check (or never passed it) and is not used")
    if onnx_path is not None:
        sha = (rows_of(report, report_path).get("onnx-fp32") or {}).get("sha256")
        if not sha:
            raise ModelError(f"{report_path}: row 'onnx-fp32' has no sha256 for {onnx_path.name}; re-export")
        check_sha(onnx_path, sha)


def _require_gpu(runner):
    if runner.providers[0] == "CPUExecutionProvider":
        raise ModelError("the GPU providers failed to load; onnxruntime fell back to its CPU provider")
    return runner


def open_runner(path: str | os.PathLike, backend: str = "auto"):
    """backend: "auto" tries, in order, a TensorRT engine > onnxruntime with the TensorRT or CUDA
    provider > the fastest CPU row of the export's parity report that passed and can run here
    (runtime/precision.py: OpenVINO bf16, int8, ...) > onnxruntime CPU fp32, and falls back to the
    next when one cannot run here (logging why); "tensorrt", "onnxruntime" (best onnxruntime
    provider), "openvino" or "cpu" name one, and raise if it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    candidates = _candidates(path, backend)
    reasons = []
    for what, make in candidates:
        try:
            runner = make()
        except (ModelError, ImportError, RuntimeError, OSError) as e:
            if backend != "auto" or len(candidates) == 1:
                raise                          # the one way to run it: its own error says why
            reasons.append(f"{what}: {e}")
            if (what, make) is not candidates[-1]:
                log.warning("runtime: %s cannot run here, trying the next backend (%s)", what, e)
            continue
        log.info("runtime: %s chose %s%s%s", path, runner.name,
                 f" ({runner.reason})" if getattr(runner, "reason", None) else "",
                 f" after {'; '.join(reasons)}" if reasons else "")
        runner.fallbacks = reasons
        return runner, _source_path(path, runner)
    raise ModelError(f"{path}: no backend can run it here: {'; '.join(reasons)}")


def _source_path(path: Path, runner) -> Path:
    if getattr(runner, "source", None):
        return runner.source
    if not path.is_dir():
        return path
    return path / ("model.engine" if isinstance(runner, TensorRTRunner) else "model.onnx")
