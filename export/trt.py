"""TensorRT engine building from the exported ONNX (TensorRT 10 and 11).

TensorRT 10: FP16 by builder flag, the routing layers (question encoder, routing FC, threshold:
the nodes named "routing/...") pinned to float32 under OBEY_PRECISION_CONSTRAINTS.
TensorRT 11: networks are strongly typed and the precision flags are gone, so an fp16 engine is
built from model.fp16.onnx, whose routing path is float32 in the graph itself.
Engines are tied to the GPU model and TensorRT version: both are recorded beside the engine
(ENGINE.json) and checked when it is loaded (runtime.trt_engine).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .onnx_export import ROUTING_PREFIX, file_sha256, read_metadata


@dataclass(frozen=True)
class EngineOptions:
    fp16: bool = False
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    opt_len: int = 20
    max_len: int = 0                 # 0: the model's max question length
    workspace_mib: int = 2048
    tf32: bool = False               # off for parity builds


def missing_requirements() -> list[str]:
    """What is missing to build an engine here, as sentences; empty when TensorRT and a GPU exist."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append("TensorRT is not installed: pip install -e '.[gpu]' (TensorRT 10 or 11 wheels, "
                       "NVIDIA driver required)")
    try:
        import torch
        if not torch.cuda.is_available():
            missing.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    except ImportError:
        missing.append("torch is not installed, so no CUDA GPU can be checked")
    return missing


def build_engine(onnx_path: str | Path, engine_path: str | Path, opts: EngineOptions, log=print) -> Path:
    import tensorrt as trt
    from runtime.trt_engine import describe_gpu, trt_major

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    meta = read_metadata(onnx_path)
    major = trt_major()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)         # explicit batch always; strongly typed always in 11
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None and not opts.tf32:
        config.clear_flag(tf32)
    if opts.fp16 and major < 11:
        if meta.get("precision") != "fp32":
            raise ValueError("TensorRT 10 fp16 engines are built from the fp32 graph with the FP16 flag")
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            floats = [j for j in range(layer.num_outputs)
                      if layer.get_output(j).dtype in (trt.float32, trt.float16)]
            if layer.name.startswith(ROUTING_PREFIX) and floats:   # integer/shape layers stay as they are
                layer.precision = trt.float32
                for j in floats:
                    layer.set_output_type(j, trt.float32)
                pinned += 1
        log(f"TensorRT {trt.__version__}: FP16 with {pinned} routing layers pinned to float32")
    elif opts.fp16 and meta.get("precision") != "fp16":
        raise ValueError("TensorRT 11 networks are strongly typed: build fp16 engines from model.fp16.onnx")
    max_len = opts.max_len or int(meta["max_question_len"])
    s = int(meta["image_size"])
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (opts.min_batch, 3, s, s), (opts.opt_batch, 3, s, s), (opts.max_batch, 3, s, s))
    profile.set_shape("tokens", (opts.min_batch, 1), (opts.opt_batch, min(opts.opt_len, max_len)),
                      (opts.max_batch, max_len))
    profile.set_shape("lengths", (opts.min_batch,), (opts.opt_batch,), (opts.max_batch,))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    engine_path.write_bytes(bytes(serialized))
    info = {"tensorrt_version": trt.__version__, **describe_gpu(), "onnx_file": onnx_path.name,
            "onnx_sha256": file_sha256(onnx_path), "fp16": opts.fp16, "tf32": opts.tf32,
            "profile": {"min_batch": opts.min_batch, "opt_batch": opts.opt_batch, "max_batch": opts.max_batch,
                        "max_len": max_len},
            "metadata": meta}
    engine_path.with_suffix(engine_path.suffix + ".json").write_text(json.dumps(info, indent=2))
    return engine_path
