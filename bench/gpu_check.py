"""The GPU half, proven in one command: trains, times and verifies QGMRN on a CUDA GPU.

    python bench/gpu_check.py --out docs/gpu            # on a machine with a CUDA GPU (< 8 min)
    python bench/gpu_check.py --out /tmp/g --cpu-smoke  # the same pipeline, tiny, on the CPU (tests)

Writes report.json and report.md to --out and prints the Markdown:
- environment: GPU, memory, driver and CUDA versions, torch, TensorRT / onnxruntime providers;
- training samples/s and peak memory, fp32 vs bf16 autocast + channels-last, for small, brn-c32, frn;
- a real short run: torchrun --nproc_per_node=1 -m qgmrn.train (NCCL) with a checkpoint, a
  --resume continuation and an evaluation, on data generated on that machine;
- inference latency, PyTorch CUDA eager vs a captured CUDA graph, brn-c32 at batch 1 and 64;
- export on that machine and parity of PyTorch-CUDA vs onnxruntime (CPU, and the CUDA provider
  when importable): logits, top-1, gates; TensorRT engine and parity where TensorRT is importable.
Without CUDA (and without --cpu-smoke) it says what it needs and exits with status 3.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_SAMPLE = REPO.parent / "shared" / "data" / "clevr-real-sample"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def environment(device: str) -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "device": device, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   compute_capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    try:
        import tensorrt
        env["tensorrt"] = tensorrt.__version__
    except Exception as e:                                  # ImportError, or a broken install
        env["tensorrt"] = f"absent ({type(e).__name__})"
    try:
        import onnxruntime as ort
        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime"] = "absent"
    return env


def training_throughput(presets, device: str, batch: int, steps: int) -> list[dict]:
    import torch
    from train_throughput import measure
    rows = []
    for preset in presets:
        for amp in (False, True):
            try:
                r = measure(preset, batch, device, amp, steps, 2)
                rows.append({**r, "mode": "bf16+channels_last" if amp else "fp32", "batch": batch})
            except RuntimeError as e:                         # out of memory and the like: a row, not a crash
                rows.append({"preset": preset, "mode": "bf16" if amp else "fp32", "error": str(e)[:200]})
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def short_run(work: Path, preset: str, steps: int, images: int, smoke: bool) -> dict:
    """Generate data here, torchrun one process for `steps`, resume for half as many more, evaluate."""
    from qgmrn.data.generate import generate
    data = work / "data"
    t = time.perf_counter()
    generate(data, images, max(8, images // 10), 10, seed=0, log=lambda *a: None)
    out = {"generate_seconds": round(time.perf_counter() - t, 1), "images": images}
    run = work / "run"
    common = ["--data-root", str(data), "--preset", preset, "--out", str(run), "--set", "max_val=500"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
                if not smoke else [sys.executable])
    first = launcher + ["-m", "qgmrn.train", "--steps", str(steps), "--set", f"save_every={max(1, steps // 2)}",
                        "--batch-size", "8" if smoke else "64"] + common
    t = time.perf_counter()
    r1 = subprocess.run(first, capture_output=True, text=True, env=env)
    out["train_seconds"] = round(time.perf_counter() - t, 1)
    out["train_rc"] = r1.returncode
    if r1.returncode != 0:
        out["train_error"] = r1.stderr[-1500:]
        return out
    more = steps + max(1, steps // 2)
    t = time.perf_counter()
    r2 = subprocess.run(launcher + ["-m", "qgmrn.train", "--resume", "--out", str(run), "--steps", str(more)],
                        capture_output=True, text=True, env=env)
    out["resume_seconds"] = round(time.perf_counter() - t, 1)
    out["resume_rc"] = r2.returncode
    if r2.returncode != 0:
        out["resume_error"] = r2.stderr[-1500:]
        return out
    t = time.perf_counter()
    r3 = subprocess.run([sys.executable, "-m", "qgmrn.evaluate", str(run / "ckpt.pt"), "--json", str(work / "eval.json")],
                        capture_output=True, text=True, env=env)
    out["evaluate_seconds"] = round(time.perf_counter() - t, 1)
    out["evaluate_rc"] = r3.returncode
    if r3.returncode == 0:
        ev = json.loads((work / "eval.json").read_text())
        out.update(val_overall=ev["overall"], val_per_type=ev["per_type"],
                   execution_ratio=ev["routing"]["overall_execution_ratio"])
    else:
        out["evaluate_error"] = r3.stderr[-1500:]
    import torch
    state = torch.load(run / "ckpt.pt", weights_only=True)
    out["final_step"] = state["step"]
    out["checkpoint"] = str(run / "ckpt.pt")
    return out


def inference_latency(preset: str, device: str, batches, iters: int) -> list[dict]:
    """Eval-mode forward: eager vs one captured CUDA graph replay (static shapes per batch size)."""
    import torch
    from qgmrn.model import create_model
    torch.manual_seed(0)
    model = create_model(preset, vocab_size=90, num_answers=28).to(device).eval()
    size = model.cfg.image_size
    rows = []
    for b in batches:
        image = torch.randn(b, 3, size, size, device=device)
        tokens = torch.randint(2, 90, (b, 16), device=device)
        lengths = torch.full((b,), 16, device=device)

        def timed(fn) -> list[float]:
            times = []
            for _ in range(iters):
                if device == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t = time.perf_counter()
                    fn()
                    times.append(1e3 * (time.perf_counter() - t))
            return times

        with torch.inference_mode():
            for _ in range(5):
                model(image, tokens, lengths)
            eager = timed(lambda: model(image, tokens, lengths))
            rows.append(_latency_row(preset, b, "eager", eager))
            if device == "cuda":
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        model(image, tokens, lengths)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = model(image, tokens, lengths)
                graph.replay()
                torch.cuda.synchronize()
                ref = model(image, tokens, lengths).logits
                same = bool(torch.allclose(static_out.logits, ref, atol=1e-4, rtol=1e-4))
                rows.append({**_latency_row(preset, b, "cuda-graph", timed(graph.replay)), "matches_eager": same})
    return rows


def _latency_row(preset, batch, mode, times) -> dict:
    q = statistics.quantiles(times, n=10)
    return {"preset": preset, "batch": batch, "mode": mode, "median_ms": round(statistics.median(times), 3),
            "p10_ms": round(q[0], 3), "p90_ms": round(q[-1], 3)}


def export_and_parity(checkpoint: str, work: Path, device: str, data_root: str | None) -> dict:
    """Export on this machine; PyTorch on `device` vs onnxruntime CPU (and CUDA provider) on the
    real CLEVR sample where present, else generated val images."""
    import numpy as np
    import torch
    from export.bundle import export_checkpoint, publish
    from export.parity import TOLERANCES, compare, make_batches, parity_samples, run_backend, run_torch
    from qgmrn.checkpoint import load_checkpoint, model_from_checkpoint
    from qgmrn.preprocess import Vocab
    torch.backends.cuda.matmul.allow_tf32 = False                # parity in true float32
    torch.backends.cudnn.allow_tf32 = False
    out = work / "bundle"
    t = time.perf_counter()
    staged = export_checkpoint(checkpoint, out, fp16=True, data_root=data_root, parity_n=120, log=lambda *a: None)
    publish(staged.stage, out)
    result = {"export_seconds": round(time.perf_counter() - t, 1), "inputs": staged.report["inputs"],
              "cpu_parity": {k: _brief(v) for k, v in staged.report["artefacts"].items()}}
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state).eval()
    with tempfile.TemporaryDirectory() as scratch:
        samples, source = parity_samples(data_root, None, 120, scratch=scratch)
        batches = list(make_batches(samples, Vocab(list(state["vocab"])), model.cfg.image_size))
    reference = run_torch(model, batches, device)
    from runtime.backends import OnnxRuntimeRunner
    rows = {}
    for name, dev in (("onnxruntime-cpu", "cpu"), ("onnxruntime-cuda", "auto")):
        runner = OnnxRuntimeRunner(out / "model.onnx", dev)
        if dev == "auto" and "CUDAExecutionProvider" not in runner.providers:
            rows[name] = {"absent": f"providers {runner.providers}"}
            continue
        rows[name] = _brief(compare(reference, run_backend(runner, batches), model.cfg.layer_sizes, TOLERANCES["fp32"]))
    result["pytorch_" + device + "_vs"] = rows
    result["parity_inputs"] = source
    try:
        from export.trt import EngineOptions, build_engine
        from runtime.trt_engine import TrtRunner
        engine = build_engine(out / "model.fp16.onnx", out / "model.engine", EngineOptions(fp16=True))
        rows["tensorrt-fp16"] = _brief(compare(reference, run_backend(TrtRunner(engine), batches, 64),
                                               model.cfg.layer_sizes, TOLERANCES["fp16"]))
    except Exception as e:                                       # ImportError without TensorRT
        rows["tensorrt"] = {"absent": f"{type(e).__name__}: {str(e)[:160]}"}
    del np
    return result


def _brief(r: dict) -> dict:
    keys = ("passed", "max_abs_logit_diff", "top1_agreement", "gate_agreement", "gates_differ_outside_eps",
            "route_logits_within_eps", "samples", "failures")
    return {k: r[k] for k in keys if k in r}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check — {env.get('gpu', env['device'])}, {report['date']}", "",
             "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()] + ["", "## Training throughput", "",
             "| preset | mode | batch | samples/s | peak MiB |", "|---|---|---|---|---|"]
    for r in report["training"]:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['mode']} | - | error: {r['error'][:60]} | - |")
        else:
            peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") else "-"
            lines.append(f"| {r['preset']} | {r['mode']} | {r['batch']} | {r['samples_s']:.1f} | {peak} |")
    s = report["short_run"]
    lines += ["", "## Short run (torchrun, checkpoint, --resume, evaluate)", ""] + \
        [f"- {k}: {v}" for k, v in s.items() if k != "checkpoint"]
    lines += ["", "## Inference latency (ms)", "", "| preset | batch | mode | median | p10 | p90 |", "|---|---|---|---|---|---|"]
    for r in report["inference"]:
        extra = "" if "matches_eager" not in r else (" (same logits)" if r["matches_eager"] else " (DIFFERS)")
        lines.append(f"| {r['preset']} | {r['batch']} | {r['mode']}{extra} | {r['median_ms']} | {r['p10_ms']} | {r['p90_ms']} |")
    p = report.get("export", {})
    lines += ["", "## Export and parity", ""]
    for k, v in p.items():
        lines.append(f"- {k}: {json.dumps(v)}")
    lines += ["", f"Total wall time: {report['seconds']:.0f} s"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for report.json and report.md")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the pipeline tiny on the CPU (for tests)")
    a = ap.parse_args(argv)
    import torch
    cuda = torch.cuda.is_available()
    if not cuda and not a.cpu_smoke:
        print("gpu_check needs a CUDA GPU and PyTorch built with CUDA (torch.cuda.is_available() is False "
              f"here, torch {torch.__version__}); run it on a GPU machine, or pass --cpu-smoke to check the "
              "pipeline on this CPU", file=sys.stderr)
        return 3
    device = "cuda" if cuda and not a.cpu_smoke else "cpu"
    smoke = a.cpu_smoke
    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": environment(device)}
    work = Path(tempfile.mkdtemp(prefix="qgmrn-gpu-check-"))
    try:
        report["training"] = training_throughput(["tiny"] if smoke else ["small", "brn-c32", "frn"], device,
                                                 8 if smoke else 64, 2 if smoke else 20)
        report["short_run"] = short_run(work, "tiny" if smoke else "brn-c32", 4 if smoke else 300,
                                        24 if smoke else 3000, smoke)
        report["inference"] = inference_latency("tiny" if smoke else "brn-c32", device,
                                                (1, 4) if smoke else (1, 64), 10 if smoke else 100)
        ckpt = report["short_run"].get("checkpoint")
        if ckpt:
            data_root = str(REAL_SAMPLE) if REAL_SAMPLE.exists() else None
            report["export"] = export_and_parity(ckpt, work, device, data_root)
    finally:
        report["seconds"] = time.perf_counter() - t0
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        md = markdown({**{"training": [], "short_run": {}, "inference": []}, **report})
        (out / "report.md").write_text(md)
        print(md)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
