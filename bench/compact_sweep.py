"""Time against execution ratio: the compact routed graph (switched-off modules skipped,
export/compact.py) beside the masked graph (every module computed, then multiplied by its gate),
on the same backend, in one run; run it alone on the machine. Batch 1 runs the compact graph's
batch-1 form, larger batches its general form (the union of the batch's modules).

    python bench/compact_sweep.py [--presets brn-c32 small small-frn] [--ratios 0.3 0.5 0.57 0.7 0.9 1.0]
                                  [--batches 1 8] [--backends onnxruntime openvino] [--json F] [--plot F]

Gates are forced by the routing bias (routing FC weights zero, each layer's bias +4 on a seeded
random choice of round(ratio * M) modules and -4 on the rest), so every question of the batch
executes exactly that fraction of each layer. Random weights (timing does not depend on them).
Each cell is the median of --repeats timed calls after --warmup, masked and compact interleaved
call by call so a disturbance hits both. Prints a Markdown table with the CPU model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def forced_model(preset: str, ratio: float, seed: int = 0):
    import torch
    from qgmrn.model import create_model
    torch.manual_seed(seed)
    model = create_model(preset, vocab_size=100, num_answers=28).eval()
    rng = np.random.default_rng(seed)
    bias = []
    for m in model.cfg.layer_sizes:
        on = np.zeros(m, dtype=bool)
        on[rng.permutation(m)[:round(ratio * m)]] = True
        bias.append(np.where(on, 4.0, -4.0))
    with torch.no_grad():
        model.router.fc.weight.zero_()
        model.router.fc.bias.copy_(torch.from_numpy(np.concatenate(bias)).float())
    return model


def session(path: Path, backend: str):
    """A callable feeds -> outputs on the backend (one thread pool, the machine's cores)."""
    if backend == "onnxruntime":
        import onnxruntime as ort
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda feeds: sess.run(None, feeds)
    import openvino as ov
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda feeds: [v for v in request.infer(feeds).values()]


def profile(a) -> int:
    """Kernel microseconds per call by operator type, masked vs compact (batch-1 form), onnxruntime."""
    import collections
    import onnxruntime as ort
    from export.onnx_export import export_onnx
    print(f"CPU: {cpu_model()}; onnxruntime profiler, batch 1, mean over {a.repeats} calls")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets:
            for ratio in a.ratios:
                model = forced_model(preset, ratio)
                size = model.cfg.image_size
                feeds = {"image": np.zeros((1, 3, size, size), np.float32),
                         "tokens": np.full((1, 12), 2, np.int64), "lengths": np.array([12], np.int64)}
                for kind in ("masked", "compact1"):
                    path = export_onnx(model, Path(tmp) / f"{kind}.onnx", {}, compact=kind != "masked",
                                       batch1=kind == "compact1")
                    so = ort.SessionOptions()
                    so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / kind)
                    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                    for _ in range(a.warmup + a.repeats):
                        sess.run(None, feeds)
                    events = json.loads(Path(sess.end_profiling()).read_text())
                    per_op, nodes = collections.Counter(), collections.Counter()
                    for e in events:
                        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                            per_op[e["args"]["op_name"]] += e["dur"]
                            nodes[e["args"]["op_name"]] += 1
                    calls = a.warmup + a.repeats
                    top = ", ".join(f"{op} {us / calls:.0f} ({nodes[op] // calls})" for op, us in per_op.most_common(8))
                    print(f"{preset} ratio {ratio:.2f} {kind}: {sum(per_op.values()) / calls:.0f} us in "
                          f"{sum(nodes.values()) // calls} nodes; by op (us, nodes): {top}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["brn-c32", "small", "small-frn"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.57, 0.7, 0.9, 1.0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="instead: onnxruntime's per-operator kernel time for both graphs, batch 1, at each ratio")
    a = ap.parse_args(argv)
    if a.profile:
        return profile(a)
    from export.onnx_export import export_onnx
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets:
            for ratio in a.ratios:
                model = forced_model(preset, ratio)
                paths = {kind: export_onnx(model, Path(tmp) / f"{preset}-{ratio}-{kind}.onnx", {},
                                           compact=kind != "masked", batch1=kind == "compact1")
                         for kind in ("masked", "compact", "compact1")}
                size = model.cfg.image_size
                for backend in a.backends:
                    for batch in a.batches:
                        try:
                            runs = {"masked": session(paths["masked"], backend),
                                    "compact": session(paths["compact1" if batch == 1 else "compact"], backend)}
                        except Exception as e:          # a backend that cannot compile a graph
                            line = str(e).strip().splitlines()
                            print(f"{preset} {backend} b{batch} ratio {ratio:.2f}: does not run "
                                  f"({[x for x in line if 'Not Implemented' in x or 'support' in x][:1] or line[:1]})")
                            rows.append({"preset": preset, "ratio": ratio, "backend": backend, "batch": batch,
                                         "unsupported": True})
                            continue
                        rng = np.random.default_rng(1)
                        feeds = {"image": rng.standard_normal((batch, 3, size, size), dtype=np.float32),
                                 "tokens": rng.integers(2, 100, (batch, 12)).astype(np.int64),
                                 "lengths": np.full((batch,), 12, dtype=np.int64)}
                        outs = {k: run(feeds) for k, run in runs.items()}
                        executed = float(outs["masked"][1].sum() / (batch * sum(model.cfg.layer_sizes)))
                        same = bool(np.array_equal(outs["masked"][1], outs["compact"][1]) and np.array_equal(
                            outs["masked"][0].argmax(1), outs["compact"][0].argmax(1)))
                        times: dict = {k: [] for k in runs}
                        for i in range(a.warmup + a.repeats):
                            for k, run in runs.items():
                                t0 = time.perf_counter()
                                run(feeds)
                                if i >= a.warmup:
                                    times[k].append(time.perf_counter() - t0)
                        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
                        rows.append({"preset": preset, "ratio": ratio, "executed": executed, "backend": backend,
                                     "batch": batch, "masked_ms": ms["masked"], "compact_ms": ms["compact"],
                                     "speedup": ms["masked"] / ms["compact"], "same_answers_and_gates": same})
                        r = rows[-1]
                        print(f"{preset} {backend} b{batch} ratio {ratio:.2f} (executed {executed:.3f}): masked "
                              f"{r['masked_ms']:.2f} ms, compact {r['compact_ms']:.2f} ms, {r['speedup']:.2f}x"
                              f"{'' if same else '  ANSWERS OR GATES DIFFER'}", flush=True)
    print(f"\nCPU: {cpu_model()}; median of {a.repeats} calls each, masked and compact interleaved\n")
    print("| preset | backend | batch | execution ratio | masked ms | compact ms | masked / compact |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("unsupported"):
            print(f"| {r['preset']} | {r['backend']} | {r['batch']} | {r['ratio']:.2f} | | does not compile | |")
            continue
        print(f"| {r['preset']} | {r['backend']} | {r['batch']} | {r['executed']:.2f} | {r['masked_ms']:.2f} | "
              f"{r['compact_ms']:.2f} | {r['speedup']:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=2))
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = [r for r in rows if not r.get("unsupported")]
        keys = sorted({(r["preset"], r["backend"], r["batch"]) for r in rows})
        presets = sorted({k[0] for k in keys}, key=a.presets.index)
        fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 4), squeeze=False)
        for ax, preset in zip(axes[0], presets):
            for key in [k for k in keys if k[0] == preset]:
                sel = [r for r in rows if (r["preset"], r["backend"], r["batch"]) == key]
                xs = [r["executed"] for r in sel]
                line = ax.plot(xs, [r["compact_ms"] for r in sel], "o-", label=f"compact {key[1]} b{key[2]}")[0]
                ax.plot(xs, [r["masked_ms"] for r in sel], "x--", color=line.get_color(),
                        label=f"masked {key[1]} b{key[2]}")
            ax.set(title=preset, xlabel="fraction of modules executed", ylabel="ms per call", yscale="log")
            ax.legend(fontsize=7)
        fig.suptitle(f"compact vs masked graph, {cpu_model()}")
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
