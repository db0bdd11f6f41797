"""A training run's accuracy on the real CLEVR sample against samples, from evaluations of its
checkpoints taken while it ran (the trainer evaluates only its own val split):

    python -m qgmrn.evaluate CKPT --data-root ../shared/data/clevr-real-sample --split train --json D/STEP_train.json
    python -m qgmrn.evaluate CKPT --data-root ../shared/data/clevr-real-sample --split val --json D/STEP_val.json
    python study/real_curve.py D [--batch 64] [--json OUT]

Both splits of the sample (340 questions, none trained on) are pooled per step, overall and per
question type, and printed as a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TYPES = ("count", "exist", "compare_numbers", "query_attribute", "compare_attribute")


def pooled(parts: list[dict]) -> dict:
    """Accuracy over the union of evaluations (weighted by their question counts)."""
    n = sum(p["n"] for p in parts)
    out = {"n": n, "overall": sum(p["overall"] * p["n"] for p in parts) / n, "per_type": {}}
    for t in TYPES:
        counts = [(p["per_type"][t], p["counts"][t]) for p in parts if t in p["per_type"]]
        total = sum(c for _, c in counts)
        if total:
            out["per_type"][t] = sum(a * c for a, c in counts) / total
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--batch", type=int, default=64, help="the run's batch size (samples = steps x batch)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    steps: dict[int, list[dict]] = {}
    for f in Path(a.folder).glob("*_*.json"):
        steps.setdefault(int(f.name.split("_")[0]), []).append(json.loads(f.read_text()))
    rows = {s: pooled(parts) for s, parts in sorted(steps.items()) if len(parts) == 2}
    print("| step | samples | questions | overall | " + " | ".join(TYPES) + " |")
    print("|---|---|---|---|" + "---|" * len(TYPES))
    for s, r in rows.items():
        print(f"| {s} | {s * a.batch / 1e3:.0f}k | {r['n']} | {100 * r['overall']:.1f} | "
              + " | ".join(f"{100 * r['per_type'].get(t, 0):.1f}" for t in TYPES) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({str(s): r for s, r in rows.items()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
