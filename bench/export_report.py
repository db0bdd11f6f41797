"""Export wall time, ONNX sizes (fp32/fp16) and parity figures of random-init paper presets.

    python bench/export_report.py [--presets brn-c32 frn] [--parity-samples 120]

Random-init weights are fine for parity: the check compares PyTorch with each artefact on real
inputs (generated CLEVR-style val images plus the real CLEVR sample when it is there). The
routing FC gets spread weights so that gates differ between questions, as in a trained model.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from export.bundle import export_checkpoint
from qgmrn.checkpoint import save_checkpoint
from qgmrn.data.sources import load_clevr
from qgmrn.model import create_model
from qgmrn.preprocess import Vocab

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "clevr-real-sample"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["brn-c32", "frn"])
    ap.add_argument("--parity-samples", type=int, default=120)
    a = ap.parse_args(argv)
    real = load_clevr(SAMPLE, "val") if SAMPLE.exists() else []
    questions = [s.question for s in real] or ["What color is the cube?"]
    vocab = Vocab.build(questions + ["how many spheres are there ?"])
    answers = sorted({s.answer for s in real}) or ["yes", "no"]
    print(f"{'preset':<10}{'export s':>9}{'fp32 MB':>9}{'fp16 MB':>9}  artefact   max|dlogit|  top-1    gates    "
          f"near-0  flips  passed")
    for preset in a.presets:
        torch.manual_seed(0)
        model = create_model(preset, vocab_size=len(vocab), num_answers=len(answers))
        with torch.no_grad():
            model.router.fc.weight.normal_(0, 0.5)
            model.router.fc.bias.zero_()
        tmp = Path(tempfile.mkdtemp(prefix=f"qgmrn-{preset}-"))
        ckpt = save_checkpoint(tmp / "ckpt.pt", model=model, vocab=vocab.tokens, answers=answers, max_question_len=64)
        t0 = time.perf_counter()
        staged = export_checkpoint(ckpt, tmp / "bundle", fp16=True, parity_n=a.parity_samples, extra_samples=real,
                                   log=lambda *x: None)
        wall = time.perf_counter() - t0
        r = staged.report
        sizes = [(staged.stage / n).stat().st_size / 1e6 for n in ("model.onnx", "model.fp16.onnx")]
        for i, (name, x) in enumerate(r["artefacts"].items()):
            head = f"{preset:<10}{wall:>9.1f}{sizes[0]:>9.1f}{sizes[1]:>9.1f}" if i == 0 else " " * 37
            print(f"{head}  {name:<10}{x['max_abs_logit_diff']:>10.2e}{100 * x['top1_agreement']:>8.2f}%"
                  f"{100 * x['gate_agreement']:>8.3f}%{x['route_logits_within_eps']:>8}{x['near_threshold_flips']:>7}"
                  f"  {x['passed']}")
        print(f"{'':<10}parity on {r['samples']} samples ({r['inputs']} + real CLEVR sample); "
              f"export alone {r['export_seconds']:.1f} s; report {staged.stage / 'parity.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
