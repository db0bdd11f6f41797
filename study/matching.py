"""The matching diagnostic (issue 19): scenes with one object, questions that name an attribute.

It isolates the routing's job. "What colour is the thing?" needs the network to *see* the
colour; "Is there a red thing?" needs it to *match* what the question names against what it sees,
which is what finding the object a question is about rests on. A model that answers the first and
not the second sees but does not match.

    python -m qgmrn.data.generate --renderer blender --out D --images 2000 --val-images 300 \
        --size 128 85 --samples 32 --objects 1 1           # or the Pillow renderer, --objects 1 1
    python study/matching.py make D                         # -> D/matching/{train,val}.jsonl, D/matching/clevr
    python -m qgmrn.train --jsonl D/matching/train.jsonl D/matching/val.jsonl --preset small-frn \
        --out runs/match-frn --steps 6000 --set eval_every=250 --set eval_every_epoch=false
    python study/film.py --jsonl D/matching/train.jsonl D/matching/val.jsonl --out runs/match-film ...
    python -m qgmrn.train --data-root D/matching/clevr --preset small-frn --out runs/match-frn-both \
        --steps 6000 --set eval_every=250 --set eval_every_epoch=false --set scene_weight=0.5 --set where_weight=1
    python study/matching.py report runs/match-* --out docs/learning/matching

Questions per scene (types / subtypes in the JSONL, so the trainer reports each):
  match / match_color, _shape, _size, _material: "Is there a red thing?", "Is there a cylinder?",
      "Is there a large thing?", "Is the thing metal?"; yes and no equally often, the named value
      drawn uniformly from the others when the answer is no;
  match / match_pair: "Is there a red cylinder?": colour and shape together, each wrong half the time
      when the answer is no;
  query_attribute / query_color, _shape, _size, _material: "What color is the thing?" (seeing, not matching).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

COLORS = ["gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"]
SHAPES = ["cube", "sphere", "cylinder"]
SIZES = ["large", "small"]
MATERIALS = ["rubber", "metal"]
VALUES = {"color": COLORS, "shape": SHAPES, "size": SIZES, "material": MATERIALS}
TARGET = 0.95


def _other(rng: random.Random, values: list[str], true: str) -> str:
    return rng.choice([v for v in values if v != true])


def _program(*steps: tuple[str, str | None]) -> list[dict]:
    """A chain of CLEVR nodes from `scene`: [("filter_color", "red"), ("exist", None)] ->
    scene -> filter_color[red] -> exist."""
    nodes = [{"function": "scene", "inputs": [], "value_inputs": []}]
    for fn, value in steps:
        nodes.append({"function": fn, "inputs": [len(nodes) - 1], "value_inputs": [] if value is None else [value]})
    return nodes


def scene_questions(obj: dict, rng: random.Random) -> list[dict]:
    """The nine questions about a one-object scene: five that match, four that query, each with the
    CLEVR program that answers it (so the trainer's scene and where losses can use them)."""
    qs = []
    for attr, phrase in (("color", "Is there a {} thing?"), ("shape", "Is there a {}?"),
                         ("size", "Is there a {} thing?"), ("material", "Is the thing {}?")):
        yes = rng.random() < 0.5
        value = obj[attr] if yes else _other(rng, VALUES[attr], obj[attr])
        qs.append({"question": phrase.format(value), "answer": "yes" if yes else "no", "type": "match",
                   "subtype": f"match_{attr}", "program": _program((f"filter_{attr}", value), ("exist", None))})
    yes = rng.random() < 0.5
    color, shape = obj["color"], obj["shape"]
    if not yes:                                 # one or both named values wrong, each case as often
        wrong = rng.choice(("color", "shape", "both"))
        color = _other(rng, COLORS, color) if wrong in ("color", "both") else color
        shape = _other(rng, SHAPES, shape) if wrong in ("shape", "both") else shape
    qs.append({"question": f"Is there a {color} {shape}?", "answer": "yes" if yes else "no", "type": "match",
               "subtype": "match_pair",
               "program": _program(("filter_color", color), ("filter_shape", shape), ("exist", None))})
    for attr, question in (("color", "What color is the thing?"), ("shape", "What shape is the thing?"),
                           ("size", "What size is the thing?"), ("material", "What material is the thing?")):
        qs.append({"question": question, "answer": obj[attr], "type": "query_attribute",
                   "subtype": f"query_{attr}", "program": _program(("unique", None), (f"query_{attr}", None))})
    return qs


def make(root: Path, seed: int = 0) -> dict[str, int]:
    """Write ROOT/matching/{train,val}.jsonl from ROOT's one-object scenes, and the same questions
    with their programs in CLEVR's layout under ROOT/matching/clevr (images and scenes linked), for
    `--data-root` with the scene and where losses; returns counts."""
    from qgmrn.data.programs import execute
    out = root / "matching"
    clevr = out / "clevr"
    counts = {}
    for split in ("train", "val"):
        scenes = json.loads((root / "scenes" / f"CLEVR_{split}_scenes.json").read_text())["scenes"]
        rng = random.Random(f"{seed}/{split}")
        rows, records = [], []
        for scene in scenes:
            if len(scene["objects"]) != 1:
                raise SystemExit(f"error: {root}: scene {scene['image_filename']} has {len(scene['objects'])} "
                                 "objects; generate the data with --objects 1 1")
            image = Path("..") / "images" / split / scene["image_filename"]
            for q in scene_questions(scene["objects"][0], rng):
                if execute(q["program"], scene) != q["answer"]:          # the program says what the words say
                    raise AssertionError(f"{scene['image_filename']}: {q['question']} -> {q['answer']}, "
                                         f"its program -> {execute(q['program'], scene)}")
                rows.append({"image": str(image), **{k: v for k, v in q.items() if k != "program"}})
                records.append({**q, "image_filename": scene["image_filename"], "image_index": scene.get("image_index"),
                                "split": split, "question_index": len(records)})
        out.mkdir(exist_ok=True)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (clevr / "questions").mkdir(parents=True, exist_ok=True)
        (clevr / "questions" / f"CLEVR_{split}_questions.json").write_text(
            json.dumps({"info": {"split": split, "generator": "study/matching.py", "seed": seed}, "questions": records}))
        counts[split] = len(rows)
    for kind in ("images", "scenes"):
        link = clevr / kind
        if not link.exists():
            link.symlink_to(Path("..") / ".." / kind)
    return counts


def _val_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == "val" and "samples" in r]


def _first(rows: list[dict], value) -> dict | None:
    return next((r for r in rows if value(r) is not None and value(r) >= TARGET), None)


def summarize_run(run: Path) -> dict:
    """Samples and training seconds until each of overall, match and query first reach 95% on val,
    and the last evaluation's accuracy per type and subtype."""
    rows = _val_rows(run)
    if not rows:
        raise SystemExit(f"error: {run}/metrics.jsonl has no val rows")
    last = rows[-1]
    res = {"run": run.name, "last_samples": last["samples"], "last_seconds": last.get("train_seconds"),
           "last_overall": last["overall"], "last_per_type": last.get("per_type", {}),
           "last_per_subtype": last.get("per_subtype", {})}
    for key, value in (("overall", lambda r: r["overall"]), ("match", lambda r: r.get("per_type", {}).get("match")),
                       ("query", lambda r: r.get("per_type", {}).get("query_attribute"))):
        hit = _first(rows, value)
        res[f"{key}_95"] = None if hit is None else {"samples": hit["samples"], "seconds": hit.get("train_seconds")}
    for sub in {k for r in rows for k in r.get("per_subtype", {})}:
        hit = _first(rows, lambda r, sub=sub: r.get("per_subtype", {}).get(sub))
        res.setdefault("subtype_95", {})[sub] = None if hit is None else hit["samples"]
    res["curve"] = [{"samples": r["samples"], "seconds": r.get("train_seconds"), "overall": r["overall"],
                     **{t: v for t, v in r.get("per_type", {}).items()}} for r in rows]
    return res


def _cell(hit: dict | None, last: int) -> str:
    if hit is None:
        return f"not by {last // 1000}k"
    sec = f", {hit['seconds']:.0f} s" if hit.get("seconds") is not None else ""
    return f"{hit['samples'] // 1000}k{sec}"


def report(runs: list[Path], out: Path | None, earlier: Path | None = None) -> str:
    """The table (and with `out`, matching.json/.md and the curves) of `runs`, after the runs of an
    earlier report's matching.json when given (their names marked with an asterisk)."""
    results = [summarize_run(r) for r in runs]
    if earlier is not None:
        results = [{**r, "run": r["run"] + "*"} for r in json.loads(earlier.read_text())] + results
    subtypes = ["color", "shape", "size", "material", "pair"]
    lines = ["| run | overall to 95% | match to 95% | query to 95% | last: samples | overall | "
             + " | ".join(f"match {s}" for s in subtypes) + " | " + " | ".join(f"query {s}" for s in subtypes[:4]) + " |",
             "|---" * (6 + len(subtypes) + 4) + "|"]
    for r in results:
        sub = r["last_per_subtype"]
        cells = [f"{100 * sub[k]:.1f}" if k in sub else "-" for k in (f"match_{s}" for s in subtypes)]
        cells += [f"{100 * sub[k]:.1f}" if k in sub else "-" for k in (f"query_{s}" for s in subtypes[:4])]
        lines.append(f"| {r['run']} | {_cell(r['overall_95'], r['last_samples'])} | {_cell(r['match_95'], r['last_samples'])}"
                     f" | {_cell(r['query_95'], r['last_samples'])} | {r['last_samples'] // 1000}k | "
                     f"{100 * r['last_overall']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Samples until 95% on val, per attribute: seen (query) and matched (match):", "",
              "| run | " + " | ".join(f"{s} seen / matched" for s in subtypes[:4]) + " | pair matched |",
              "|---" * 6 + "|"]
    for r in results:
        at = r.get("subtype_95", {})
        k = lambda sub: "-" if at.get(sub) is None else f"{at[sub] // 1000}k"   # noqa: E731
        lines.append(f"| {r['run']} | " + " | ".join(f"{k('query_' + s)} / {k('match_' + s)}" for s in subtypes[:4])
                     + f" | {k('match_pair')} |")
    table = "\n".join(lines)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "matching.json").write_text(json.dumps(results, indent=1))
        (out / "matching.md").write_text(table + "\n")
        _plot(results, out / "matching_curves.png")
    return table


def _plot(results: list[dict], path: Path) -> None:
    """Match and query accuracy against samples, one line per run (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in ((axes[0], "match", "match (is there a red thing?)"),
                           (axes[1], "query_attribute", "query (what color is it?)")):
        for r in results:
            ax.plot([c["samples"] / 1e3 for c in r["curve"]], [c.get(key) for c in r["curve"]], marker=".", label=r["run"])
        ax.axhline(TARGET, color="gray", lw=0.8, ls="--")
        ax.set_title(title)
        ax.set_xlabel("training samples (k)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val accuracy")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write DATA/matching/{train,val}.jsonl from one-object scenes")
    m.add_argument("data", type=Path)
    m.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report", help="samples to 95%% per run, and the last accuracies")
    r.add_argument("runs", type=Path, nargs="+")
    r.add_argument("--out", type=Path)
    r.add_argument("--earlier", type=Path, help="an earlier report's matching.json: its runs join the table (marked *)")
    a = ap.parse_args(argv)
    if a.cmd == "make":
        counts = make(a.data, a.seed)
        print(f"wrote {a.data / 'matching'}: " + ", ".join(f"{k} {v} questions" for k, v in counts.items()))
    else:
        print(report(a.runs, a.out, a.earlier))
    return 0


if __name__ == "__main__":
    sys.exit(main())
