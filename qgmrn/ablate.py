"""Table 2 of the paper at the scale a CPU allows: one command trains each ablation row with the
same budget on the same data and prints the table beside the paper's numbers.

    python -m qgmrn.ablate --out runs/ablate [--steps 3000] [--rows c8 c16 ...] [--data-root DIR]

Rows (all on the `small` preset, built-in generated data unless --data-root): cardinality 8/16/32
with GroupNorm as the 3rd norm, the same with BatchNorm, question features to the classifier or
not, the load-balancing loss on or off, deeper and wider. Each row is a training run in
OUT/<row>; an interrupted grid resumes (finished rows are kept, a row that was cut short continues
from its checkpoint). Writes OUT/table.md and OUT/table.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .data.sources import DataError
from .files import os_error_line
from .settings import SettingsError
from .train import TrainConfig, TrainingStopped, train

# name -> (model overrides, train overrides, the paper's Table 2 row it stands for)
ROWS: dict[str, tuple[dict, dict, str]] = {
    "c8": ({"cardinality": 8}, {}, "c=8, w/ q, gn"),
    "c16": ({"cardinality": 16}, {}, "c=16, w/ q, gn"),
    "c32": ({"cardinality": 32}, {}, "c=32, w/ q, gn"),
    "c8-bn": ({"cardinality": 8, "block_norm": "batch"}, {}, "c=8, w/ q"),
    "c16-bn": ({"cardinality": 16, "block_norm": "batch"}, {}, "c=16, w/ q"),
    "c16-no-q": ({"cardinality": 16, "block_norm": "batch", "question_to_classifier": False}, {}, "c=16, w/o q"),
    "c8-no-load": ({"cardinality": 8}, {"load_weight": 0.0}, "(not in Table 2: no load-balancing loss)"),
    "c32-deeper": ({"cardinality": 32, "stage_depths": (1, 2, 3, 2)}, {}, "c=32, w/ q, deeper"),
    "c32-wider": ({"cardinality": 32, "stage_widths": (32, 64, 128, 256)}, {}, "c=32, w/ q, wider"),
}
# The paper's Table 2 (CLEVR, full GPU training): overall, count, exist, cmp num, query, cmp attr.
PAPER = {
    "c=16, w/o q": (89.7, 84.7, 95.9, 81.9, 90.2, 94.6), "c=16, w/ q": (93.0, 90.8, 98.6, 83.6, 91.7, 98.9),
    "c=8, w/ q": (75.1, 66.8, 84.7, 75.8, 80.3, 68.4), "c=8, w/ q, gn": (86.8, 79.5, 93.4, 75.1, 90.0, 91.1),
    "c=16, w/ q, gn": (94.7, 90.8, 98.1, 82.8, 97.3, 98.4), "c=32, w/ q": (94.0, 93.0, 99.6, 85.9, 91.9, 99.4),
    "c=32, w/ q, gn": (97.9, 95.4, 98.9, 92.9, 99.4, 99.7),
    "c=32, w/ q, deeper": (94.3, 94.1, 99.6, 85.4, 92.1, 99.5),
    "c=32, w/ q, wider": (93.7, 91.7, 99.0, 83.8, 93.0, 99.1),
}
TYPES = ("count", "exist", "compare_numbers", "query_attribute", "compare_attribute")


def run_row(name: str, out: Path, steps: int, data_root: str | None, extra: dict, log) -> dict:
    model_over, train_over, _ = ROWS[name]
    row_dir = out / name
    if (row_dir / "row.json").exists():                      # finished: kept
        return json.loads((row_dir / "row.json").read_text())
    resume = str(row_dir / "ckpt.pt") if (row_dir / "ckpt.pt").exists() else None
    cfg = TrainConfig(**{"preset": "small", "steps": steps, "out": str(row_dir), "data_root": data_root,
                         "eval_every_epoch": False, **extra, **train_over})
    t = time.perf_counter()
    result = train(cfg, None if resume else model_over, resume=resume,
                   given={"steps": steps, "out": str(row_dir)} if resume else None, log=log)
    row = {"row": name, "paper_row": ROWS[name][2], "steps": steps, "seconds": round(time.perf_counter() - t, 1),
           "overall": result["overall"], "per_type": result["per_type"],
           "execution_ratio": result["routing"]["overall_execution_ratio"]}
    (row_dir / "row.json").write_text(json.dumps(row, indent=1))
    return row


def table(rows: list[dict]) -> str:
    head = "| row | steps | train s | overall | count | exist | cmp num | query | cmp attr | exec ratio | paper (overall / query) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        paper = PAPER.get(r["paper_row"])
        lines.append("| " + " | ".join([r["row"], str(r["steps"]), f"{r['seconds']:.0f}", f"{100 * r['overall']:.1f}"]
                                      + [f"{100 * r['per_type'].get(t, 0):.1f}" for t in TYPES]
                                      + [f"{r['execution_ratio']:.2f}",
                                         f"{paper[0]} / {paper[4]}" if paper else "-"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qgmrn.ablate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), help=f"rows: {', '.join(ROWS)}")
    ap.add_argument("--steps", type=int, default=3000, help="training steps per row (the same budget for each)")
    ap.add_argument("--data-root", help="CLEVR layout (default: the built-in generated data)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a TrainConfig field for every row, e.g. --set batch_size=32")
    a = ap.parse_args(argv)
    unknown = [r for r in a.rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if a.steps < 1:
        ap.error("--steps must be at least 1")
    from .settings import split_assignment, typed
    try:
        extra = {}
        for item in a.set:
            k, raw = split_assignment(item)
            extra.update(typed(TrainConfig, {k: raw}, "--set"))
    except SettingsError as e:
        ap.error(str(e))
    fixed = sorted({"preset", "out", "data_root", "steps", "epochs", "jsonl", "humans"} & set(extra))
    if fixed:
        ap.error(f"--set {', '.join(fixed)}: the grid fixes these (every row is the `small` preset at the "
                 "paper's settings, labelled as the paper's row; use --steps and --data-root for the rest)")
    out = Path(a.out)
    rows = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in a.rows:
            print(f"== {name} ({ROWS[name][2]})", flush=True)
            rows.append(run_row(name, out, a.steps, a.data_root, extra, log=lambda *x, **k: None))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    except TrainingStopped as e:
        print(f"\n{e}\nthe grid resumes with the same command", file=sys.stderr)
        return e.code
    except (DataError, SettingsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                          # an --out that is a file, read-only, full, ...
        print(f"error: {os_error_line(e, a.out)}", file=sys.stderr)
        return 2
    text = table(rows)
    (out / "table.md").write_text(text + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
