"""TensorRT engine runner (TensorRT 10/11 name-based tensor API, cuda-python for memory).

Torch-free. An engine is specific to the GPU model and the TensorRT version it was built with:
both are recorded in ENGINE.json by export.to_trt and checked here before deserializing, so a
foreign engine gives a clear "rebuild" error instead of wrong answers.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from .errors import ModelError


class EngineMismatch(ModelError):
    """An engine built for another GPU or TensorRT version, or without its description."""


def trt_major() -> int:
    import tensorrt as trt
    return int(trt.__version__.split(".")[0])


def _cudart():
    try:
        from cuda.bindings import runtime as cudart          # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart                             # older cuda-python
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def describe_gpu(device: int = 0) -> dict:
    cudart = _cudart()
    prop = _check(cudart.cudaGetDeviceProperties(device))
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu_name": name.strip("\x00 "), "compute_capability": f"{prop.major}.{prop.minor}"}


class TrtRunner:
    """Runs an engine on numpy inputs; one execution at a time per runner (thread-safe)."""

    def __init__(self, engine_path: str | Path):
        engine_path = Path(engine_path)
        info_path = engine_path.with_suffix(engine_path.suffix + ".json")
        if not info_path.exists():
            raise EngineMismatch(f"{engine_path} has no {info_path.name} describing where it was built; "
                                 "rebuild it with python -m export.to_trt")
        info = json.loads(info_path.read_text())
        import tensorrt as trt
        here = {"tensorrt_version": trt.__version__, **describe_gpu()}
        for key in ("tensorrt_version", "gpu_name", "compute_capability"):
            if info.get(key) != here[key]:
                raise EngineMismatch(f"{engine_path} was built for {key} {info.get(key)!r} but this machine has "
                                     f"{here[key]!r}; engines do not move between GPUs or TensorRT versions: "
                                     "rebuild with python -m export.to_trt CHECKPOINT (or use the .onnx)")
        self.info, self.metadata = info, info["metadata"]
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"TensorRT could not deserialize {engine_path}; rebuild it")
        self.context = self.engine.create_execution_context()
        self._cudart = _cudart()
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._lock = threading.Lock()
        self.outputs = [n for n in (self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors))
                        if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, trt = self._cudart, self._trt
        H2D, D2H = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            allocations = []
            try:
                for name, arr in feeds.items():
                    arr = np.ascontiguousarray(arr, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                    self.context.set_input_shape(name, arr.shape)
                    ptr = _check(cudart.cudaMalloc(max(1, arr.nbytes)))
                    allocations.append(ptr)
                    _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, H2D, self._stream))
                    self.context.set_tensor_address(name, int(ptr))
                results = {}
                for name in self.outputs:
                    shape = tuple(self.context.get_tensor_shape(name))
                    out = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                    ptr = _check(cudart.cudaMalloc(max(1, out.nbytes)))
                    allocations.append(ptr)
                    self.context.set_tensor_address(name, int(ptr))
                    results[name] = (out, ptr)
                if not self.context.execute_async_v3(int(self._stream)):
                    raise RuntimeError("TensorRT execution failed")
                for out, ptr in results.values():
                    _check(cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, D2H, self._stream))
                _check(cudart.cudaStreamSynchronize(self._stream))
                return {name: out.astype(np.float32) for name, (out, _) in results.items()}
            finally:
                for ptr in allocations:
                    cudart.cudaFree(ptr)
