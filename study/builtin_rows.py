"""Judge the shipped built-in model's reduced-precision rows (int8 file, OpenVINO f32/bf16/int8) and
write them into its card, so that `auto` can run the fastest one that passed (issue 20).

    python study/builtin_rows.py [--dest runtime/models] [--calib 256] [--data-root DIR]

The built-in model's checkpoint is not kept in the repository, so the reference is its fp32 ONNX
graph, which export proved against PyTorch (card["parity"], whose figures the card's
artefacts_reference repeats). Inputs: all 340 questions of the real CLEVR sample plus 100 more
(see below): 440, above the 400 auto requires. int8 is calibrated on the
model's own training images: with --data-root (the dataset it trained on, e.g. Blender renders)
its first training images, and the 100 generated questions are that dataset's first 100 val
questions; without it the Pillow generator, which is seeded per chunk of 50 images, so generating
the first chunks with the recipe's seed reproduces its first training scenes exactly. Run it
alone: the rows' latencies, measured here, decide auto's order on this CPU.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REAL_SAMPLE = REPO.parent / "shared" / "data" / "clevr-real-sample"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=str(REPO / "runtime" / "models"))
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--data-root", help="the CLEVR-layout data the model trained on (default: regenerate the "
                                        "Pillow data from the recipe's seed)")
    a = ap.parse_args(argv)
    from export.bundle import finish_rows
    from export.onnx_export import read_metadata
    from export.parity import answer_labels, make_batches, run_onnxruntime
    from export.precision import judge_rows
    from export.quantize import calibration_batches, quantize_int8
    from qgmrn.data.generate import generate
    from qgmrn.data.sources import load_clevr
    from qgmrn.preprocess import Vocab

    dest = Path(a.dest)
    fp32 = dest / "builtin.onnx"
    card_path = dest / "builtin.json"
    card = json.loads(card_path.read_text())
    meta = read_metadata(fp32)
    vocab, size = Vocab(list(meta["vocab"])), int(meta["image_size"])
    with tempfile.TemporaryDirectory(prefix="qgmrn-builtin-rows-") as tmp:
        tmp = Path(tmp)
        seed = int((card.get("train_config") or {}).get("seed", 0))
        if a.data_root:
            extra, extra_name = load_clevr(a.data_root, "val")[:100], f"the first 100 val questions of {Path(a.data_root).name}"
            train_root, calib_source = Path(a.data_root), f"the first {a.calib} training images of {Path(a.data_root).name}"
        else:
            gen = tmp / "val"
            generate(gen, images=1, val_images=10, questions=10, seed=5151, workers=1, log=lambda *x: None)
            extra, extra_name = load_clevr(gen, "val"), "100 generated val questions (seed 5151)"
            train_root = tmp / "train"
            generate(train_root, images=a.calib, val_images=1, questions=1, seed=seed, log=lambda *x: None)
            calib_source = (f"the first {a.calib} training scenes of the built-in data "
                            f"(generator seed {seed}, regenerated identically)")
        samples = load_clevr(REAL_SAMPLE, "train") + load_clevr(REAL_SAMPLE, "val") + extra
        batches = list(make_batches(samples, vocab, size))
        one_per_image: dict = {}                       # the first question of each of the first images
        for s in load_clevr(train_root, "train"):
            one_per_image.setdefault(s.image, s)
        calib = calibration_batches(list(one_per_image.values())[:a.calib], vocab, size, a.calib)
        int8 = tmp / "builtin.int8.onnx"
        int8_info = quantize_int8(fp32, int8, calib, meta)
        int8_info["calibration_source"] = calib_source
        reference = run_onnxruntime(fp32, batches)
        rows = judge_rows({"fp32": fp32, "int8": int8}, batches, reference, meta["layer_sizes"],
                          answer_labels(samples, list(meta["answers"])), log=print)
        rows = finish_rows(rows, {"fp32": fp32, "int8": int8}, log=print)   # removes int8 if no row passed it
        kept = int8.exists()
        if kept:
            shutil.copyfile(int8, dest / "builtin.int8.onnx")
        else:
            (dest / "builtin.int8.onnx").unlink(missing_ok=True)
    card["artefacts"] = rows
    parity = card["parity"]
    card["artefacts_reference"] = (f"the fp32 ONNX graph (card['parity']: within {parity['max_abs_logit_diff']:.1e} of "
                                   f"PyTorch, top-1 {100 * parity['top1_agreement']:.0f}%, gates "
                                   f"{100 * parity['gate_agreement']:.2f}% identical); inputs: the real CLEVR "
                                   f"sample's 340 questions + {extra_name}")
    card["int8"] = int8_info
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    print(f"wrote {card_path}" + (f" and {dest / 'builtin.int8.onnx'}" if kept else "; int8 left out"))
    passed = [k for k, r in rows.items() if r["passed"]]
    print("passed: " + ", ".join(passed) + "; accuracy (fp32 graph) "
          f"{100 * np.mean(rows['onnx-fp32']['accuracy']):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
