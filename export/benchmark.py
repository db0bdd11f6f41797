"""One table of every way this model can run here, like `yolo benchmark`:

    python -m export.benchmark CKPT_OR_BUNDLE [--data-root DIR | --jsonl FILE] [-n 400] [--out DIR]

A checkpoint is exported first (fp32, fp16 and int8, parity on -n questions from the data); a
bundle, an .onnx with its card, or "builtin" is benchmarked with the parity rows it carries. One
row per artefact x backend x precision: file size, accuracy, top-1 agreement and identical gates
vs PyTorch, pass/fail (export/parity.py), then, each in a fresh process so that cold start and
peak memory are the row's own: end-to-end latency at batch 1 and 8 from decoded images
(preprocessing + model, `Model.predict_batch`), answers/s at batch 8, cold start (imports, load,
first answer) and peak RSS; PyTorch eager (given a checkpoint) and what `auto` picks are timed in
the same run, so ratios compare like with like. Writes benchmark.md and benchmark.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict) -> dict:
    """Time one row in this (fresh) process: spec has kind (row key, "auto" or "pytorch"), model,
    engine, precision, file, checkpoint, images, questions, iters."""
    t0 = time.perf_counter()
    from PIL import Image
    images = []
    for p in spec["images"]:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))          # decoded before timing: the app's own frames
    questions = spec["questions"]
    answer, backend = _torch_answerer(spec) if spec["kind"] == "pytorch" else _runtime_answerer(spec)
    answer(images[:1], questions[:1])
    backend, execution = backend
    out = {"kind": spec["kind"], "backend": backend, "execution": execution, "cold_start_s": time.perf_counter() - t0}
    for batch in (1, 8):
        ims = [images[i % len(images)] for i in range(batch)]
        qs = [questions[i % len(questions)] for i in range(batch)]
        for _ in range(3):
            answer(ims, qs)
        times = []
        for _ in range(spec["iters"] if batch == 1 else max(5, spec["iters"] // 4)):
            t = time.perf_counter()
            answer(ims, qs)
            times.append(time.perf_counter() - t)
        out[f"b{batch}_ms"] = 1e3 * sorted(times)[len(times) // 2]
    out["answers_per_s"] = 8 / (out["b8_ms"] / 1e3)
    out["peak_rss_mib"] = _peak_rss_mib()
    out["torch_imported"] = "torch" in sys.modules
    return out


def _torch_answerer(spec: dict):
    import numpy as np
    import torch
    from qgmrn.checkpoint import load_checkpoint, model_from_checkpoint
    from qgmrn.preprocess import Vocab, encode_batch, preprocess_image
    state = load_checkpoint(spec["checkpoint"])
    net = model_from_checkpoint(state).eval()
    vocab, size = Vocab(list(state["vocab"])), net.cfg.image_size

    def answer(ims, qs):
        tokens, lengths, _ = encode_batch(vocab, qs)
        pixels = np.stack([preprocess_image(im, size) for im in ims])
        with torch.inference_mode():
            logits = net(torch.from_numpy(pixels), torch.from_numpy(tokens), torch.from_numpy(lengths))[0]
        return [state["answers"][int(i)] for i in logits.argmax(1)]
    return answer, (f"PyTorch {torch.__version__} eager", "masked")     # every module computed, as the export


def _runtime_answerer(spec: dict):
    import runtime
    if spec["kind"] == "auto":
        model = runtime.load(spec["model"])
    else:
        from runtime.backends import runner_for
        model = runtime.Model(spec["file"], _runner=runner_for(spec["engine"], spec["precision"], Path(spec["file"])))
    return (lambda ims, qs: model.answer_batch(ims, qs)), (model.backend, model.execution)


def _time(spec: dict) -> dict | None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "export.benchmark", "--worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode != 0:
        print(f"  {spec['kind']}: could not run ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _inputs(a, rows_source: Path | None) -> tuple[list[str], list[str]]:
    """Eight images and questions for the latency runs: the given data, else the real CLEVR sample."""
    from qgmrn.data.sources import DataError, load_clevr, load_jsonl
    if a.jsonl:
        samples = load_jsonl(a.jsonl, require_answers=False)
    else:
        root = a.data_root or str(REPO.parent / "shared" / "data" / "clevr-real-sample")
        if not a.data_root and not Path(root).is_dir():     # the developers' checkout layout only
            raise DataError("give --data-root DIR (CLEVR layout) or --jsonl FILE: the latency rows need "
                            "images and questions")
        samples = load_clevr(root, "val", require_answers=False)
    seen, images, questions = set(), [], []
    for s in samples:
        if s.image not in seen:
            seen.add(s.image)
            images.append(s.image)
            questions.append(s.question)
        if len(images) == 8:
            break
    return images, questions


def _resolve(a, tmp: Path) -> tuple[Path, str | None, dict, Path]:
    """(model path for auto, checkpoint for eager or None, parity rows, folder of their files)."""
    from runtime import builtin_path
    from runtime.precision import report_rows
    target = a.model
    if target == "builtin":
        path = builtin_path()
    else:
        path = Path(target)
        if not path.exists():
            from qgmrn.data.sources import DataError
            raise DataError(f"not found: {path}")
    if path.suffix == ".pt":
        from .bundle import export_checkpoint, publish
        out = tmp / "bundle"
        staged = export_checkpoint(path, out, fp16=True, int8=True, data_root=a.data_root, jsonl=a.jsonl,
                                   parity_n=a.n, log=lambda line: print(f"  {line}"))
        publish(staged.stage, out)
        rows, folder = report_rows(out)
        return out, str(path), rows, folder
    rows, folder = report_rows(path)
    report = path / "parity.json" if path.is_dir() else path.with_suffix(".json")
    if not rows and report.exists():                      # a card with the fp32 row only (older exports)
        card = json.loads(report.read_text())
        if isinstance(card.get("parity"), dict):
            rows = {"onnx-fp32": {**card["parity"], "engine": "onnxruntime", "precision": "fp32",
                                  "file": path.name if path.is_file() else "model.onnx"}}
    if not rows:
        rows = {"onnx-fp32": {"engine": "onnxruntime", "precision": "fp32", "passed": None,
                              "file": path.name if path.is_file() else "model.onnx"}}
    ckpt = json.loads(report.read_text()).get("checkpoint") if report.exists() and path.is_dir() else None
    if ckpt and not Path(ckpt).is_absolute():            # older reports: relative to where export ran
        ckpt = next((str(c.resolve()) for c in (Path(ckpt), path.parent / Path(ckpt).name, path.parent.parent /
                                                  Path(ckpt).name) if c.is_file()), None)
    return path, ckpt if ckpt and Path(ckpt).exists() else None, rows, folder


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table(rows: dict, timed: dict, base_key: str) -> str:
    base = timed.get(base_key)
    head = (f"| row | backend, execution | file | MB | accuracy % | top-1 vs PyTorch % | gates outside band | parity | b1 ms | "
            f"b1 vs {base_key} | b8 ms | b8 vs {base_key} | answers/s (b8) | cold start s | peak RSS MiB |")
    lines = [head, "|---" * 15 + "|"]
    for key in [*[k for k in ("pytorch",) if k in timed], *rows, "auto"]:
        r, t = rows.get(key, {}), timed.get(key)
        size = f"{r['bytes'] / 1e6:.2f}" if r.get("bytes") else "-"
        gates = "-" if r.get("gates_differ_outside_eps") is None else (
            "identical" if r["gates_differ_outside_eps"] == 0 else f"{r['gates_differ_outside_eps']} differ")
        verdict = {True: "pass", False: "FAIL", None: "-"}[r.get("passed")] if key in rows else "-"
        if key in rows and r.get("published") is False:
            verdict += " (left out)"
        backend = f"{t['backend']}, {t.get('execution', 'masked')}" if t else r.get("backend", "-")
        cells = [key, backend, r.get("file", "-"), size, _pct(r.get("accuracy")),
                 _pct(r.get("top1_agreement")), gates, verdict]
        if t:
            ratio = (lambda k: f"{t[k] / base[k]:.2f}x") if base else (lambda k: "-")
            cells += [f"{t['b1_ms']:.2f}", ratio("b1_ms"), f"{t['b8_ms']:.2f}", ratio("b8_ms"), f"{t['answers_per_s']:.0f}",
                      f"{t['cold_start_s']:.2f}", f"{t['peak_rss_mib']:.0f}"]
        else:
            cells += ["-"] * 7
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="checkpoint (.pt), bundle directory, .onnx, or builtin")
    ap.add_argument("--data-root", help="CLEVR layout: its val split feeds parity (and the latency images)")
    ap.add_argument("--jsonl", help="JSON-lines file instead of --data-root")
    ap.add_argument("-n", type=int, default=400, help="parity questions when exporting a checkpoint (default 400)")
    ap.add_argument("--iters", type=int, default=40, help="timed batch-1 calls per row (batch 8: a quarter)")
    ap.add_argument("--out", type=Path, help="where benchmark.md and benchmark.json go (default: benchmark/NAME)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    if not a.model:
        ap.error("give a checkpoint, a bundle, an .onnx or builtin")
    if a.n < 1 or a.iters < 1:
        ap.error(f"-n and --iters must be at least 1, got -n {a.n} --iters {a.iters}")
    # Workers run in the repository's folder: every path is made absolute before it is handed on.
    a.data_root = str(Path(a.data_root).resolve()) if a.data_root else None
    a.jsonl = str(Path(a.jsonl).resolve()) if a.jsonl else None
    if a.model != "builtin":
        a.model = str(Path(a.model).resolve())
    try:
        return _benchmark(a)
    except Exception as e:
        from qgmrn.checkpoint import CheckpointError
        from qgmrn.data.sources import DataError
        from qgmrn.preprocess import ImageError, QuestionError
        from runtime.errors import ModelError
        from .bundle import ExportError
        if isinstance(e, (CheckpointError, DataError, ModelError, ExportError, ImageError, QuestionError, OSError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def _benchmark(a) -> int:
    from qgmrn.cpu import cpu_signature
    cpu = cpu_signature()
    print(f"CPU: {cpu['model']} ({cpu['cores']} cores; bf16 {cpu['bf16']}, VNNI {cpu['vnni']}, AMX {cpu['amx']})")
    with tempfile.TemporaryDirectory(prefix="qgmrn-benchmark-") as tmp:
        model, ckpt, rows, folder = _resolve(a, Path(tmp))
        images, questions = _inputs(a, folder)
        common = {"images": images, "questions": questions, "iters": a.iters, "model": str(model), "checkpoint": ckpt}
        timed = {}
        for key in (["pytorch"] if ckpt else []) + list(rows) + ["auto"]:
            r = rows.get(key, {})
            if key in rows and (r.get("engine") not in ("onnxruntime", "openvino") or not (folder / r["file"]).exists()):
                continue                                # a GPU row, or a file left out of the bundle
            spec = {**common, "kind": key, "engine": r.get("engine"), "precision": r.get("precision"),
                    "file": str(folder / r["file"]) if key in rows else None}
            print(f"timing {key} ...", flush=True)
            got = _time(spec)
            if got:
                timed[key] = got
        if not timed:
            print("error: no row could be timed (see the reasons above); nothing was written", file=sys.stderr)
            return 1
        base_key = "pytorch" if "pytorch" in timed else "onnx-fp32"
        text = table(rows, timed, base_key)
    name = "builtin" if a.model == "builtin" else Path(a.model).stem
    out = a.out or Path("benchmark") / name
    out.mkdir(parents=True, exist_ok=True)
    auto = timed.get("auto", {}).get("backend")
    header = (f"CPU: {cpu['model']}, {cpu['cores']} cores (bf16 {cpu['bf16']}, VNNI {cpu['vnni']}, AMX {cpu['amx']}); "
              f"end to end from decoded images; auto chose: {auto}")
    (out / "benchmark.md").write_text(f"{header}\n\n{text}\n")
    (out / "benchmark.json").write_text(json.dumps({"cpu": cpu, "rows": rows, "timed": timed, "base": base_key},
                                                   indent=1, default=str))
    print(f"\n{header}\n\n{text}\n\nwrote {out}/benchmark.md and benchmark.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
