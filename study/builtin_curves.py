"""Built-in model runs side by side against samples and training time: the trainer's own val split
(rendered val) and the real CLEVR sample, overall and per question type, with the targets.

    python study/builtin_curves.py --run shipped docs/learning/rendered/builtin_curve.json \
            docs/learning/rendered/builtin_real_curve.json \
        --run supervised runs/builtin-sup/metrics.jsonl runs/builtin-sup-real.json --out DIR

Each --run is NAME VAL REAL: VAL the run's metrics.jsonl (its "split": "val" records) or a saved
curve ({"val": [records]}); REAL a `study/real_curve.py --json` file ({step: pooled result}).
Writes DIR/curves.md (one table per run) and DIR/curves.png (needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from qgmrn.data.programs import QUESTION_TYPES as TYPES  # noqa: E402

# issue 28's targets on the real sample (340 questions, both splits) and on rendered val
TARGETS_REAL = {"overall": 65, "count": 55, "exist": 75, "compare_numbers": 72, "query_attribute": 60,
                "compare_attribute": 65}
TARGET_RENDERED = 75


def val_curve(path: Path) -> list[dict]:
    """The run's in-training val records (step, samples, train_seconds, overall, per_type)."""
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in records if r.get("split") == "val"]
    return list(json.loads(path.read_text())["val"])


def real_curve(path: Path, batch: int) -> list[dict]:
    """{step: pooled} -> records with samples, sorted by step."""
    data = json.loads(path.read_text())
    return [{"step": int(s), "samples": int(s) * batch, **r} for s, r in sorted(data.items(), key=lambda kv: int(kv[0]))]


def table(name: str, val: list[dict], real: list[dict]) -> list[str]:
    """One markdown table: a row per step that has a rendered-val or a real-sample point."""
    by_step: dict[int, dict] = {}
    for r in val:
        by_step.setdefault(r["step"], {})["val"] = r
    for r in real:
        by_step.setdefault(r["step"], {})["real"] = r
    head = ("| step | samples | train min | rendered val | " + " | ".join(TYPES)
            + " | real (340) | " + " | ".join(f"real {t}" for t in TYPES) + " |")
    lines = [f"### {name}", "", head, "|---" * (5 + 2 * len(TYPES)) + "|"]

    def cells(r: dict | None) -> list[str]:
        if r is None:
            return [""] * (1 + len(TYPES))
        return [f"{100 * r['overall']:.1f}"] + [f"{100 * r['per_type'][t]:.1f}" if t in r["per_type"] else ""
                                                for t in TYPES]
    for step, row in sorted(by_step.items()):
        v, r = row.get("val"), row.get("real")
        seconds = v.get("train_seconds") if v else None
        lines.append(f"| {step} | {(v or r)['samples'] / 1e3:.0f}k | "
                     f"{'' if seconds is None else f'{seconds / 60:.0f}'} | "
                     + " | ".join(cells(v)) + " | " + " | ".join(cells(r)) + " |")
    return lines + [""]


def plot(runs: dict[str, tuple[list[dict], list[dict]]], out: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no curves written", file=sys.stderr)
        return False
    keys = ("overall",) + TYPES
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.5), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        for i, (name, (val, real)) in enumerate(runs.items()):
            def ys(recs):
                return [100 * (r["overall"] if key == "overall" else r["per_type"].get(key, float("nan"))) for r in recs]
            c = colours[i % len(colours)]
            if val:
                ax.plot([r["samples"] / 1e6 for r in val], ys(val), "-", color=c, label=f"{name}: rendered val")
            if real:
                ax.plot([r["samples"] / 1e6 for r in real], ys(real), "--o", ms=3, color=c, label=f"{name}: real sample")
        ax.axhline(TARGETS_REAL[key], color="grey", ls=":", lw=1, label="target (real sample)")
        if key == "overall":
            ax.axhline(TARGET_RENDERED, color="black", ls=":", lw=1, label="target (rendered val)")
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("M samples")
        ax.set_ylabel("accuracy %")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()   # below the panels, not over a curve
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.018 * ((len(labels) + 1) // 2), 1, 1))
    fig.savefig(out, dpi=110)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs=3, action="append", metavar=("NAME", "VAL", "REAL"), required=True)
    ap.add_argument("--batch", type=int, default=64, help="the runs' batch size (samples = steps x batch)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    runs = {}
    for name, val, real in a.run:
        try:
            runs[name] = (val_curve(Path(val)), real_curve(Path(real), a.batch))
        except (OSError, ValueError, KeyError) as e:
            print(f"error: run {name}: cannot read its curves ({e})", file=sys.stderr)
            return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [line for name, (val, real) in runs.items() for line in table(name, val, real)]
    (out / "curves.md").write_text("\n".join(lines))
    print("\n".join(lines))
    if plot(runs, out / "curves.png"):
        print(f"wrote {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
