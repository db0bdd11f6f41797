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
        try:
            info = json.loads(info_path.read_text())
            if not isinstance(info, dict) or not isinstance(info.get("metadata"), dict):
                raise ValueError("not an engine description")
        except (OSError, ValueError) as e:      # JSONDecodeError is a ValueError
            raise EngineMismatch(f"{info_path} is unreadable ({e}); rebuild the engine with "
                                 "python -m export.to_trt, or load the bundle's model.onnx") from e
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
        self._ptrs: dict[str, int] = {}
        self._alloc_key: tuple | None = None      # the input shapes the buffers were sized for
        profile = info.get("profile", {})
        self.max_batch = int(profile.get("max_batch", 64))
        self.max_len = int(profile.get("max_len", 0))
        self.outputs = [n for n in (self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors))
                        if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Batches larger than the engine profile's maximum run in slices; questions longer than
        its maximum length are refused with the runtime's usual error."""
        check_question_length(feeds, self.max_len)
        parts = [self._run(part) for part in split_feeds(feeds, self.max_batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _buffers(self, shapes: dict[str, tuple]) -> dict[str, int]:
        """Device buffers for these input shapes, allocated once per shape set and reused."""
        key = tuple(sorted(shapes.items()))
        if self._alloc_key != key:
            self._free()
            for name, shape in shapes.items():
                if not self.context.set_input_shape(name, shape):
                    raise ModelError(f"the engine's profile does not accept {name} of shape {shape}")
            sizes = {n: (shapes[n], self.engine.get_tensor_dtype(n)) for n in shapes}
            sizes.update({n: (tuple(self.context.get_tensor_shape(n)), self.engine.get_tensor_dtype(n))
                          for n in self.outputs})
            for name, (shape, dtype) in sizes.items():
                nbytes = int(np.prod(shape)) * np.dtype(self._trt.nptype(dtype)).itemsize
                ptr = _check(self._cudart.cudaMalloc(max(1, nbytes)))
                self._ptrs[name] = ptr
                self.context.set_tensor_address(name, int(ptr))
            self._alloc_key = key
        return self._ptrs

    def _free(self) -> None:
        for ptr in self._ptrs.values():
            self._cudart.cudaFree(ptr)
        self._ptrs, self._alloc_key = {}, None

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, trt = self._cudart, self._trt
        H2D, D2H = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            arrays = {n: np.ascontiguousarray(a, dtype=trt.nptype(self.engine.get_tensor_dtype(n)))
                      for n, a in feeds.items()}
            ptrs = self._buffers({n: a.shape for n, a in arrays.items()})
            for name, arr in arrays.items():
                _check(cudart.cudaMemcpyAsync(ptrs[name], arr.ctypes.data, arr.nbytes, H2D, self._stream))
            results = {n: np.empty(tuple(self.context.get_tensor_shape(n)),
                                   dtype=trt.nptype(self.engine.get_tensor_dtype(n))) for n in self.outputs}
            if not self.context.execute_async_v3(int(self._stream)):
                raise RuntimeError("TensorRT execution failed")
            for name, out in results.items():
                _check(cudart.cudaMemcpyAsync(out.ctypes.data, ptrs[name], out.nbytes, D2H, self._stream))
            _check(cudart.cudaStreamSynchronize(self._stream))
            return {name: out.astype(np.float32) for name, out in results.items()}

    def __del__(self):
        try:
            self._free()
        except Exception:
            pass


def split_feeds(feeds: dict[str, np.ndarray], max_batch: int) -> list[dict[str, np.ndarray]]:
    """Slices of at most max_batch samples (every input sliced alike)."""
    n = len(next(iter(feeds.values())))
    return [{k: v[i:i + max_batch] for k, v in feeds.items()} for i in range(0, n, max(1, max_batch))]


def check_question_length(feeds: dict[str, np.ndarray], max_len: int) -> None:
    from .errors import QuestionError
    length = feeds["tokens"].shape[1]
    if max_len and length > max_len:
        raise QuestionError(f"a question of {length} tokens is longer than this engine's profile allows "
                            f"({max_len}); rebuild the engine with a larger --max-len or use the .onnx")
