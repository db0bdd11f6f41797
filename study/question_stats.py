"""How a set of CLEVR-layout questions is shaped, side by side with another (issue 48): families,
relation hops, program lengths, words, and how often the answer follows from the wording
(exist's "yes" by the number of attributes it names; comparisons' "yes"; count answers).

    python study/question_stats.py ../shared/data/clevr-real-sample:train+val DATA:train [--md docs/data-questions.md]

Each argument is ROOT[:SPLITS] (splits joined by +; default train+val). Prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from oracle_data import FAMILIES, family, hops  # noqa: E402
from qgmrn.data.programs import QUESTION_TYPES, named_attributes, program_subtype, question_type  # noqa: E402
from qgmrn.preprocess import tokenize  # noqa: E402

LENGTHS = ((0, 5), (6, 8), (9, 11), (12, 14), (15, 99))


def load(spec: str) -> tuple[str, list[dict]]:
    root, _, splits = spec.partition(":")
    records = []
    for split in (splits or "train+val").split("+"):
        path = Path(root) / "questions" / f"CLEVR_{split}_questions.json"
        records += json.loads(path.read_text())["questions"]
    return spec, records


def stats(records: list[dict]) -> dict:
    n = len(records)
    fam, types, hop, lengths, exist, yes_no, counts = Counter(), Counter(), Counter(), Counter(), {}, {}, Counter()
    steps = words = 0
    for r in records:
        p = r["program"]
        sub = program_subtype(p)
        t = question_type(sub)
        fam[family(p)] += 1
        types[t] += 1
        hop[min(hops(p), 3)] += 1
        steps += len(p)
        words += len([w for w in tokenize(r["question"]) if w[0].isalnum()])
        lengths[next(i for i, (lo, hi) in enumerate(LENGTHS) if lo <= len(p) <= hi)] += 1
        if sub == "exist":
            k = min(named_attributes(p, len(p) - 1), 3)
            exist.setdefault(k, Counter())[r["answer"]] += 1
        if t in ("compare_numbers", "compare_attribute"):
            yes_no.setdefault(t, Counter())[r["answer"]] += 1
        if sub == "count":
            counts[r["answer"]] += 1
    share = lambda c, k: c[k] / n if n else 0.0  # noqa: E731
    return {"n": n, "families": {f: share(fam, f) for f in FAMILIES},
            "types": {t: share(types, t) for t in QUESTION_TYPES},
            "hops": {k: share(hop, k) for k in range(4)}, "mean_steps": steps / n, "mean_words": words / n,
            "lengths": {f"{lo}-{hi}" if hi < 99 else f"{lo}+": share(lengths, i) for i, (lo, hi) in enumerate(LENGTHS)},
            "exist_yes": {k: (c["yes"] / sum(c.values()), sum(c.values())) for k, c in sorted(exist.items())},
            "compare_yes": {t: (c["yes"] / sum(c.values()), sum(c.values())) for t, c in yes_no.items()},
            "count_answers": {a: c / max(1, sum(counts.values())) for a, c in sorted(counts.items(), key=lambda x: int(x[0]))}}


def tables(named: list[tuple[str, dict]]) -> str:
    heads = "| | " + " | ".join(f"{name} ({s['n']:,} q)" for name, s in named) + " |"
    rule = "|---|" + "---|" * len(named)

    def block(title: str, rows: list[tuple[str, list[str]]]) -> list[str]:
        return [f"**{title}**", "", heads, rule] + [f"| {k} | " + " | ".join(v) + " |" for k, v in rows] + [""]

    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    out: list[str] = []
    out += block("Family (share of questions)", [(f, [pct(s["families"][f]) for _, s in named]) for f in FAMILIES])
    out += block("Type", [(t, [pct(s["types"][t]) for _, s in named]) for t in QUESTION_TYPES])
    out += block("Relate and same-attribute hops", [(f"{k}{'+' if k == 3 else ''}", [pct(s["hops"][k]) for _, s in named])
                                                    for k in range(4)])
    keys = list(named[0][1]["lengths"])
    out += block("Program length (steps)", [(k, [pct(s["lengths"][k]) for _, s in named]) for k in keys]
                 + [("mean steps", [f"{s['mean_steps']:.1f}" for _, s in named]),
                    ("mean words", [f"{s['mean_words']:.1f}" for _, s in named])])
    out += block("Exist: 'yes' by attributes named", [
        (f"{k}{'+' if k == 3 else ''} named", [f"{pct(s['exist_yes'][k][0])} of {s['exist_yes'][k][1]}"
                                               if k in s["exist_yes"] else "-" for _, s in named]) for k in range(4)])
    out += block("Comparisons: 'yes'", [(t, [f"{pct(s['compare_yes'][t][0])} of {s['compare_yes'][t][1]}"
                                             if t in s["compare_yes"] else "-" for _, s in named])
                                        for t in ("compare_numbers", "compare_attribute")])
    answers = sorted({a for _, s in named for a in s["count_answers"]}, key=int)
    out += block("Count answers", [(a, [pct(s["count_answers"].get(a, 0.0)) for _, s in named]) for a in answers])
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", metavar="ROOT[:SPLITS]")
    ap.add_argument("--names", help="comma-separated column names (default: the arguments)")
    ap.add_argument("--md", help="also write the tables here")
    a = ap.parse_args(argv)
    loaded = [load(s) for s in a.sets]
    names = a.names.split(",") if a.names else [s for s, _ in loaded]
    text = tables([(name, stats(records)) for name, (_, records) in zip(names, loaded)])
    print(text)
    if a.md:
        Path(a.md).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
