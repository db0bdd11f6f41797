"""Score trained study runs (QGMRN checkpoints or FiLM's film.pt) on other data than their own val:
the learning study's table of Pillow vs Blender training data, input size, FRN/BRN, FiLM and bf16
rows on rendered val, Pillow val and the real CLEVR sample, side by side.

    python study/cross_eval.py runs/study-r/* --on rendered=/work/renders/clevr-128:val \\
        --on real=../shared/data/clevr-real-sample:train,val --max 3000 --out docs/learning/rendered/rows

Each run's model answers every question of each named split (the first --max of each); a question
longer than its token limit is skipped and counted, an answer it never learned counts as wrong.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

from qgmrn.data.sources import load_clevr  # noqa: E402
from qgmrn.evaluate import summarize, within_limit  # noqa: E402
from qgmrn.preprocess import Vocab, encode_batch, preprocess_image  # noqa: E402


def load_run(run: Path):
    """(predict(images, tokens, lengths) -> logits, vocab, answers, image size, question limit, what)."""
    if (run / "film.pt").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from film import FiLM
        # weights only: a run folder from someone else must not run code when it is read
        state = torch.load(run / "film.pt", map_location="cpu", weights_only=True)
        model = FiLM(len(state["vocab"]), len(state["answers"]), state["width"])
        model.load_state_dict(state["film"])
        model.eval()
        return model, Vocab(list(state["vocab"])), list(state["answers"]), state["image_size"], 64, "film"
    from qgmrn.checkpoint import load_checkpoint, model_from_checkpoint
    state = load_checkpoint(run / "ckpt.pt")
    model = model_from_checkpoint(state).eval()
    forward = lambda im, tok, ln: model(im, tok, ln)[0]     # noqa: E731  (logits first)
    return (forward, Vocab(list(state["vocab"])), list(state["answers"]), model.cfg.image_size,
            int(state["max_question_len"]), f"qgmrn {model.cfg.arch}")


def score(run: Path, root: str, splits: list[str], max_n: int) -> dict:
    model, vocab, answers, size, limit, what = load_run(run)
    samples = [s for split in splits for s in load_clevr(root, split)[:max_n or None]]
    samples, skipped = within_limit(samples, limit)
    index = {a: i for i, a in enumerate(answers)}
    labels = np.array([index.get(s.answer, -1) for s in samples])
    preds = []
    with torch.no_grad():
        for i in range(0, len(samples), 128):
            part = samples[i:i + 128]
            images = torch.from_numpy(np.stack([preprocess_image(s.image, size) for s in part]))
            tokens, lengths, _ = encode_batch(vocab, [s.question for s in part])
            preds.append(model(images, torch.from_numpy(tokens), torch.from_numpy(lengths)).argmax(1).numpy())
    result = summarize(np.concatenate(preds) == labels, samples)
    return {"model": what, "skipped": skipped, **{k: v for k, v in result.items() if not k.startswith("_")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--on", action="append", required=True, metavar="NAME=ROOT:SPLITS")
    ap.add_argument("--max", type=int, default=3000, help="questions per split (0: all)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    targets = []
    for spec in a.on:
        name, _, rest = spec.partition("=")
        root, _, splits = rest.rpartition(":")
        targets.append((name, root, splits.split(",")))
    results = {}
    for run in a.runs:
        results[run.name] = {name: score(run, root, splits, a.max) for name, root, splits in targets}
        print(f"{run.name}: " + "  ".join(f"{n} {100 * r['overall']:.1f}% of {r['n']}" for n, r in results[run.name].items()),
              flush=True)
    types = ["count", "exist", "compare_numbers", "query_attribute", "compare_attribute"]
    lines = ["| run | " + " | ".join(f"{n} overall" for n, _, _ in targets) + " | "
             + " | ".join(f"{targets[-1][0]} {t}" for t in types) + " |", "|---" * (1 + len(targets) + len(types)) + "|"]
    for run, res in results.items():
        last = res[targets[-1][0]]["per_type"]
        lines.append(f"| {run} | " + " | ".join(f"{100 * res[n]['overall']:.1f}" for n, _, _ in targets) + " | "
                     + " | ".join(f"{100 * last[t]:.1f}" if t in last else "-" for t in types) + " |")
    print("\n".join(lines))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "cross_eval.json").write_text(json.dumps(results, indent=1))
        (a.out / "cross_eval.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
