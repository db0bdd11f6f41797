"""Which precision auto runs a model in: the fastest row of the export's parity report that passed.

Export (export/precision.py) judges every artefact x backend x precision it can run against
PyTorch and times it on the parity inputs; the rows live in a bundle's parity.json, or in the
card (NAME.json) beside a single NAME.onnx such as the built-in model. A reduced-precision row
(fp16, bf16, int8) passes by its answers (gates, top-1, accuracy; export/parity.py) and is used
only when it was judged on at least MIN_JUDGED questions. Among the passing rows that can run
here, auto takes the fastest at batch 1 as measured at export when this machine has the same CPU;
on another CPU it ranks them by what the hardware has (HARDWARE_ORDER), since export's timings
say nothing about it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from qgmrn.cpu import cpu_signature

from .errors import ModelError

MIN_JUDGED = 400
# On a CPU export did not time: bf16 hardware makes OpenVINO's bf16 visual path the fastest
# (bench/runtime_latency.py: 0.27x eager at batch 1 on AVX512-BF16); int8 convolutions need VNNI
# or AMX to beat float32; otherwise onnxruntime fp32.
HARDWARE_ORDER = ("openvino-bf16", "openvino-int8", "onnx-int8", "onnx-fp32")
ENGINE_MODULE = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


@dataclass(frozen=True)
class Choice:
    key: str                      # the parity row: "openvino-bf16", "onnx-fp32", ...
    engine: str                   # "onnxruntime" or "openvino"
    precision: str                # the visual path's precision: fp32, fp16, bf16, int8
    path: Path                    # the .onnx file it runs
    reason: str                   # why auto chose it, for the log and model.backend_reason
    sha256: str | None = None     # the file parity proved


MAX_REPORT_BYTES = 16 << 20          # a parity report or card is a few KB; more is not one


def require_regular(path: Path, what: str = "a model file") -> None:
    """A model file, report or card must be a regular file: a FIFO or a link to /dev/zero would
    hang whoever reads it, and a directory is not a file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ModelError(f"{path}: cannot read it ({e.strerror or e})") from e
    if not stat.S_ISREG(mode):
        kind = "directory" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else \
            "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file"
        raise ModelError(f"{path} is a {kind}, not a regular file; {what} must be one")


def read_report(path: Path, what: str) -> dict:
    """A JSON object from a parity report or card, or a ModelError naming the file."""
    require_regular(path, what)
    if path.stat().st_size > MAX_REPORT_BYTES:
        raise ModelError(f"{path} is {path.stat().st_size} bytes: too large for {what}")
    try:
        data = json.loads(path.read_text())
    except RecursionError:
        raise ModelError(f"{path} is nested too deeply to be {what}; re-export the checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is unreadable ({e}); re-export the checkpoint") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def report_rows(path: Path) -> tuple[dict, Path]:
    """(parity rows, the folder their files are in) for a bundle or a NAME.onnx with a NAME.json
    card; ({}, folder) when there is no report. Rows are checked field by field."""
    if path.is_dir():
        report, folder = path / "parity.json", path
    else:
        report, folder = path.with_suffix(".json"), path.parent
    if not report.exists():
        return {}, folder
    return rows_of(read_report(report, "a parity report"), report), folder


def rows_of(report: dict, path: Path) -> dict:
    """The parity rows of a report already read from `path`, each checked field by field."""
    rows = report.get("artefacts") or {}
    if not isinstance(rows, dict):
        raise ModelError(f"{path}: its 'artefacts' field is a {type(rows).__name__}, not an object of rows")
    for key, row in rows.items():
        _check_row(path, key, row)
    return rows


def _check_row(report: Path, key: str, row) -> None:
    def bad(field, why):
        raise ModelError(f"{report}: row {key!r}: field {field!r} {why}")
    if not isinstance(row, dict):
        raise ModelError(f"{report}: row {key!r} is a {type(row).__name__}, not an object")
    file = row.get("file")
    if file is not None and (not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file):
        bad("file", f"is {file!r}: a row names a file inside its folder, never a path")
    if "passed" in row and not isinstance(row["passed"], bool):
        bad("passed", f"is {row['passed']!r}, not true or false")
    samples = row.get("samples", 0)
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 0):
        bad("samples", f"is {samples!r}, not a count")
    latency = row.get("latency_ms")
    if latency is not None and (not isinstance(latency, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in latency.values() if v is not None)):
        bad("latency_ms", f"is {latency!r}, not milliseconds by batch size")
    for field in ("sha256", "engine", "precision"):
        if row.get(field) is not None and not isinstance(row[field], str):
            bad(field, f"is {row[field]!r}, not a string")


def _usable(key: str, row: dict, folder: Path, here: dict) -> str | None:
    """Why this row cannot be auto's choice here, or None."""
    if row.get("passed") is not True:
        return "did not pass parity"
    engine, precision = row.get("engine"), row.get("precision")
    if engine not in ENGINE_MODULE or not row.get("file"):
        return "not a CPU runtime row"
    if precision != "fp32" and (row.get("samples") or 0) < MIN_JUDGED:
        return f"judged on {row.get('samples')} questions (auto needs {MIN_JUDGED})"
    if importlib.util.find_spec(ENGINE_MODULE[engine]) is None:
        return f"{engine} is not installed"
    if precision == "bf16" and not here["bf16"]:
        return "this CPU has no bf16 hardware"
    if precision == "int8" and not here["vnni"]:
        return "this CPU has no int8 dot-product hardware (VNNI/AMX)"
    if not (folder / row["file"]).exists():
        return f"{row['file']} is missing"
    return None


def rank(rows: dict, folder: Path, here: dict | None = None) -> tuple[list[Choice], list[str]]:
    """The passing rows that can run here, fastest first, and why the others were left out."""
    here = here or cpu_signature()
    usable, skipped = [], []
    for key, row in rows.items():
        why = _usable(key, row, folder, here)
        if why:
            skipped.append(f"{key}: {why}")
        else:
            usable.append((key, row))
    same_cpu = all(_same_cpu(row.get("cpu"), here) and (row.get("latency_ms") or {}).get("1") for _, row in usable)
    if same_cpu:
        usable.sort(key=lambda kr: kr[1]["latency_ms"]["1"])
    else:
        usable.sort(key=lambda kr: HARDWARE_ORDER.index(kr[0]) if kr[0] in HARDWARE_ORDER else len(HARDWARE_ORDER))
    fp32 = next((row.get("latency_ms", {}).get("1") for key, row in usable if key == "onnx-fp32"), None)
    choices = []
    for key, row in usable:
        n = row.get("samples")
        if same_cpu:
            speed = f"{row['latency_ms']['1']:.2f} ms at batch 1 when exported on this CPU" + (
                f" ({row['latency_ms']['1'] / fp32:.2f}x onnx-fp32)" if fp32 else "")
        else:
            speed = "ranked by this CPU's features (export timed another CPU)"
        agree = row.get("top1_agreement")
        reason = (f"{key}: passed parity on {n} questions"
                  + (f" (top-1 {100 * agree:.2f}% vs PyTorch, gates identical)" if agree is not None else "")
                  + f"; {speed}")
        choices.append(Choice(key, row["engine"], row["precision"], folder / row["file"], reason, row.get("sha256")))
    return choices, skipped


def _same_cpu(recorded, here: dict) -> bool:
    return isinstance(recorded, dict) and recorded.get("model") == here["model"] and recorded.get("cores") == here["cores"]


def check_sha(path: Path, expected: str | None) -> None:
    """Refuse a file that is not the one its parity report proved (altered or corrupt)."""
    if not expected:
        return
    require_regular(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ModelError(f"{path} is not the file its parity report proved (sha256 differs): it was "
                         "altered or corrupted; re-export the checkpoint")
