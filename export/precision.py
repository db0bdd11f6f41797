"""One parity row per artefact x CPU backend x precision, judged against PyTorch and timed on the
parity inputs; the runtime's auto picks the fastest row that passed (runtime/precision.py).

Rows: onnx-fp32 (the bundle's reference artefact: 1e-4 logits), onnx-fp16 and onnx-int8 (reduced-
precision files), openvino-f32, openvino-bf16 (visual path in bf16 where the CPU has it) and
openvino-int8 (the int8 file through OpenVINO) where OpenVINO is installed. Reduced precisions are
judged by their answers (export/parity.py ANSWERS_RULE).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from qgmrn.cpu import cpu_signature

from .parity import TOLERANCES, compare, run_backend

# key -> (artefact precision (which file), engine, precision of the visual path)
ROWS = {
    "onnx-fp32": ("fp32", "onnxruntime", "fp32"),
    "onnx-fp16": ("fp16", "onnxruntime", "fp16"),
    "onnx-int8": ("int8", "onnxruntime", "int8"),
    "openvino-f32": ("fp32", "openvino", "fp32"),
    "openvino-bf16": ("fp32", "openvino", "bf16"),
    "openvino-int8": ("int8", "openvino", "int8"),
}


def make_runner(engine: str, precision: str, path: Path):
    from runtime.backends import runner_for
    return runner_for(engine, precision, path, check_weights=False)


def latency_ms(runner, batches, reps: int = 15) -> dict:
    """Median model latency at batch 1 and 8 on the parity inputs (preprocessed), in ms."""
    images, tokens, lengths = max(batches, key=lambda b: len(b[0]))       # one padded batch (16)
    out = {}
    for b in (1, 8):
        n = min(b, len(images))
        feeds = {"image": images[:n], "tokens": tokens[:n], "lengths": lengths[:n]}
        for _ in range(3):
            runner.run(feeds)
        times = []
        for _ in range(reps if b == 1 else max(3, reps // 3)):
            t = time.perf_counter()
            runner.run(feeds)
            times.append(time.perf_counter() - t)
        out[str(b)] = round(1e3 * float(np.median(times)), 3)
    return out


def openvino_rows(cpu: dict) -> list[str]:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return []
    return ["openvino-f32"] + (["openvino-bf16"] if cpu["bf16"] else [])


def judge_rows(artefacts: dict[str, Path], batches, reference: dict, layer_sizes, labels, log=print,
               time_rows: bool = True) -> dict:
    """Every row these artefacts allow on this machine: parity vs PyTorch (pass/fail by its
    precision's rule), file, backend, and batch-1/8 latency where it could run."""
    cpu = cpu_signature()
    keys = [k for k, (art, engine, _) in ROWS.items() if art in artefacts and engine == "onnxruntime"]
    ov = openvino_rows(cpu)
    keys += ov + (["openvino-int8"] if "int8" in artefacts and ov else [])
    rows: dict = {}
    from runtime.openvino_backend import keep_signal_stack     # no openvino import: ctypes only
    with keep_signal_stack() if ov else contextlib.nullcontext():
        _judge(keys, rows, artefacts, batches, reference, layer_sizes, labels, log, time_rows, cpu)
    return rows


def _judge(keys, rows, artefacts, batches, reference, layer_sizes, labels, log, time_rows, cpu) -> None:
    for key in keys:
        art, engine, precision = ROWS[key]
        try:
            runner = make_runner(engine, precision, artefacts[art])
        except Exception as e:                    # a backend that cannot compile this graph
            rows[key] = {"passed": False, "failures": [f"{engine} cannot run it: {e}"], "file": artefacts[art].name,
                         "engine": engine, "precision": precision, "samples": 0}
            log(f"parity {key}: FAILED ({engine} cannot run it: {str(e)[:200]})")
            continue
        result = compare(reference, run_backend(runner, batches), layer_sizes, TOLERANCES[precision], labels=labels)
        result.update(file=artefacts[art].name, engine=engine, precision=precision, backend=runner.name, cpu=cpu)
        if time_rows:
            result["latency_ms"] = latency_ms(runner, batches)
        rows[key] = result
        log(_line(key, result))
        del runner                                 # freed here, inside keep_signal_stack


def _line(name: str, r: dict) -> str:
    d = r["max_abs_logit_diff"]
    acc = (f"  accuracy {100 * r['accuracy']:.2f}% (PyTorch {100 * r['accuracy_reference']:.2f}%)"
           if "accuracy" in r else "")
    speed = f"  {r['latency_ms']['1']:.2f} ms b1, {r['latency_ms']['8']:.2f} ms b8" if "latency_ms" in r else ""
    return (f"parity {name}: {'OK' if r['passed'] else 'FAILED'}  "
            f"max|dlogit| {'non-finite' if d is None else format(d, '.2e')}  "
            f"top-1 {100 * r['top1_agreement']:.2f}%  gates {100 * r['gate_agreement']:.3f}% "
            f"({r['route_logits_within_eps']} route logits within {r['eps']:g} of 0, "
            f"{r['near_threshold_flips']} flipped){acc}{speed}"
            + ("" if r["passed"] else f"  [{'; '.join(r['failures'])}]"))
