"""Learning-curve study: which changes make QGMRN learn to find the object a question names.

    python study/learning_study.py run --data DIR --out runs/study --steps 3000 RUN [RUN ...]
    python study/learning_study.py baselines --data DIR --out runs/study/_baselines
    python study/learning_study.py report runs/study [runs/other-run ...] [--docs docs/learning]

`run` trains each named candidate (CANDIDATES below) on the same generated CLEVR-style data with
`python -m qgmrn.train`, evaluating every --eval-every steps on a fixed val subset the model never
trains on; `--parallel 2 --threads 1` runs two candidates side by side, one core each, so that
their curves compare at equal conditions. `report` prints accuracy per question type and query
subtype against training samples and training minutes (evaluation excluded), next to the
majority-answer baseline, and writes the table (Markdown, JSON) and curves (PNG, needs matplotlib).
The data: `python -m qgmrn.data.generate --out DIR --images 50000 --val-images 3000`
(CLEVR's 3-10 objects; the val split has its own scenes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

# name -> (preset, [--set FIELD=VALUE ...]); one change at a time against "plain".
# The paper's loss: the CPU presets now learn from scenes and programs unless told not to.
PAPER = ["scene_weight=0", "where_weight=0", "exec_target=0"]
# The arms of issue 28 ran before the scene loss read the open pass by default and before the
# target execution rate: pinned, so each name keeps meaning what was run.
GATED = ["scene_gates=question", "exec_target=0"]
CANDIDATES: dict[str, tuple[str, list[str]]] = {
    "plain": ("small", [*PAPER]),                                              # the old default
    "plain-lr3e-4": ("small", ["lr=3e-4", *PAPER]),
    "attn": ("small+attn", ["lr=3e-4", *PAPER]),
    "attn-wide": ("small+attn", ["lr=3e-4", "attn_dim=128", "attn_layers=2", *PAPER]),
    "attn-wide-128px": ("small+attn", ["lr=3e-4", "attn_dim=128", "attn_layers=2", "image_size=128",
                                       "stem_kernel=7", "stem_pool=true", *PAPER]),
    "attn-wide-lr1e-3": ("small+attn", ["lr=1e-3", "attn_dim=128", "attn_layers=2", *PAPER]),
    "attn-wide-c16": ("small+attn", ["lr=3e-4", "attn_dim=128", "attn_layers=2", "cardinality=16",
                                     "stage_depths=2,2,2,2", *PAPER]),
    "plain-128px": ("small", ["image_size=128", "stem_kernel=7", "stem_pool=true", *PAPER]),
    # Issue 28: learning from the scene and the program (training only), against the current recipe's
    # model (small-frn, bf16 where the CPU has it, lr 1e-3). Weights: scene 0.5, where 1.
    "frn": ("small-frn", [*PAPER]),
    "frn-scene": ("small-frn", ["scene_weight=0.5", "where_weight=0", *GATED]),
    "frn-where": ("small-frn", ["where_weight=1", "scene_weight=0", *GATED]),
    "frn-both": ("small-frn", ["scene_weight=0.5", "where_weight=1", *GATED]),
    "frn-both-open": ("small-frn", ["scene_weight=0.5", "where_weight=1", "scene_gates=open", "exec_target=0"]),
    "frn-both-attn": ("small-frn+attn", ["scene_weight=0.5", "where_weight=1", *GATED]),
    "frn-attn": ("small-frn+attn", [*PAPER]),
    # Does a finer final map pay now that the scene loss teaches it? (16x16: stage 3 keeps its size;
    # 96 px: a 12x12 map from a larger input.) Against frn-both on the same data.
    "frn-both-s16": ("small-frn", ["scene_weight=0.5", "where_weight=1", "stage_strides=1,2,1,1", *GATED]),
    "frn-both-96px": ("small-frn", ["scene_weight=0.5", "where_weight=1", "image_size=96", *GATED]),
    # The built-in run's train accuracy equals its val (61-64% vs 60-62%): is the model at capacity?
    # Twice the channels (BRN small's widths, 4 x 128 modules) or twice the blocks (8 routing layers).
    "frn-both-wide": ("small-frn", ["scene_weight=0.5", "where_weight=1", "stage_widths=32,64,128,128", *GATED]),
    "frn-both-deep": ("small-frn", ["scene_weight=0.5", "where_weight=1", "stage_depths=2,2,2,2", *GATED]),
    # Issue 39: routing that carries the question. The scene loss on an all-open second pass (its
    # gain does not need open gates) and a target execution rate per layer (ConvNet-AIG's target-rate
    # loss), ranked at >= 1 M samples against frn-both (scene loss on the gated map: 99% executed).
    "frn-both-open-t60": ("small-frn", ["scene_weight=0.5", "where_weight=1", "scene_gates=open",
                                        "exec_target=0.6"]),
    "frn-both-open-t45": ("small-frn", ["scene_weight=0.5", "where_weight=1", "scene_gates=open",
                                        "exec_target=0.45"]),
    "frn-open-t60": ("small-frn", ["scene_weight=0", "where_weight=1", "exec_target=0.6"]),
    # The scene loss on the stem's map (before any routed block): no second visual pass, and no
    # perception loss reaches the routed blocks at all.
    "frn-stem-t60": ("small-frn", ["scene_weight=0.5", "where_weight=1", "scene_gates=stem",
                                   "exec_target=0.6"]),
    # Issue 39 part 2: read-outs where the question meets the map before pooling, and can count;
    # each against frn-both-open-t60 (the CPU presets' routing recipe), at >= 1 M samples.
    "frn-t60-film": ("small-frn", ["scene_weight=0.5", "where_weight=1", "scene_gates=open",
                                   "exec_target=0.6", "readout=film"]),
    "frn-t60-sum-count": ("small-frn", ["scene_weight=0.5", "where_weight=1", "scene_gates=open",
                                        "exec_target=0.6", "pool=max+sum", "count_weight=0.5"]),
    "frn-t60-film-sum-count": ("small-frn", ["scene_weight=0.5", "where_weight=1", "scene_gates=open",
                                             "exec_target=0.6", "readout=film", "pool=max+sum",
                                             "count_weight=0.5"]),
    "frn-t60-attn": ("small-frn+attn", ["scene_weight=0.5", "where_weight=1", "scene_gates=open",
                                        "exec_target=0.6"]),
    # Issue 39: the router's own learning rate, temperature and initialisation (what the literature on
    # gated networks says keeps gates from collapsing), each against frn-both-open-t60.
    **{f"frn-t60-{name}": ("small-frn", ["scene_weight=0.5", "where_weight=1", "scene_gates=open",
                                         "exec_target=0.6", setting])
       for name, setting in (("rlr0.1", "router_lr=0.1"), ("rlr10", "router_lr=10"), ("tau0.5", "tau=0.5"),
                             ("tau2", "tau=2"), ("init0.5", "route_init_prob=0.5"),
                             ("init0.9", "route_init_prob=0.9"))},
    # Issue 39 part 3: the learning-rate schedule (warm-up length, peak), which broke a long plateau
    # in Relation Network reproductions on CLEVR; small-frn's own: 500 warm-up steps to 1e-3.
    **{f"frn-t60-{name}": ("small-frn", ["scene_weight=0.5", "where_weight=1", "scene_gates=open",
                                         "exec_target=0.6", *settings])
       for name, settings in (("warm4k", ["warmup_steps=4000"]), ("lr3e-4", ["lr=3e-4"]),
                              ("lr2e-3-warm4k", ["lr=2e-3", "warmup_steps=4000"]))},
    "default": ("small", []),                       # what python -m qgmrn.train trains, on DIR
    "brn": ("small", [*PAPER]),
    "brn-both": ("small", ["scene_weight=0.5", "where_weight=1", *GATED]),
}
TYPES = ("count", "exist", "compare_numbers", "query_attribute", "compare_attribute")
QUERY = ("query_color", "query_shape", "query_size", "query_material")


def run(a) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads)) if a.threads else dict(os.environ)
    pending = list(a.runs)
    for name in pending:
        if name not in CANDIDATES:
            print(f"error: unknown candidate {name!r}; choose from {', '.join(CANDIDATES)}", file=sys.stderr)
            return 2
    running: list[tuple[str, subprocess.Popen, float]] = []
    while pending or running:
        while pending and len(running) < a.parallel:
            arm = pending.pop(0)
            preset, sets = CANDIDATES[arm]
            name = f"{arm}-seed{a.seed}" if a.seed else arm       # seed 0's runs keep their old names
            cmd = [sys.executable, "-m", "qgmrn.train", "--data-root", a.data, "--preset", preset,
                   "--steps", str(a.steps), "--out", str(out / name), "--set", f"eval_every={a.eval_every}",
                   "--set", f"max_val={a.max_val}", "--set", "eval_every_epoch=false"]
            for s in [*sets, *([f"seed={a.seed}"] if a.seed else [])]:
                cmd += ["--set", s]
            if (out / name / "ckpt.pt").exists():
                cmd += ["--resume"]
            log = open(out / f"{name}.log", "a")
            print(" ".join(cmd), flush=True)
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                            time.time()))
        time.sleep(5)
        for item in list(running):
            name, proc, t = item
            if proc.poll() is not None:
                print(f"{name}: exit {proc.returncode} after {time.time() - t:.0f} s", flush=True)
                running.remove(item)
    return 0


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of the run's metrics.jsonl (training steps and evaluations); none without one."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def val_curve(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("split") == "val" and "samples" in r]


def baselines(a) -> int:
    """Majority-answer and question-only baselines on the val questions the study evaluates on."""
    from qgmrn.data.sources import load_clevr, majority_baseline, question_only_baseline
    train, val = load_clevr(a.data, "train"), load_clevr(a.data, "val")
    val = val[:a.max_val] if a.max_val else val                              # 0: all, as the trainer
    out = {"majority_baseline": majority_baseline(train, val), "question_only": question_only_baseline(train, val),
           "val_questions": len(val)}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "baseline.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


def train_accuracy(records: list[dict], window: int = 500) -> float | None:
    """Mean training-batch accuracy over the run's last `window` steps (training-mode gates, sampled)."""
    steps = [r for r in records if "split" not in r and "acc" in r]
    if not steps:
        return None
    last = steps[-1]["step"]
    accs = [r["acc"] for r in steps if r["step"] > last - window]
    return sum(accs) / len(accs)


def final_table(runs: dict[str, list[dict]], train: dict[str, float | None]) -> list[str]:
    """One row per run at its last evaluation: val beside train accuracy, and the routing's use
    (eval-mode gates: filters executed, gates on for every question, gates that differ between two
    questions about one image; metrics.jsonl's "routing" record)."""
    head = ("| run | samples | val % | val, mean of the last 3 evaluations | train % (last 500 steps) | count | "
            "query | filters executed | gates always on | differ, same image |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, curve in runs.items():
        r, use = curve[-1], curve[-1].get("routing") or {}
        last3 = [e["overall"] for e in curve[-3:]]          # one evaluation swings by 1-2 points
        cells = [name, f"{r['samples'] / 1e3:.0f}k", f"{100 * r['overall']:.1f}", f"{100 * sum(last3) / len(last3):.1f}",
                 f"{100 * train[name]:.1f}" if train[name] is not None else "-",
                 f"{100 * r['per_type'].get('count', float('nan')):.1f}",
                 f"{100 * r['per_type'].get('query_attribute', float('nan')):.1f}"]
        if "filters_executed" in use:
            cells += [f"{100 * use['filters_executed']:.1f}%", f"{use['always_on']} of {use['modules']}",
                      f"{100 * use['differ_same_image']:.1f}%"]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(a) -> int:
    dirs = []
    for p in map(Path, a.study):
        if not p.is_dir():
            print(f"error: {p} is not a run or study directory", file=sys.stderr)
            return 2
        dirs += [p] if (p / "metrics.jsonl").exists() else sorted(d for d in p.iterdir() if d.is_dir())
    records = {d.name: read_metrics(d) for d in dirs}            # each file read once
    runs = {k: val_curve(v) for k, v in records.items()}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        print(f"error: no learning curves under {', '.join(a.study)}", file=sys.stderr)
        return 2
    baseline = qonly = None
    for d in dirs:
        for name in ("baseline.json", "eval.json"):
            if baseline is None and (d / name).exists():
                data = json.loads((d / name).read_text())
                baseline, qonly = data.get("majority_baseline"), data.get("question_only")
    head = ("| run | samples | train min | overall | count | exist | cmp num | query | cmp attr | "
            "q colour | q shape | q size | q material |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    table = {}
    for name, curve in runs.items():
        picks = curve if a.all else [r for r in curve if r is curve[-1] or curve.index(r) % a.every == a.every - 1]
        for r in picks:
            pt, ps = r["per_type"], r.get("per_subtype", {})
            row = [name, f"{r['samples'] / 1e3:.0f}k", f"{r['train_seconds'] / 60:.1f}", f"{100 * r['overall']:.1f}"]
            row += [f"{100 * pt[t]:.1f}" if t in pt else "-" for t in TYPES]
            row += [f"{100 * ps[t]:.1f}" if t in ps else "-" for t in QUERY]
            lines.append("| " + " | ".join(row) + " |")
        table[name] = curve
    if baseline:
        pm = baseline.get("per_type_majority", {})
        lines.append("| majority answer (per type) | - | - | " + f"{100 * baseline['overall']:.1f} | "
                     + " | ".join(f"{100 * pm[t]:.1f}" if t in pm else "-" for t in TYPES) + " | - | - | - | - |")
    if qonly:
        pt = qonly["per_type"]
        lines.append("| question only (same question's most common answer) | - | - | " + f"{100 * qonly['overall']:.1f} | "
                     + " | ".join(f"{100 * pt[t]:.1f}" if t in pt else "-" for t in TYPES) + " | - | - | - | - |")
    text = "\n".join(lines + ["", "At each run's last evaluation:", "", *final_table(runs, {k: train_accuracy(records[k]) for k in runs})])
    print(text)
    if a.docs:
        docs = Path(a.docs)
        docs.mkdir(parents=True, exist_ok=True)
        (docs / "study.md").write_text(text + "\n")
        (docs / "study.json").write_text(json.dumps({"baseline": baseline, "runs": table}, indent=1))
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no curves written", file=sys.stderr)
            return 0
        keys = [("overall", "overall"), ("query_attribute", "query attribute"), ("count", "count"),
                ("query_color", "query colour")]
        for xkey, xlabel, fname in (("samples", "training samples", "curves_samples.png"),
                                    ("train_seconds", "training minutes (2-core CPU)", "curves_time.png")):
            fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
            for ax, (k, title) in zip(axes, keys):
                for name, curve in table.items():
                    xs = [r[xkey] / (60 if xkey == "train_seconds" else 1) for r in curve]
                    ys = [r["overall"] if k == "overall" else r["per_type"].get(k, r.get("per_subtype", {}).get(k))
                          for r in curve]
                    ax.plot(xs, ys, marker=".", label=name)
                ax.set_title(title)
                ax.set_xlabel(xlabel)
                ax.grid(alpha=0.3)
            axes[0].set_ylabel("val accuracy")
            axes[-1].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(docs / fname, dpi=100)
            plt.close(fig)
            print(f"wrote {docs / fname}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("runs", nargs="+")
    r.add_argument("--data", required=True)
    r.add_argument("--out", default="runs/study")
    r.add_argument("--steps", type=int, default=3000)
    r.add_argument("--eval-every", type=int, default=500)
    r.add_argument("--max-val", type=int, default=3000)
    r.add_argument("--parallel", type=int, default=1)
    r.add_argument("--seed", type=int, default=0, help="another seed: initialisation, data order and "
                   "routing noise; its runs are named ARM-seedN")
    r.add_argument("--threads", type=int, default=0, help="OMP threads per run (0: torch's default)")
    p = sub.add_parser("report")
    p.add_argument("study", nargs="+", help="study directories (of runs) or run directories")
    p.add_argument("--docs")
    p.add_argument("--every", type=int, default=2, help="table rows: every Nth evaluation and the last")
    p.add_argument("--all", action="store_true")
    b = sub.add_parser("baselines")
    b.add_argument("--data", required=True)
    b.add_argument("--out", required=True, help="directory for baseline.json (e.g. the study's)")
    b.add_argument("--max-val", type=int, default=3000)
    a = ap.parse_args(argv)
    return {"run": run, "report": report, "baselines": baselines}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
