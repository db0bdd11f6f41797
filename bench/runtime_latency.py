"""Runtime speed and memory, side by side in one run on the same inputs: PyTorch eager (the
checkpoint) vs the torch-free runtime with onnxruntime fp32 (and fp16), batch 1 and 8, plus
the fp32 graph with the paper's narrow conv groups left unmerged (what export's group merging buys).

    python bench/runtime_latency.py [--checkpoint ckpt.pt] [--iters 60]

Without --checkpoint a random-init brn-c32 (224x224) checkpoint is made and exported. Each
backend runs in its own fresh process, which reports its cold start (imports + load + first
answer), model latency on preprocessed inputs (median and p10-p90), end-to-end answer() latency
from a PNG, and its peak RSS. The fraction of the CPU's peak FLOP rate uses a float32 matrix
multiply measured in the same run.
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
sys.path.insert(0, str(REPO))   # run from a checkout without installing
SAMPLE = REPO.parent / "shared" / "data" / "clevr-real-sample"
QUESTIONS = ["What color is the large sphere?", "How many cubes are there?",
             "Is there a metal cylinder left of the red thing?", "What size is the cube behind the sphere?",
             "Are there more spheres than cylinders?", "Does the small cube have the same color as the ball?",
             "What material is the big thing?", "How many rubber objects are right of the gray cube?"]


def _images():
    images = sorted((SAMPLE / "images" / "val").glob("*.png"))
    if not images:
        raise SystemExit(f"no images under {SAMPLE}/images/val")
    return [str(p) for p in images[:8]]


def worker(kind: str, bundle: str, checkpoint: str, iters: int) -> dict:
    t0 = time.perf_counter()
    images = _images()
    if kind == "pytorch":
        import torch
        from qgmrn.checkpoint import load_checkpoint, model_from_checkpoint
        from qgmrn.preprocess import Vocab, encode_batch, preprocess_image
        state = load_checkpoint(checkpoint)
        model = model_from_checkpoint(state).eval()
        vocab, size = Vocab(list(state["vocab"])), model.cfg.image_size

        def run(pixels, tokens, lengths):
            with torch.inference_mode():
                return model(torch.from_numpy(pixels), torch.from_numpy(tokens), torch.from_numpy(lengths)).logits

        def answer(image, question):
            import numpy as np
            tokens, lengths, _ = encode_batch(vocab, [question])
            logits = run(preprocess_image(image, size)[None], tokens, lengths)
            return state["answers"][int(np.argmax(logits.numpy()))]
    else:
        import runtime
        from qgmrn.preprocess import encode_batch, preprocess_image
        files = {"onnxruntime-fp32": "model.onnx", "onnxruntime-fp16": "model.fp16.onnx",
                 "ort-fp32-unmerged": "model.unmerged.onnx", "openvino-bf16": "model.onnx",
                 "openvino-f32": "model.onnx", "ov-bf16-unmerged": "model.unmerged.onnx", "auto": "model.onnx"}
        backend = {"auto": "auto", "openvino-bf16": "openvino", "ov-bf16-unmerged": "openvino"}.get(kind, "cpu")
        model = runtime.load(Path(bundle) / files[kind], backend=backend)   # bf16 rows run only where the CPU has it
        if kind == "openvino-f32":
            # runtime.load picks OpenVINO's precision itself (bf16 here); the f32 row swaps the
            # runner in, so its cold start and peak RSS also hold the onnxruntime session
            from runtime.openvino_backend import OpenVINORunner
            model._runner = OpenVINORunner(Path(bundle) / files[kind], "f32")
            model.backend = model._runner.name
        vocab, size = model.vocab, model.image_size
        runner = model._runner

        def run(pixels, tokens, lengths):
            return runner.run({"image": pixels, "tokens": tokens, "lengths": lengths})["logits"]
        answer = model.answer
    answer(images[0], QUESTIONS[0])
    cold = time.perf_counter() - t0
    import numpy as np
    results = {"kind": kind, "cold_start_s": cold, "backend": model.backend if kind != "pytorch" else "torch"}
    for batch in (1, 8):
        pixels = np.stack([preprocess_image(images[i % len(images)], size) for i in range(batch)])
        tokens, lengths, _ = encode_batch(vocab, [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)])
        for _ in range(5):
            run(pixels, tokens, lengths)
        times = []
        for _ in range(iters if batch == 1 else max(10, iters // 4)):
            s = time.perf_counter()
            run(pixels, tokens, lengths)
            times.append(time.perf_counter() - s)
        results[f"b{batch}"] = times
    e2e = []
    for i in range(max(10, iters // 4)):
        s = time.perf_counter()
        answer(images[i % len(images)], QUESTIONS[i % len(QUESTIONS)])
        e2e.append(time.perf_counter() - s)
    results["answer_e2e"] = e2e
    results["torch_imported"] = "torch" in sys.modules
    results["peak_rss_mib"] = peak_rss_mib()
    return results


def peak_rss_mib() -> float:
    """VmHWM of this process. (ru_maxrss survives execve, so a child started by a large parent
    would report the parent's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    import numpy as np
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    a @ b
    s = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - s) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--preset", default="brn-c32", help="preset of the random-init checkpoint (no --checkpoint)")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.bundle, a.checkpoint, a.iters)))
        return 0

    import numpy as np
    from export.bundle import export_checkpoint, publish
    from export.onnx_export import build_metadata, export_onnx
    from qgmrn.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from qgmrn.model import count_macs, create_model
    from qgmrn.preprocess import Vocab

    tmp = Path(tempfile.mkdtemp(prefix="qgmrn-bench-"))
    ckpt = a.checkpoint
    if not ckpt:
        vocab = Vocab.build(QUESTIONS)
        model = create_model(a.preset, vocab_size=len(vocab), num_answers=28)
        ckpt = str(save_checkpoint(tmp / "ckpt.pt", model=model, vocab=vocab.tokens,
                                   answers=[str(i) for i in range(28)], max_question_len=64))
    staged = export_checkpoint(ckpt, tmp / "bundle", fp16=True, parity_n=24, log=lambda *x: None)
    publish(staged.stage, tmp / "bundle")
    state = load_checkpoint(ckpt)
    model = model_from_checkpoint(state)
    # The same graph with the paper's narrow conv groups, to show what merging them buys.
    export_onnx(model, tmp / "bundle" / "model.unmerged.onnx", build_metadata(state, "-", "fp32"), merge_groups=False)
    flops = 2 * count_macs(model)
    peak = max(matmul_gflops() for _ in range(3))
    print(f"model {model.cfg.arch} {model.cfg.image_size}x{model.cfg.image_size}: {flops / 1e9:.2f} GFLOP per sample; "
          f"float32 matmul (numpy, {os.cpu_count()} cores): {peak:.0f} GFLOP/s")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    kinds = ["pytorch", "onnxruntime-fp32", "onnxruntime-fp16", "ort-fp32-unmerged", "auto"]
    try:
        import openvino  # noqa: F401
        from runtime.openvino_backend import cpu_has_bf16
        kinds += ["openvino-f32"] + (["openvino-bf16", "ov-bf16-unmerged"] if cpu_has_bf16(openvino.Core()) else [])
    except ImportError:
        print("OpenVINO is not installed: no OpenVINO rows (pip install -e '.[openvino]')")
    for kind in kinds:
        out = subprocess.run([sys.executable, __file__, "--worker", kind, "--bundle", str(tmp / "bundle"),
                              "--checkpoint", ckpt, "--iters", str(a.iters)], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{kind}: failed\n{out.stderr[-2000:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = {k: float(np.median(rows[0][k])) for k in ("b1", "b8", "answer_e2e")}
    print(f"\n{'backend':<18}{'b1 ms (p10-p90)':>22}{'b1 vs torch':>12}{'b8 ms':>9}{'b8 vs torch':>12}"
          f"{'answer() ms':>12}{'cold s':>8}{'peak RSS MiB':>14}{'% peak':>8}{'torch?':>8}")
    for r in rows:
        b1, b8 = np.array(r["b1"]) * 1e3, np.array(r["b8"]) * 1e3
        med1, med8 = float(np.median(b1)), float(np.median(b8))
        frac = flops / (med1 / 1e3) / 1e9 / peak
        print(f"{r['kind']:<18}{med1:>8.2f} ({np.percentile(b1, 10):.2f}-{np.percentile(b1, 90):.2f}){'':>2}"
              f"{med1 / 1e3 / base['b1']:>11.2f}x{med8:>9.1f}{med8 / 1e3 / base['b8']:>11.2f}x"
              f"{np.median(r['answer_e2e']) * 1e3:>12.1f}{r['cold_start_s']:>8.2f}{r['peak_rss_mib']:>14.0f}"
              f"{100 * frac:>7.0f}%{str(r['torch_imported']):>8}")
    auto = [r for r in rows if r["kind"] == "auto"]
    if auto:
        print(f"\nauto chose {auto[0]['backend']}: batch 1 {np.median(auto[0]['b1']) / base['b1']:.2f}x eager, "
              f"batch 8 {np.median(auto[0]['b8']) / base['b8']:.2f}x")
    if len(rows) > 1:
        print(f"\nruntime (onnxruntime fp32) / PyTorch eager: batch-1 latency {np.median(rows[1]['b1']) / base['b1']:.2f}x, "
              f"peak RSS {rows[1]['peak_rss_mib'] / rows[0]['peak_rss_mib']:.2f}x, cold start "
              f"{rows[1]['cold_start_s']:.2f} s vs {rows[0]['cold_start_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
