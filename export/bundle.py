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
import torch

from qgmrn.checkpoint import CheckpointError, check_fits, load_checkpoint, model_from_checkpoint
from qgmrn.files import remove_stale
from qgmrn.preprocess import Vocab

from .onnx_export import build_metadata, export_onnx, file_sha256, routing_precision_report
from .parity import TOLERANCES, compare, make_batches, parity_samples, run_backend, run_onnxruntime, run_torch

ONNX_NAME, ONNX_FP16_NAME, PARITY_NAME = "model.onnx", "model.fp16.onnx", "parity.json"
BUNDLE_FILES = (ONNX_NAME, ONNX_FP16_NAME, PARITY_NAME)


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


def bundle_files(directory: Path) -> list[Path]:
    """The files of a QGMRN export in `directory` (what publishing may replace); nothing else."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and (
        p.name in BUNDLE_FILES or (p.suffix in (".engine", ".plan") and p.name.startswith("model"))
        or p.name.endswith((".engine.json", ".plan.json")) and p.name.startswith("model")))


STAGES: set[Path] = set()      # staging folders this process made (what a signal must clean up)


def remove_own_stages() -> None:
    """Remove this process's staging folders that were neither published nor kept as .failed."""
    for stage in list(STAGES):
        shutil.rmtree(stage, ignore_errors=True)
        STAGES.discard(stage)


def staging_dir(out: Path, overwrite: bool = False) -> Path:
    """A fresh directory beside `out` (same filesystem, so publishing is a rename per file)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {out} exists and is not a directory", 2)
    existing = bundle_files(out)
    if existing and not overwrite:
        raise ExportError(f"{out} already holds an export ({', '.join(p.name for p in existing)}); "
                          "pass --overwrite to replace it, or choose another --out", 2)
    remove_stale(out.parent, f".{out.name}.*.partial", max_age_s=3600)   # a killed export's staging
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        os.chmod(stage, 0o755)                         # mkdtemp makes it private
        STAGES.add(stage)
        return stage
    except OSError as e:
        raise ExportError(f"cannot write to {out.parent}: {e.strerror or e}", 2) from e


def publish(stage: Path, out: Path) -> None:
    """Move the staged artefacts into `out` file by file (each an atomic rename). Bundle files the
    new export does not have (an old engine, say) are removed, since they would disagree with it;
    any other file in `out` (the checkpoint, eval.json, ...) is never touched."""
    out.mkdir(parents=True, exist_ok=True)
    new = {p.name for p in stage.iterdir()}
    for old in bundle_files(out):
        if old.name not in new:
            old.unlink()
    for p in sorted(stage.iterdir(), key=lambda p: p.name == PARITY_NAME):   # parity.json last
        os.replace(p, out / p.name)
    stage.rmdir()


def keep_failed(stage: Path, out: Path) -> Path:
    """Move a failed stage to OUT.failed (replacing an earlier failure) for inspection."""
    failed = out.with_name(out.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    os.replace(stage, failed)
    return failed


def export_checkpoint(checkpoint, out=None, fp16: bool = False, data_root=None, jsonl=None,
                      parity_n: int = 300, extra_samples=(), log=print, overwrite: bool = False,
                      recipe: str | None = None) -> Staged:
    """Export ONNX artefacts and check parity against PyTorch.

    The caller publishes the stage (after adding engines) with publish(); a parity failure raises
    ExportError after moving the stage to OUT.failed for inspection.
    """
    t0 = time.perf_counter()
    if parity_n < 1:
        raise ExportError(f"--parity-samples must be at least 1, got {parity_n}", 2)
    state = load_checkpoint(checkpoint)
    if recipe:                  # the recipe (config file) the run followed, for the metadata
        state = {**state, "train_config": {**(state.get("train_config") or {}), "recipe": recipe}}
    model = model_from_checkpoint(state).eval()
    try:
        check_fits(state, model, checkpoint)
    except CheckpointError as e:
        raise ExportError(f"{e}; it cannot be exported", 2) from e
    out = Path(out) if out else default_out(checkpoint)
    stage = staging_dir(out, overwrite)
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
            result["sha256"] = file_sha256(path)          # the runtime checks it when it loads the bundle
            result["backend"] = "onnxruntime CPUExecutionProvider"
            result["routing_precision"] = routing_precision_report(onnx.load(str(path)))
            report["artefacts"][f"onnx-{precision}"] = result
            log(_line(f"onnx-{precision}", result))
        ov_row = openvino_parity(artefacts["fp32"], batches, reference, model.cfg.layer_sizes)
        if ov_row is not None:
            # A backend check, not an artefact of the bundle: reported, but it does not decide
            # publishing (bf16 logits of trained models exceed the fp16 tolerance; see README).
            ov_row["advisory"] = True
            report["artefacts"][ov_row["name"]] = ov_row
            log(_line(ov_row["name"], ov_row) + "  (advisory: the OpenVINO backend, not a bundle file)")
        # weights no parity input reaches (an unknown word's embedding row, a bias of a path not
        # taken) would still answer wrongly later: every weight must be finite
        report["non_finite_weights"] = [name for name, t in model.state_dict().items()
                                        if t.is_floating_point() and not torch.isfinite(t).all()]
        report["passed"] = not report["non_finite_weights"] and all(
            r["passed"] for r in report["artefacts"].values() if not r.get("advisory"))
        write_report(stage, report)
        if not report["passed"]:
            failed = keep_failed(stage, out)
            problems = "; ".join([f"{k}: {', '.join(r['failures'])}" for k, r in report["artefacts"].items()
                                  if not r["passed"] and not r.get("advisory")]
                                 + [f"non-finite weights in {', '.join(report['non_finite_weights'][:5])}"]
                                 * bool(report["non_finite_weights"]))
            raise ExportError(f"parity check failed: {problems}. Nothing was published; the failed "
                              f"artefacts and parity.json are in {failed}", 1)
        return Staged(stage, out, report, state, model, batches, reference)
    except BaseException:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        raise


def openvino_parity(onnx_path: Path, batches, reference, layer_sizes) -> dict | None:
    """PyTorch vs the runtime's OpenVINO backend on the same inputs, where OpenVINO is installed
    (fp16 tolerances: its visual path runs in bf16 where the CPU has it; routing stays float32)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return None
    from runtime.openvino_backend import OpenVINORunner
    runner = OpenVINORunner(onnx_path, check_weights=False)
    result = compare(reference, run_backend(runner, batches), layer_sizes, TOLERANCES["fp16"])
    result.update(name=f"openvino-{runner.precision}", file=onnx_path.name, backend=runner.name)
    return result


def write_report(directory: Path, report: dict) -> None:
    (directory / PARITY_NAME).write_text(json.dumps(report, indent=2, allow_nan=False))


def _line(name: str, r: dict) -> str:
    d = r["max_abs_logit_diff"]
    return (f"parity {name}: {'OK' if r['passed'] else 'FAILED'}  "
            f"max|dlogit| {'non-finite' if d is None else format(d, '.2e')}  "
            f"top-1 {100 * r['top1_agreement']:.2f}%  gates {100 * r['gate_agreement']:.3f}% "
            f"({r['route_logits_within_eps']} route logits within {r['eps']:g} of 0, "
            f"{r['near_threshold_flips']} flipped)")
