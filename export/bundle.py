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
from qgmrn.files import current_umask, remove_stale
from qgmrn.preprocess import Vocab

from .onnx_export import build_metadata, export_onnx, file_sha256, routing_precision_report
from .parity import MIN_JUDGED, answer_labels, make_batches, parity_samples, run_torch
from .precision import judge_rows

ONNX_NAME, ONNX_FP16_NAME, ONNX_INT8_NAME, PARITY_NAME = "model.onnx", "model.fp16.onnx", "model.int8.onnx", "parity.json"
BUNDLE_FILES = (ONNX_NAME, ONNX_FP16_NAME, ONNX_INT8_NAME, PARITY_NAME)


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
    labels: object = None          # their true answers as indices (parity.answer_labels)


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
        os.chmod(stage, 0o777 & ~current_umask())             # mkdtemp makes it private; publish as mkdir would
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
                      parity_n: int = MIN_JUDGED, extra_samples=(), log=print, overwrite: bool = False,
                      recipe: str | None = None, int8: bool = False, calib: int = 256) -> Staged:
    """Export ONNX artefacts and check parity against PyTorch, one row per artefact x CPU backend x
    precision (export/precision.py).

    The caller publishes the stage (after adding engines) with publish(); a failed onnx-fp32 row
    raises ExportError after moving the stage to OUT.failed for inspection. A reduced-precision
    file (fp16, int8) that no row passed is left out of the stage, its rows saying why.
    """
    t0 = time.perf_counter()
    if parity_n < 1:
        raise ExportError(f"--parity-samples must be at least 1, got {parity_n}", 2)
    if int8 and calib < 1:
        raise ExportError(f"--calib must be at least 1, got {calib}", 2)
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
        vocab = Vocab(list(state["vocab"]))
        artefacts, report = _write_artefacts(state, model, stage, sha, fp16, int8, calib, data_root, jsonl, vocab, log)
        with tempfile.TemporaryDirectory(prefix="qgmrn-parity-") as scratch:
            samples, source = parity_samples(data_root, jsonl, parity_n, scratch=scratch)
            samples = list(samples) + list(extra_samples)
            batches = list(make_batches(samples, vocab, model.cfg.image_size))
        reference = run_torch(model, batches)
        report = {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": sha, "inputs": source,
                  "samples": len(samples), "export_seconds": round(time.perf_counter() - t0, 2), **report}
        labels = answer_labels(samples, list(state["answers"]))
        rows = judge_rows(artefacts, batches, reference, model.cfg.layer_sizes, labels, log)
        report["artefacts"] = finish_rows(rows, artefacts, log)
        # weights no parity input reaches (an unknown word's embedding row, a bias of a path not
        # taken) would still answer wrongly later: every weight must be finite
        report["non_finite_weights"] = [name for name, t in model.state_dict().items()
                                        if t.is_floating_point() and not torch.isfinite(t).all()]
        report["passed"] = not report["non_finite_weights"] and report["artefacts"]["onnx-fp32"]["passed"]
        write_report(stage, report)
        if not report["passed"]:
            failed = keep_failed(stage, out)
            r = report["artefacts"]["onnx-fp32"]
            problems = "; ".join([f"onnx-fp32: {', '.join(r['failures'])}"] * (not r["passed"])
                                 + [f"non-finite weights in {', '.join(report['non_finite_weights'][:5])}"]
                                 * bool(report["non_finite_weights"]))
            raise ExportError(f"parity check failed: {problems}. Nothing was published; the failed "
                              f"artefacts and parity.json are in {failed}", 1)
        return Staged(stage, out, report, state, model, batches, reference, labels)
    except BaseException:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        raise


def _write_artefacts(state, model, stage: Path, sha: str, fp16: bool, int8: bool, calib: int, data_root, jsonl,
                     vocab, log) -> tuple[dict[str, Path], dict]:
    """model.onnx, and model.fp16.onnx / model.int8.onnx when asked; (files by precision, report
    fields about how they were made)."""
    t = time.perf_counter()
    artefacts = {"fp32": stage / ONNX_NAME}
    export_onnx(model, artefacts["fp32"], build_metadata(state, sha, "fp32"))
    if fp16:
        artefacts["fp16"] = stage / ONNX_FP16_NAME
        export_onnx(model_from_checkpoint(state), artefacts["fp16"], build_metadata(state, sha, "fp16"), fp16=True)
    fields: dict = {}
    if int8:
        from .quantize import calibration_batches, calibration_samples, quantize_int8
        with tempfile.TemporaryDirectory(prefix="qgmrn-calib-") as scratch:
            samples, where = calibration_samples(state, data_root, jsonl, calib, scratch)
            batches = calibration_batches(samples, vocab, model.cfg.image_size, calib)
        artefacts["int8"] = stage / ONNX_INT8_NAME
        fields["int8"] = {**quantize_int8(artefacts["fp32"], artefacts["int8"], batches,
                                          build_metadata(state, sha, "int8")), "calibration_source": where}
    log(f"exported {', '.join(p.name for p in artefacts.values())} in {time.perf_counter() - t:.1f} s")
    return artefacts, fields


def finish_rows(rows: dict, artefacts: dict[str, Path], log) -> dict:
    """File facts on the rows; a reduced-precision file that no row passed is removed (never
    published), and its rows say so."""
    for precision, path in artefacts.items():
        using = {k: r for k, r in rows.items() if r["file"] == path.name}
        keep = precision == "fp32" or any(r["passed"] for r in using.values())
        facts = {"bytes": path.stat().st_size, "sha256": file_sha256(path)} if path.exists() else {}
        if keep:
            facts["routing_precision"] = routing_precision_report(onnx.load(str(path)))
        for r in using.values():
            r.update(facts, published=keep)
        if not keep:
            path.unlink()
            log(f"{path.name} left out of the bundle: no backend passed parity with it")
    for r in rows.values():
        r.setdefault("published", True)
        # rows other than onnx-fp32 decide what auto may run, not whether the bundle publishes
        r["advisory"] = not (r.get("engine") == "onnxruntime" and r["precision"] == "fp32")
    return rows


def write_report(directory: Path, report: dict) -> None:
    (directory / PARITY_NAME).write_text(json.dumps(report, indent=2, allow_nan=False))
