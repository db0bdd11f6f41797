"""The text-only check (issue 48): how much of a question set's answers its words alone give away.
A blind model (the question encoder and an MLP, no image: what a model learns from another scene's
image, in expectation) is trained on a generated set's training questions and answers its val and
the real CLEVR sample; beside it the majority and question-only (most common answer for the same
words) baselines, per family and type. The generator is honest when the blind model does about
as well on its val as on real CLEVR's questions (within the real sample's noise, 3 points).

    python study/text_only.py DATA [--real ../shared/data/clevr-real-sample] [--steps 6000] [--md FILE]

Exit status 0 when the check holds, 1 when the blind model reads more from the generator's words
than from CLEVR's by more than --tolerance points.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from oracle import baselines, summarize  # noqa: E402
from oracle_data import FAMILIES, Split, load_split  # noqa: E402
from qgmrn.data.programs import QUESTION_TYPES  # noqa: E402
from qgmrn.model import TextEncoder  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "clevr-real-sample"


class Blind(nn.Module):
    def __init__(self, vocab_size: int, num_answers: int):
        super().__init__()
        self.text = TextEncoder(vocab_size, 64, 128)
        self.mlp = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, num_answers))

    def forward(self, tokens, lengths):
        return self.mlp(self.text(tokens, lengths))


def _accuracy(model: Blind, data: Split) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(data.tokens[i:i + 1024], data.lengths[i:i + 1024]).argmax(1)
                          for i in range(0, len(data.labels), 1024)])
    model.train()
    return (pred == data.labels).numpy()


def check(root: Path, real: Path, steps: int = 6000, seed: int = 0) -> dict:
    """The blind model and the baselines on the generated val and on the real sample. One thread:
    the same numbers from the command and from a test, on any machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _check(root, real, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _check(root: Path, real: Path, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    train, vocab, answers = load_split(root, "train", 8)
    val, _, _ = load_split(root, "val", 8, vocab, answers)
    sample = [load_split(real, s, 8, vocab, answers)[0] for s in ("train", "val")]
    model = Blind(len(vocab), len(answers))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(train.labels), (64,), generator=g)
        loss = F.cross_entropy(model(train.tokens[idx], train.lengths[idx]), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {"generated val": {"blind": summarize(_accuracy(model, val), val),
                             **baselines(train.records(), val.records(), val)}}
    # the real sample: both splits (340 questions), answered by what was learnt on the generator's
    for name, part in (("real sample", sample),):
        correct = np.concatenate([_accuracy(model, d) for d in part])
        merged = _merge(part)
        out[name] = {"blind": summarize(correct, merged),
                     **baselines(train.records(), part[0].records() + part[1].records(), merged)}
    return out


class Scored(NamedTuple):
    """What scoring reads of the questions (oracle.summarize): two splits as one."""
    types: list
    families: list
    scene_of: torch.Tensor


def _merge(parts: list[Split]) -> Scored:
    offset = len(parts[0].maps)                          # scene ids of the two splits kept apart
    return Scored(parts[0].types + parts[1].types, parts[0].families + parts[1].families,
                  torch.cat([parts[0].scene_of, parts[1].scene_of + offset]))


def table(result: dict) -> str:
    head = ["questions", "model", "overall", "+-", *FAMILIES, *QUESTION_TYPES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for where, rows in result.items():
        for name in ("blind", "question_only", "majority"):
            r = rows[name]
            lines.append("| " + " | ".join([where, name.replace("_", "-"), f"{100 * r['overall']:.1f}", f"{100 * r['se']:.1f}",
                                            *(f"{100 * r['per_family'][f]:.1f}" if f in r["per_family"] else "-" for f in FAMILIES),
                                            *(f"{100 * r['per_type'][t]:.1f}" if t in r["per_type"] else "-"
                                              for t in QUESTION_TYPES)]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a generated CLEVR-layout dataset (train and val)")
    ap.add_argument("--real", default=str(REAL), help="real CLEVR questions to compare with")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--tolerance", type=float, default=3.0, help="points")
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    result = check(Path(a.data), Path(a.real), a.steps)
    gap = 100 * (result["generated val"]["blind"]["overall"] - result["real sample"]["blind"]["overall"])
    text = table(result) + (f"\n\nblind model: {gap:+.1f} points on the generator's val over the real sample "
                            f"({'holds' if gap <= a.tolerance else 'fails'}: at most {a.tolerance:g})\n")
    print(text, end="")
    if a.md:
        Path(a.md).write_text(text)
    return 0 if gap <= a.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
