"""int8 post-training static quantization of the visual network: the fp32 graph's convolutions get
int8 weights (symmetric, per output channel) and int8 activations calibrated on real images; the
question encoder, the routing FC and the threshold stay float32, so gates are computed as in fp32.

The graph is written in QDQ form (QuantizeLinear/DequantizeLinear pairs around each conv): the
runtime runs it with OpenVINO, whose CPU plugin folds the pairs into int8 convolutions (VNNI where
the CPU has it), or with onnxruntime. Which is faster, and whether either beats fp32, is measured
by `python -m export.benchmark`; export judges it by its answers (export/parity.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from runtime.metadata import METADATA_KEY

from .onnx_export import ROUTING_PREFIX


def visual_convs(proto: onnx.ModelProto) -> list[str]:
    """Names of the Conv nodes outside the routing path (the ones int8 may touch)."""
    return [n.name for n in proto.graph.node if n.op_type == "Conv" and not n.name.startswith(ROUTING_PREFIX)]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over parity-style numpy batches."""

    def __init__(self, batches):
        self._it = iter([{"image": im, "tokens": tok, "lengths": ln} for im, tok, ln in batches])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):                                  # newer onnxruntime versions call it
        pass


def quantize_int8(fp32_path: Path, out_path: Path, calib_batches, metadata: dict) -> dict:
    """Write the int8 graph of `fp32_path` to `out_path`, calibrated on `calib_batches` (image,
    tokens, lengths numpy batches); returns what was quantized (for parity.json)."""
    import tempfile

    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="qgmrn-int8-") as tmp:
        # onnxruntime's basic graph optimisations first: batch norms folded into the convs, the
        # exporter's Identity-shared biases made initializers (what quantize_static can quantize)
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        return _quantize(pre, Path(out_path), calib_batches, metadata)


def _quantize(fp32_path: Path, out_path: Path, calib_batches, metadata: dict) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    proto = onnx.load(str(fp32_path))
    convs = visual_convs(proto)
    if not convs:
        raise ValueError(f"{fp32_path} has no convolutions outside the routing path to quantize")
    batches = list(calib_batches)
    quantize_static(
        str(fp32_path), str(out_path), _Reader(batches), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"], nodes_to_quantize=convs, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    q = onnx.load(str(out_path))
    del q.metadata_props[:]                            # quantize_static keeps or drops it by version
    entry = q.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps({**metadata, "precision": "int8"})
    onnx.save_model(q, str(out_path))
    n_q = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")
    return {"quantized_convs": len(convs), "quantize_nodes": n_q,
            "calibration_samples": int(sum(len(b[0]) for b in batches)), "format": "QDQ",
            "activations": "int8 symmetric, per tensor (MinMax)", "weights": "int8 symmetric, per channel"}


def calibration_samples(state: dict, data_root, jsonl, n: int, scratch) -> tuple[list, str]:
    """Calibration images: the run's own training split where it is still on disk (the checkpoint
    names it), else the training split beside the export's --data-root / --jsonl parity data,
    else freshly generated CLEVR-style training scenes. Returns (samples, where they came from)."""
    from qgmrn.data.sources import DataError, load_clevr, load_jsonl
    cfg = state.get("train_config") or {}
    tries = []
    if cfg.get("jsonl"):
        tries.append(("the run's training file", lambda: load_jsonl(cfg["jsonl"][0])))
    elif cfg.get("data_root"):
        tries.append(("the run's training split", lambda: load_clevr(cfg["data_root"], "train")))
    elif cfg.get("generate_images"):
        from qgmrn.train.data import default_data_dir
        root = default_data_dir(cfg["generate_images"])
        tries.append(("the run's built-in generated training split", lambda: load_clevr(root, "train")))
    if data_root:
        tries.append((f"{data_root} (train)", lambda: load_clevr(data_root, "train")))
    for where, load in tries:
        try:
            samples = load()
        except (DataError, OSError, ValueError, KeyError):
            continue
        if samples:
            return samples[:max(n * 20, n)], where
    from qgmrn.data.generate import generate
    images = max(1, -(-n // 4))
    generate(scratch, images=images, val_images=1, questions=4, seed=7, workers=1, log=lambda *a: None)
    return load_clevr(scratch, "train"), f"{images} generated CLEVR-style training scenes"


def calibration_batches(samples, vocab, image_size: int, n: int, seed: int = 0, batch: int = 16):
    """Up to n samples, spread over the source at random, as parity-style batches."""
    from .parity import make_batches
    rng = np.random.default_rng(seed)
    if len(samples) > n:
        samples = [samples[i] for i in sorted(rng.choice(len(samples), n, replace=False))]
    return list(make_batches(samples, vocab, image_size, batch))
