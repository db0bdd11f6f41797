"""Answers per second from image files, where the time goes, side by side in one run (issue 40
part 2); run it alone on the machine.

    python bench/answer_throughput.py [--data ../shared/data/clevr-real-sample] [--model builtin]
                                      [--batch 16] [--repeats 5] [--backend auto]

On every question of the data's train and val splits (in file order: an image's questions follow
one another and straddle batches), with the same model and backend, interleaved repeat by repeat:
- pillow: decoding and resizing each question's PNG with Pillow, no model (the reference rate);
- decode: decoding and resizing each distinct image once, no model;
- model: the model on already decoded and normalised batches (no decoding);
- per-batch: answer_batch as it ran before issue 40 (each batch decodes its own images, then runs);
- one-call: answer_batch today (each distinct image decoded once per call, decoding ahead of the
  model on the image workers).
With --uint8, also the same model converted to take uint8 pixels (export/uint8_input.py: the
graph normalises; the runtime hands it the decoded bytes): model and one-call on that graph, with
the same --backend (give one: auto would pick another backend for a graph without parity rows).
Prints questions/s for each and one-call against per-batch and against pillow, with the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

import runtime  # noqa: E402
from qgmrn.data.sources import load_clevr  # noqa: E402
from qgmrn.preprocess import load_rgb, normalize, resize_uint8  # noqa: E402


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "clevr-real-sample"))
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--uint8", action="store_true", help="add rows for the uint8-input graph (needs --backend)")
    a = ap.parse_args(argv)
    if a.uint8 and a.backend == "auto":
        ap.error("--uint8 compares graphs on one backend: give --backend (onnxruntime, openvino, ...)")
    samples = load_clevr(a.data, "train") + load_clevr(a.data, "val")
    images = [str(s.image) for s in samples]
    questions = [s.question for s in samples]
    model = runtime.load(a.model, a.backend)
    size, bs = model.image_size, a.batch
    decoded = {p: resize_uint8(load_rgb(p), size) for p in dict.fromkeys(images)}
    pixels = [normalize(np.stack([decoded[p] for p in images[i:i + bs]])) for i in range(0, len(images), bs)]

    def pillow():
        for p in images:
            resize_uint8(load_rgb(p), size)

    def decode():
        for p in dict.fromkeys(images):
            resize_uint8(load_rgb(p), size)

    def model_only():
        for c, px in enumerate(pixels):
            model._predict_pixels(px, questions[c * bs:(c + 1) * bs], 1)

    def per_batch():
        return [p.answer for i in range(0, len(images), bs)
                for p in model._predict_chunk(images[i:i + bs], questions[i:i + bs], 1)]

    def one_call():
        return model.answer_batch(images, questions, batch_size=bs)

    assert per_batch() == one_call()                    # the same answers either way
    runs = {"pillow": pillow, "decode": decode, "model": model_only, "per-batch": per_batch, "one-call": one_call}
    if a.uint8:
        import tempfile
        from export.uint8_input import convert
        src = Path(str(model.path))
        src = src if src.suffix == ".onnx" else src / "model.onnx"
        u8_model = runtime.Model(convert(src, Path(tempfile.mkdtemp()) / "model-u8.onnx"), a.backend)
        raw = [np.stack([decoded[p] for p in images[i:i + bs]]) for i in range(0, len(images), bs)]

        def model_u8():
            for c, px in enumerate(raw):
                u8_model._predict_pixels(px, questions[c * bs:(c + 1) * bs], 1)

        def one_call_u8():
            return u8_model.answer_batch(images, questions, batch_size=bs)

        assert one_call_u8() == one_call()              # the same answers from bytes in
        runs.update({"model (uint8 graph)": model_u8, "one-call (uint8 graph)": one_call_u8})
    times: dict = {k: [] for k in runs}
    for _ in range(a.repeats):
        for k, f in runs.items():
            time.sleep(0.2)          # the previous row's onnxruntime threads stop spinning first
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    n = len(questions)
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"CPU: {cpu_model()}; model {a.model} on {model.backend}, {n} questions on "
          f"{len(decoded)} images ({Path(a.data).name}), batch {bs}, median of {a.repeats}\n")
    print("| path | questions/s | seconds |")
    print("|---|---|---|")
    for k in runs:
        print(f"| {k} | {rate[k]:.0f} | {statistics.median(times[k]):.3f} |")
    print(f"\none-call / per-batch: {rate['one-call'] / rate['per-batch']:.2f}x; "
          f"one-call / pillow (decoding each question's PNG): {rate['one-call'] / rate['pillow']:.2f}x")
    if a.uint8:
        print(f"uint8 graph / float graph: model {rate['model (uint8 graph)'] / rate['model']:.2f}x, "
              f"one-call {rate['one-call (uint8 graph)'] / rate['one-call']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
