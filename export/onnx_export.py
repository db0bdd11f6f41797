"""Test-time graph -> one self-contained .onnx file whose metadata describes the model completely."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

import qgmrn
from qgmrn.config import ModelConfig
from qgmrn.model import QGMRN
from qgmrn.preprocess import MEAN, STD

from runtime.metadata import METADATA_FORMAT, METADATA_KEY, METADATA_VERSION
from runtime.backends import OUTPUTS as OUTPUT_NAMES

from .compact import CompactTestTimeModel
from .graph import INPUT_NAMES, TestTimeModel

# Opset 18: GroupNorm decomposes into InstanceNormalization pieces that TensorRT and onnxruntime
# both run; opset 21's native GroupNormalization node fails to parse in several TensorRT versions.
OPSET = 18
# Nodes of the routing path (question encoder, routing FC, threshold) get this name prefix, so a
# TensorRT 10 build can pin exactly those layers to float32.
ROUTING_PREFIX = "routing/"
# onnxruntime's fast CPU convolutions (NCHWc layout) take grouped convs only when every group has
# a multiple of 16 channels (the AVX-512 block; 8 on AVX2). BRN's branches have 2-8.
NCHWC_GROUP_CHANNELS = 16


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def example_inputs(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch 3 with different lengths: a batch-1 example can freeze the dynamic dims."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randint(2, max(3, cfg.vocab_size), (3, 7), generator=g)
    lengths = torch.tensor([7, 4, 2])
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
    return image, tokens, lengths


def build_metadata(state: dict, checkpoint_sha256: str, precision: str) -> dict:
    cfg = ModelConfig.from_dict(state["model_config"])
    return {
        "format": METADATA_FORMAT, "format_version": METADATA_VERSION, "precision": precision,
        "vocab": list(state["vocab"]), "answers": list(state["answers"]),
        "image_size": cfg.image_size, "mean": list(MEAN), "std": list(STD),
        "max_question_len": int(state["max_question_len"]),
        "layer_sizes": list(cfg.layer_sizes), "num_layers": cfg.num_layers, "max_modules": cfg.max_modules,
        "arch": cfg.arch, "attention": cfg.attention, "model_config": cfg.to_dict(),
        "inputs": list(INPUT_NAMES), "outputs": list(OUTPUT_NAMES),
        "qgmrn_version": qgmrn.__version__, "torch_version": torch.__version__, "onnx_version": onnx.__version__,
        "opset": OPSET, "checkpoint_sha256": checkpoint_sha256,
        # how it was trained: the recipe (--config file) where there was one, and the run's settings
        "recipe": (state.get("train_config") or {}).get("recipe"),
        "training": {k: v for k, v in (state.get("train_config") or {}).items()
                     if k in TRAINING_KEYS},
        "train_steps": int(state.get("step", 0)), "train_seconds": float(state.get("train_seconds", 0.0)),
    }


# The settings that decide what a model learned (paths and reporting are left out).
TRAINING_KEYS = ("preset", "epochs", "steps", "batch_size", "lr", "warmup_steps", "load_weight", "scene_weight",
                 "where_weight", "seed",
                 "generate_images", "curriculum_objects", "curriculum_steps", "anneal_steps", "precision", "recipe")


def export_onnx(model: QGMRN, path: str | os.PathLike, metadata: dict, fp16: bool = False,
                merge_groups: bool = True, compact: bool = False, batch1: bool = False) -> Path:
    """Export the test-time graph (batch and question length dynamic) with metadata; checked.

    Uses the TorchScript-based exporter: torch.export specialises the question length to the
    example's (the GRU decomposition unrolls over time), and the dynamo exporter then either
    fails or silently freezes the dim. The TorchScript exporter keeps an ONNX GRU node
    (linear_before_reset=1, checked by the tests) over a dynamic length.
    compact: the graph that skips the modules a question switched off (export/compact.py; float32);
    batch1: its batch-1 form (the batch dimension fixed at 1).
    """
    path = Path(path)
    if compact and fp16:
        raise ValueError("the compact graph is float32")
    if batch1 and not compact:
        raise ValueError("batch1 is the compact graph's form")
    wrapper = (CompactTestTimeModel(model, batch1) if compact else TestTimeModel(model, half_visual=fp16)).eval()
    dynamic = {"image": {0: "batch"}, "tokens": {0: "batch", 1: "seq_len"}, "lengths": {0: "batch"},
               **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    example = example_inputs(model.cfg)
    if batch1:                                         # every shape fixed but the question's length
        dynamic = {"tokens": {1: "seq_len"}}
        example = tuple(t[:1] for t in example)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, example, str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          dynamic_axes=dynamic, do_constant_folding=True)
    proto = onnx.load(str(path))
    mark_routing_nodes(proto)
    metadata = {**metadata, "execution": ("compact-batch1" if batch1 else "compact") if compact else "masked"}
    if not fp16:                                       # the CPU graphs; fp16 keeps the paper's groups
        metadata = {**metadata, "merged_conv_groups": merge_conv_groups(proto) if merge_groups else 0}
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, str(path))                 # under 2 GB: one file, no external data
    return path


_ROUTING_SCOPE = re.compile(r"^/(model/)?(text|router)/")


def mark_routing_nodes(proto: onnx.ModelProto) -> int:
    """Prefix the names of nodes that come from the question encoder or the router."""
    n = 0
    for node in proto.graph.node:
        if _ROUTING_SCOPE.match(node.name):
            node.name = ROUTING_PREFIX + node.name.lstrip("/")
            n += 1
    return n


def merge_conv_groups(proto: onnx.ModelProto, channels: int = NCHWC_GROUP_CHANNELS) -> int:
    """Rewrite grouped convs with few channels per group as convs with fewer, wider groups whose
    weights are block-diagonal (zeros between the original groups). The result is the same sum
    of the same products, so outputs stay equal up to float rounding, and onnxruntime runs them
    with its NCHWc kernels instead of a slow per-group loop plus layout reorders around it
    (brn-c32 CPU batch 1: bench/runtime_latency.py). Depthwise convs are left alone (they have
    their own NCHWc kernel). Returns the number of convs rewritten."""
    inits = {t.name: t for t in proto.graph.initializer}
    uses = Counter(name for node in proto.graph.node for name in node.input)
    rewritten = 0
    for node in proto.graph.node:
        group = next((a for a in node.attribute if a.name == "group"), None)
        if node.op_type != "Conv" or group is None or group.i <= 1 or node.input[1] not in inits \
                or uses[node.input[1]] != 1:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        g, kin, kout = group.i, w.shape[1], w.shape[0] // group.i
        if kin == 1 and kout == 1:
            continue
        per = math.lcm(channels // math.gcd(kin, channels), channels // math.gcd(kout, channels))
        if per == 1 or g % per:
            continue
        wide = np.zeros((w.shape[0], kin * per, *w.shape[2:]), dtype=w.dtype)
        for o in range(w.shape[0]):
            j = (o // kout) % per                       # position of o's group inside its merged group
            wide[o, j * kin:(j + 1) * kin] = w[o]
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(wide, node.input[1]))
        group.i = g // per
        rewritten += 1
    return rewritten


def read_metadata(path_or_proto) -> dict:
    proto = path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else \
        onnx.load(str(path_or_proto), load_external_data=False)
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            return json.loads(p.value)
    raise ValueError("no qgmrn metadata in this ONNX file")


def routing_precision_report(proto: onnx.ModelProto) -> dict:
    """Element types of the routing nodes' outputs (after shape inference) and of the weights they
    read: in a float16 graph every routing tensor must still be float32 (or an integer type)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                   onnx.TensorProto.DOUBLE}
    seen: dict[str, int] = {}
    routing_nodes = [n for n in inferred.graph.node if n.name.startswith(ROUTING_PREFIX)]
    for node in routing_nodes:
        for name in list(node.input) + list(node.output):
            t = types.get(name)
            if t in float_types:
                seen[onnx.TensorProto.DataType.Name(t)] = seen.get(onnx.TensorProto.DataType.Name(t), 0) + 1
    return {"routing_nodes": len(routing_nodes), "float_tensor_types": seen,
            "gru_linear_before_reset": [next((a.i for a in n.attribute if a.name == "linear_before_reset"), 0)
                                        for n in inferred.graph.node if n.op_type == "GRU"]}
