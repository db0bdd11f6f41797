"""Which real CLEVR questions a model can read: the share of questions with a word its
vocabulary lacks (the word becomes <unk>, so "big", "tiny" or "on the left side of" carry nothing).

    python study/vocab_coverage.py SOURCE [SOURCE ...] [--real DIR] [--json OUT]

SOURCE: a CLEVR-layout data root (its training questions make the vocabulary, as the trainer
builds it) or a model (an .onnx, a bundle, or `builtin`: the vocabulary it shipped with).
--real: the questions to read (default: the real CLEVR sample in ../shared/data, both splits).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

from qgmrn.data.sources import load_clevr  # noqa: E402
from qgmrn.preprocess import Vocab  # noqa: E402

REAL_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "clevr-real-sample"


def vocabulary(source: str) -> Vocab:
    path = Path(source)
    if (path / "questions").is_dir():
        return Vocab.build(s.question for s in load_clevr(path, "train"))
    import runtime
    return runtime.load(source, backend="cpu").vocab


def coverage(vocab: Vocab, samples) -> dict:
    unknown = [vocab.encode(s.question)[1] for s in samples]
    per_type: dict[str, list[int]] = {}
    for s, u in zip(samples, unknown):
        per_type.setdefault(s.qtype or "other", [0, 0])
        per_type[s.qtype or "other"][0] += bool(u)
        per_type[s.qtype or "other"][1] += 1
    words = Counter(w for u in unknown for w in u)
    return {"questions": len(samples), "with_unknown": sum(bool(u) for u in unknown),
            "vocabulary": len(vocab), "unknown_words": dict(words.most_common()),
            "per_type_with_unknown": {t: v[0] / v[1] for t, v in per_type.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--real", default=str(REAL_SAMPLE))
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    samples = load_clevr(a.real, "train") + load_clevr(a.real, "val")
    out = {}
    print(f"| source | vocabulary | real questions with an unknown word (of {len(samples)}) | most common unknown words |")
    print("|---|---|---|---|")
    for source in a.sources:
        c = coverage(vocabulary(source), samples)
        out[Path(source).name] = c
        top = ", ".join(f"{w} ({n})" for w, n in list(c["unknown_words"].items())[:8]) or "-"
        print(f"| {Path(source).name} | {c['vocabulary']} | {c['with_unknown']} ({100 * c['with_unknown'] / c['questions']:.0f}%) | {top} |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
