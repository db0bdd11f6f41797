"""The self-description every QGMRN export carries (export.onnx_export writes it) and the checks
every backend runs on it at load: one module that the backends import, none of them each other."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import ModelError

METADATA_KEY = "qgmrn"
METADATA_FORMAT = "qgmrn-onnx"
METADATA_VERSION = 1


UINT8_NHWC = "uint8-nhwc"          # metadata["image_input"] of a graph that takes uint8 pixels (export/uint8_input.py)

def parse_metadata(raw: str | None, path) -> dict:
    if raw is None:
        raise ModelError(f"{path} is not a QGMRN export: it carries no '{METADATA_KEY}' metadata "
                         "(export it with python -m export.to_onnx)")
    try:
        meta = json.loads(raw)
    except RecursionError:
        raise ModelError(f"{path}: its QGMRN metadata is nested too deeply to be ours") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: its QGMRN metadata is not valid JSON") from e
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: its QGMRN metadata is a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != METADATA_FORMAT or meta.get("format_version") != METADATA_VERSION:
        raise ModelError(f"{path}: metadata format {meta.get('format')!r} v{meta.get('format_version')} "
                         "is not one this runtime reads")
    missing = {"vocab", "answers", "image_size", "max_question_len", "layer_sizes", "mean", "std"} - set(meta)
    if missing:
        raise ModelError(f"{path}: QGMRN metadata lacks {sorted(missing)}")
    _check_fields(meta, path)
    return meta


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_fields(meta: dict, path) -> None:
    """Types, and the metadata's agreement with its own model_config (what the graph was built from)."""
    if not isinstance(meta["vocab"], list) or not all(isinstance(w, str) for w in meta["vocab"]):
        raise ModelError(f"{path}: its vocabulary metadata is not a list of words")
    for key in ("image_size", "max_question_len"):
        if not _positive_int(meta[key]):
            raise ModelError(f"{path}: its metadata's {key} is {meta[key]!r}, not a positive integer")
    for key in ("mean", "std"):
        value = meta[key]
        if not (isinstance(value, list) and len(value) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value)):
            raise ModelError(f"{path}: its metadata's {key} is {json.dumps(value)[:60]}, not three numbers "
                             "(one per colour channel)")
    mcfg = meta.get("model_config")
    if isinstance(mcfg, dict):
        if "vocab_size" in mcfg and mcfg["vocab_size"] != len(meta["vocab"]):
            raise ModelError(f"{path}: its vocabulary has {len(meta['vocab'])} words but the model was built "
                             f"for {mcfg['vocab_size']}; the file was altered or mis-exported")
        if "image_size" in mcfg and mcfg["image_size"] != meta["image_size"]:
            raise ModelError(f"{path}: its metadata's image_size is {meta['image_size']} but the model was "
                             f"built for {mcfg['image_size']}; the file was altered or mis-exported")


def check_metadata_against_shapes(meta: dict, logits_shape, gates_shape, path, image_shape=None) -> None:
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
    if image_shape is not None and len(image_shape) == 4:
        nhwc = meta.get("image_input") == UINT8_NHWC
        channels = image_shape[3] if nhwc else image_shape[1]
        if isinstance(channels, int) and channels != 3:
            said = "uint8 pixels (batch, S, S, 3)" if nhwc else "float pixels (batch, 3, S, S)"
            raise ModelError(f"{path}: its metadata says the image input takes {said}, but the graph's image "
                             f"input has shape {list(image_shape)}; the file was altered or mis-converted")
        side = image_shape[1:3] if nhwc else image_shape[2:]
        fixed = [d for d in side if isinstance(d, int)]
        if any(d != meta["image_size"] for d in fixed):
            raise ModelError(f"{path}: the graph takes {side[0]} x {side[1]} images but its metadata "
                             f"says image_size {meta['image_size']}")
    if len(gates_shape) != 3:
        raise ModelError(f"{path}: gates output has shape {gates_shape}, expected (batch, layers, modules)")
    layers, modules = gates_shape[1], gates_shape[2]
    if (isinstance(layers, int) and layers != len(sizes)) or (isinstance(modules, int) and modules != max(sizes)):
        raise ModelError(f"{path}: the graph routes {layers} x {modules} modules but its metadata's "
                         f"layer_sizes {sizes} say {len(sizes)} x {max(sizes)}")


def check_weights_finite(path: Path) -> None:
    """A NaN or infinite weight that no ordinary input reaches (an unknown word's embedding row)
    would answer wrongly one day: refuse the graph at load. Needs the onnx package (installed with
    the train extra); a base install relies on the bundle's sha256 and parity.json instead."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return
    try:
        graph = onnx.load(str(path)).graph
    except Exception:          # unreadable here: onnxruntime already loaded it, leave it at that
        return
    bad = [t.name for t in graph.initializer
           if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
           and not np.isfinite(numpy_helper.to_array(t)).all()]
    if bad:
        raise ModelError(f"{path} has non-finite weights ({', '.join(bad[:3])}): it would answer wrongly; "
                         "re-export a good checkpoint")
