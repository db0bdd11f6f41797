"""Checkpoint -> bundle directory (model.onnx, model.fp16.onnx, parity.json, engines), published
only when parity holds: a failed export never leaves files that look valid."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from qgmrn.checkpoint import load_checkpoint, model_from_checkpoint
from qgmrn.preprocess import Vocab

from .onnx_export import build_metadata, export_onnx, file_sha256, routing_precision_report
from .parity import TOLERANCES, compare, make_batches, parity_samples, run_onnxruntime, run_torch

ONNX_NAME, ONNX_FP16_NAME, PARITY_NAME = "model.onnx", "model.fp16.onnx", "parity.json"
BUNDLE_MARKERS = (ONNX_NAME, PARITY_NAME)


class ExportError(RuntimeError):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass
class Staged:
    """Verified ONNX artefacts in a staging directory, not yet published to `out`."""
    stage: Path
    out: Path
    report: dict
    state: dict
    model: object                  # the checkpoint's QGMRN, eval mode
    batches: list                  # the parity inputs
    reference: dict                # PyTorch outputs on them


def default_out(checkpoint: str | os.PathLike) -> Path:
    p = Path(checkpoint)
    return p.parent / f"{p.stem}-export"


def staging_dir(out: Path) -> Path:
    """A fresh directory beside `out` (same filesystem, so publishing is a rename)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {out} exists and is not a directory", 2)
    if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in BUNDLE_MARKERS):
        raise ExportError(f"output directory {out} is not empty and holds no qgmrn export; "
                          "choose another --out", 2)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        os.chmod(stage, 0o755)                         # mkdtemp makes it private
        return stage
    except OSError as e:
        raise ExportError(f"cannot write to {out.parent}: {e.strerror or e}", 2) from e


def publish(stage: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)


def export_checkpoint(checkpoint, out=None, fp16: bool = False, data_root=None, jsonl=None,
                      parity_n: int = 300, extra_samples=(), log=print) -> Staged:
    """Export ONNX artefacts and check parity against PyTorch.

    The caller publishes the stage (after adding engines) with publish(); a parity failure raises
    ExportError after moving the stage to OUT.failed for inspection.
    """
    t0 = time.perf_counter()
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state).eval()
    out = Path(out) if out else default_out(checkpoint)
    stage = staging_dir(out)
    try:
        sha = file_sha256(checkpoint)
        artefacts = {"fp32": stage / ONNX_NAME}
        export_onnx(model, artefacts["fp32"], build_metadata(state, sha, "fp32"))
        if fp16:
            artefacts["fp16"] = stage / ONNX_FP16_NAME
            export_onnx(model_from_checkpoint(state), artefacts["fp16"], build_metadata(state, sha, "fp16"),
                        fp16=True)
        export_s = time.perf_counter() - t0
        log(f"exported {', '.join(p.name for p in artefacts.values())} in {export_s:.1f} s")

        vocab = Vocab(list(state["vocab"]))
        with tempfile.TemporaryDirectory(prefix="qgmrn-parity-") as scratch:
            samples, source = parity_samples(data_root, jsonl, parity_n, scratch=scratch)
            samples = list(samples) + list(extra_samples)
            batches = list(make_batches(samples, vocab, model.cfg.image_size))
        reference = run_torch(model, batches)
        report = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha, "inputs": source,
                  "samples": len(samples), "export_seconds": round(export_s, 2), "artefacts": {}}
        for precision, path in artefacts.items():
            result = compare(reference, run_onnxruntime(path, batches), model.cfg.layer_sizes,
                             TOLERANCES[precision])
            result["file"] = path.name
            result["bytes"] = path.stat().st_size
            result["backend"] = "onnxruntime CPUExecutionProvider"
            result["routing_precision"] = routing_precision_report(onnx.load(str(path)))
            report["artefacts"][f"onnx-{precision}"] = result
            log(_line(f"onnx-{precision}", result))
        report["passed"] = all(r["passed"] for r in report["artefacts"].values())
        write_report(stage, report)
        if not report["passed"]:
            failed = out.with_name(out.name + ".failed")
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(stage, failed)
            problems = "; ".join(f"{k}: {', '.join(r['failures'])}" for k, r in report["artefacts"].items()
                                 if not r["passed"])
            raise ExportError(f"parity check failed: {problems}. Nothing was published; the failed "
                              f"artefacts and parity.json are in {failed}", 1)
        return Staged(stage, out, report, state, model, batches, reference)
    except BaseException:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        raise


def write_report(directory: Path, report: dict) -> None:
    (directory / PARITY_NAME).write_text(json.dumps(report, indent=2))


def _line(name: str, r: dict) -> str:
    return (f"parity {name}: {'OK' if r['passed'] else 'FAILED'}  max|dlogit| {r['max_abs_logit_diff']:.2e}  "
            f"top-1 {100 * r['top1_agreement']:.2f}%  gates {100 * r['gate_agreement']:.3f}% "
            f"({r['route_logits_within_eps']} route logits within {r['eps']:g} of 0, "
            f"{r['near_threshold_flips']} flipped)")
