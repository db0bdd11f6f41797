"""Parity of exported artefacts with PyTorch on real inputs: logits, answers and routing gates."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qgmrn.data.sources import Sample, load_clevr, load_jsonl
from qgmrn.preprocess import Vocab, encode_batch, preprocess_image

from runtime.backends import OUTPUTS as OUTPUT_NAMES

# Decisions whose route logit lies within EPS of 0 may legitimately flip between backends.
EPS = 1e-3


@dataclass(frozen=True)
class Tolerance:
    max_logit_diff: float | None          # None: reported, not gated (reduced precisions)
    min_top1_agreement: float
    max_gate_mismatch: int = 0            # gates that differ although |route logit| > EPS
    max_accuracy_drop: float | None = None   # vs PyTorch's accuracy on the inputs with known answers


# A reduced-precision artefact or backend (fp16, bf16, int8) is judged by its answers, not by how
# close its logits are: routing stays float32, so the gates must agree outside EPS; top-1 agrees
# with PyTorch on at least 99% of the parity inputs; accuracy (where the answers are known) is at
# most 0.5 points below PyTorch's. max |logit diff| is reported. fp32 keeps its 1e-4 logit bound.
ANSWERS_RULE = Tolerance(None, 0.99, 0, 0.005)
TOLERANCES = {"fp32": Tolerance(1e-4, 1.0), "fp16": ANSWERS_RULE, "bf16": ANSWERS_RULE, "int8": ANSWERS_RULE}
# auto picks a reduced-precision row only when it was judged on at least this many questions
MIN_JUDGED = 400


def parity_samples(data_root=None, jsonl=None, n: int = MIN_JUDGED, seed: int = 0, scratch=None
                   ) -> tuple[list[Sample], str]:
    """Real inputs for parity: given data, or a CLEVR-style val split generated into `scratch`
    (a directory the caller removes once the images are read)."""
    if jsonl:
        samples, source = load_jsonl(jsonl, require_answers=False), str(jsonl)
    elif data_root:
        samples, source = load_clevr(data_root, "val", require_answers=False), f"{data_root} (val)"
    else:
        from qgmrn.data.generate import generate
        root = Path(scratch or tempfile.mkdtemp(prefix="qgmrn-parity-"))
        generate(root, images=1, val_images=max(1, n // 8), questions=8, seed=seed + 1, workers=1,
                 log=lambda *a: None)
        samples, source = load_clevr(root, "val"), "generated CLEVR-style val images"
    rng = np.random.default_rng(seed)
    if len(samples) > n:
        samples = [samples[i] for i in sorted(rng.choice(len(samples), n, replace=False))]
    return samples, source


def make_batches(samples: list[Sample], vocab: Vocab, image_size: int, batch: int = 16):
    """(image (B,3,S,S) float32, tokens (B,T) int64, lengths (B,) int64) numpy batches; each batch
    holds questions of mixed lengths, padded with NULL."""
    for i in range(0, len(samples), batch):
        part = samples[i:i + batch]
        images = np.stack([preprocess_image(s.image, image_size) for s in part])
        tokens, lengths, _ = encode_batch(vocab, [s.question for s in part])
        yield images, tokens, lengths


def run_torch(model, batches, device="cpu") -> dict[str, np.ndarray]:
    model = model.eval().to(device)
    outs = {k: [] for k in OUTPUT_NAMES}
    with torch.no_grad():
        for images, tokens, lengths in batches:
            o = model(torch.from_numpy(images).to(device), torch.from_numpy(tokens).to(device),
                      torch.from_numpy(lengths).to(device))
            for k, v in zip(outs, o):
                outs[k].append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def run_backend(runner, batches, max_batch: int | None = None) -> dict[str, np.ndarray]:
    """A runtime runner (onnxruntime or TensorRT) on the parity batches, split to max_batch."""
    outs = {k: [] for k in OUTPUT_NAMES}
    for images, tokens, lengths in batches:
        step = max_batch or len(images)
        for i in range(0, len(images), step):
            got = runner.run({"image": images[i:i + step], "tokens": tokens[i:i + step],
                              "lengths": lengths[i:i + step]})
            for k in outs:
                outs[k].append(np.asarray(got[k], dtype=np.float32))
    return {k: np.concatenate(v) for k, v in outs.items()}


def run_onnxruntime(path, batches) -> dict[str, np.ndarray]:
    """The artefact through the runtime's own onnxruntime runner (CPU), metadata check included
    (not the finite-weights check: parity reports non-finite weights itself, as a failure)."""
    from runtime.backends import OnnxRuntimeRunner
    return run_backend(OnnxRuntimeRunner(path, "cpu", check_weights=False), batches)


def answer_labels(samples: list[Sample], answers: list[str]) -> np.ndarray:
    """Each sample's true answer as an index into the model's answers; -1 where it is unknown (no
    answer given), -2 where the model cannot give it (an answer it never learned: wrong for all)."""
    index = {a: i for i, a in enumerate(answers)}
    return np.array([-1 if s.answer is None else index.get(s.answer, -2) for s in samples], dtype=np.int64)


def compare(reference: dict, other: dict, layer_sizes, tolerance: Tolerance, eps: float = EPS,
            labels: np.ndarray | None = None) -> dict:
    """Reference (PyTorch) vs another backend. Samples in which a near-threshold decision flipped
    run other modules, so their logits are compared only through the flip count. `labels`
    (answer_labels) adds both sides' accuracy where the answers are known."""
    sizes = np.asarray(layer_sizes)
    valid = np.arange(reference["gates"].shape[2])[None, :] < sizes[:, None]        # (L, M)
    valid = np.broadcast_to(valid, reference["gates"].shape)
    near = (np.abs(reference["route_logits"]) <= eps) & valid
    differ = (reference["gates"] != other["gates"]) & valid
    flipped_near = differ & near
    mismatch = differ & ~near
    clean = ~flipped_near.any(axis=(1, 2))
    diff = np.abs(reference["logits"] - other["logits"])
    max_diff = float(diff[clean].max()) if clean.any() else 0.0
    top1 = reference["logits"].argmax(1) == other["logits"].argmax(1)
    report = {
        "samples": int(len(top1)),
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": float(diff[clean].mean()) if clean.any() else 0.0,
        "top1_agreement": float(top1.mean()),
        "top1_agreement_clean": float(top1[clean].mean()) if clean.any() else 1.0,
        "gates_compared": int(valid.sum()),
        "gate_agreement": float(1.0 - differ.sum() / max(1, valid.sum())),
        "gates_differ_outside_eps": int(mismatch.sum()),
        "route_logits_within_eps": int(near.sum()),
        "near_threshold_flips": int(flipped_near.sum()),
        "samples_with_near_threshold_flips": int((~clean).sum()),
        "eps": eps,
        "max_abs_route_logit_diff": float(np.abs(reference["route_logits"] - other["route_logits"])[valid].max()),
        "tolerance": {"max_logit_diff": tolerance.max_logit_diff,
                      "min_top1_agreement": tolerance.min_top1_agreement,
                      "max_gate_mismatch_outside_eps": tolerance.max_gate_mismatch,
                      "max_accuracy_drop": tolerance.max_accuracy_drop},
    }
    known = labels is not None and (labels != -1).any()
    if known:
        keep = labels != -1
        ref_acc = float((reference["logits"].argmax(1) == labels)[keep].mean())
        acc = float((other["logits"].argmax(1) == labels)[keep].mean())
        report.update(answers_known=int(keep.sum()), accuracy_reference=ref_acc, accuracy=acc,
                      accuracy_drop=ref_acc - acc)
    failures = []
    for who, outs in (("PyTorch", reference), ("the export", other)):
        bad = [k for k in ("logits", "route_logits") if not np.isfinite(outs[k]).all()]
        if bad:
            failures.append(f"{who} produced non-finite {' and '.join(bad)} (NaN or infinity): the "
                            "checkpoint's weights are broken")
    if not np.isfinite(max_diff):
        failures.append("the logits differ by a non-finite amount")
    elif tolerance.max_logit_diff is not None and max_diff > tolerance.max_logit_diff:
        failures.append(f"max |logit diff| {max_diff:.3g} exceeds {tolerance.max_logit_diff:g} "
                        f"(by {max_diff - tolerance.max_logit_diff:.3g})")
    if report["top1_agreement_clean"] < tolerance.min_top1_agreement:
        failures.append(f"top-1 agreement {report['top1_agreement_clean']:.4f} is below "
                        f"{tolerance.min_top1_agreement:g} ({int((~top1[clean]).sum())} answers differ)")
    if known and tolerance.max_accuracy_drop is not None and report["accuracy_drop"] > tolerance.max_accuracy_drop + 1e-12:
        failures.append(f"accuracy {100 * report['accuracy']:.2f}% is {100 * report['accuracy_drop']:.2f} points below "
                        f"PyTorch's {100 * report['accuracy_reference']:.2f}% (at most "
                        f"{100 * tolerance.max_accuracy_drop:g} allowed)")
    if report["gates_differ_outside_eps"] > tolerance.max_gate_mismatch:
        failures.append(f"{report['gates_differ_outside_eps']} gates differ although their route logit "
                        f"is farther than {eps:g} from the threshold")
    report["passed"] = not failures
    report["failures"] = failures
    return finite_json(report)


def finite_json(obj):
    """NaN and infinity -> None (strict JSON has no such numbers), recursively."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj
