"""python -m runtime IMAGE "QUESTION" [--model PATH] [--top-k K] [--json] [--backend B]
python -m runtime --example N "QUESTION"       # one of the shipped example scenes (1-4)"""
from __future__ import annotations

import argparse
import json
import os
import sys

from pathlib import Path

from . import BUILTIN, ImageError, ModelError, NoModelConfigured, QuestionError, load

EXAMPLES = sorted((Path(__file__).resolve().parent / "examples").glob("scene*.png"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime", description="Answer a question about an image.")
    ap.add_argument("inputs", nargs="+", metavar="[IMAGE] QUESTION",
                    help="an image file (PNG, JPEG, ...) and the question to ask about it")
    ap.add_argument("--example", type=int, choices=range(1, len(EXAMPLES) + 1), metavar="N",
                    help=f"ask about shipped example scene N (1-{len(EXAMPLES)}) instead of an image file")
    ap.add_argument("--model", default=os.environ.get("QGMRN_MODEL") or BUILTIN,
                    help="exported .onnx, bundle directory, TensorRT engine, or 'builtin' "
                         "(default: $QGMRN_MODEL, else the built-in model)")
    ap.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "onnxruntime", "openvino", "cpu"])
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the full prediction as JSON")
    a = ap.parse_args(argv)
    want = 1 if a.example else 2
    if len(a.inputs) != want:
        ap.error("give an image and a question" if want == 2 else "with --example, give only the question")
    a.image, a.question = (str(EXAMPLES[a.example - 1]), a.inputs[0]) if a.example else a.inputs
    if a.top_k < 1:
        ap.error(f"--top-k must be at least 1, got {a.top_k}")
    try:
        if not a.model:
            raise NoModelConfigured("give --model or set QGMRN_MODEL")
        model = load(a.model, a.backend)
        pred = model.predict(a.image, a.question, top_k=a.top_k)
    except (ImageError, QuestionError, ModelError, NoModelConfigured, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if a.json:
            print(json.dumps({**pred.to_dict(), "backend": model.backend}, indent=2))
        elif a.top_k > 1:
            for ans, p in pred.top_k:
                print(f"{ans}\t{p:.4f}")
        else:
            print(pred.answer)
        sys.stdout.flush()
    except BrokenPipeError:                      # `... --json | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if pred.unknown_words and not a.json:
        print(f"note: words this model never saw: {', '.join(pred.unknown_words)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
