"""Score an exported model (a bundle, an .onnx, or the built-in model) on CLEVR-layout questions
through the torch-free runtime: accuracy overall and per question type.

    python study/score_model.py MODEL --data-root DIR [--splits val] [--max N] [--json OUT]

The learning study uses it to put two shipped models side by side on the same questions (e.g. the
Pillow-trained built-in model on rendered val and on the real CLEVR sample).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

from qgmrn.data.sources import load_clevr  # noqa: E402
from qgmrn.evaluate import summarize, within_limit  # noqa: E402


def score(model_path: str, data_root, splits, max_n: int = 0) -> dict:
    import runtime
    model = runtime.load(model_path, backend="cpu")
    samples = [s for split in splits for s in load_clevr(data_root, split)]
    samples, skipped = within_limit(samples[:max_n] if max_n else samples, model.max_question_len)
    got = model.answer_batch([s.image for s in samples], [s.question for s in samples], batch_size=64)
    result = summarize(np.array([g == s.answer for g, s in zip(got, samples)]), samples)
    return {**result, "skipped": skipped, "model": Path(model_path).name, "data": Path(data_root).name,
            "splits": list(splits)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--splits", nargs="+", default=["val"])
    ap.add_argument("--max", type=int, default=0, help="first N questions only (0: all)")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    res = score(a.model, a.data_root, a.splits, a.max)
    print(f"{res['model']} on {res['data']} {'+'.join(res['splits'])}: {100 * res['overall']:.1f}% of {res['n']} "
          + " ".join(f"{k}={100 * v:.1f}" for k, v in res["per_type"].items()))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
