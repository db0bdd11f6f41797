"""Evaluate a checkpoint: accuracy overall, per the paper's five question types (Table 1) and per
the 13 subtypes, and the routing statistics of section 4.6.

    python -m qgmrn.evaluate ckpt.pt [--data-root DIR | --jsonl FILE] [--split val] [--json out.json]
                             [--plots DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import ModelConfig
from .data.datasets import VQADataset, collate
from .data.prepare import cache_name, default_cache_dir, open_cache
from .data.programs import QUESTION_TYPES, SUBTYPES
from .data.sources import DataError, Sample, load_clevr, load_jsonl
from .preprocess import Vocab, tokenize
from .routing import format_routing_use, routing_use

TYPE_TITLES = {"count": "Count", "exist": "Exist", "compare_numbers": "Compare Numbers",
               "query_attribute": "Query Attribute", "compare_attribute": "Compare Attribute"}


@torch.no_grad()
def evaluate_model(model, dataset: VQADataset, batch_size: int = 128, device="cpu", amp_dtype=None,
                   ) -> dict:
    """Eval-mode (deterministic routing) accuracy and routing statistics over a dataset."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    preds, gates = [], []
    for image, tokens, lengths, _ in loader:
        with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(image.to(device), tokens.to(device), lengths.to(device))
        preds.append(out.logits.argmax(1).cpu())
        gates.append(out.gates.cpu() > 0.5)                             # (B, L, M_max)
    model.train(was_training)
    preds = torch.cat(preds)
    g = torch.cat(gates).numpy()                                       # (N, L, M_max); padded slots 0
    ratio = g.sum(2).astype(np.float32) / np.asarray(model.cfg.layer_sizes, dtype=np.float32)   # (N, L)
    correct = (preds == dataset.labels).numpy()
    result = summarize(correct, dataset.samples, ratio)
    result["routing"]["use"] = routing_use(g, model.cfg.layer_sizes, [s.image for s in dataset.samples],
                                           [s.qtype for s in dataset.samples])
    return result


def summarize(correct: np.ndarray, samples: list[Sample], ratio: np.ndarray | None = None) -> dict:
    hits, totals = defaultdict(int), defaultdict(int)
    for ok, s in zip(correct, samples):
        for key in (("type", s.qtype), ("subtype", s.subtype)):
            if key[1] is not None:
                hits[key] += int(ok)
                totals[key] += 1
    # CLEVR's types in the paper's order, then any others a JSONL file names, sorted
    types = [*QUESTION_TYPES, *sorted({t for k, t in totals if k == "type"} - set(QUESTION_TYPES))]
    subtypes = [*SUBTYPES, *sorted({t for k, t in totals if k == "subtype"} - set(SUBTYPES))]
    result = {
        "n": int(len(correct)), "overall": float(correct.mean()) if len(correct) else 0.0,
        "per_type": {t: hits["type", t] / totals["type", t] for t in types if totals["type", t]},
        "per_subtype": {t: hits["subtype", t] / totals["subtype", t] for t in subtypes if totals["subtype", t]},
        "counts": {t: totals["type", t] for t in types if totals["type", t]},
    }
    if ratio is not None:
        q = np.percentile(ratio, [25, 50, 75], axis=0)
        result["routing"] = {
            "overall_execution_ratio": float(ratio.mean()),
            "per_layer": [{"layer": l + 1, "mean": float(ratio[:, l].mean()), "q1": float(q[0, l]),
                           "median": float(q[1, l]), "q3": float(q[2, l])} for l in range(ratio.shape[1])],
        }
        result["_execution_ratio"] = ratio                           # kept for plots, not written
    return result


def format_table(result: dict) -> str:
    lines = [f"accuracy on {result['n']} questions", f"  {'Overall':<20}{100 * result['overall']:6.1f}"]
    for t, acc in result["per_type"].items():
        lines.append(f"  {TYPE_TITLES.get(t, t):<20}{100 * acc:6.1f}   ({result['counts'][t]})")
    if result["per_subtype"]:
        lines.append("per subtype")
        lines += [f"  {t:<20}{100 * a:6.1f}" for t, a in result["per_subtype"].items()]
    if "routing" in result:
        r = result["routing"]
        lines.append(f"execution ratio: overall {r['overall_execution_ratio']:.3f}; per layer (mean [q1, median, q3])")
        lines += [f"  layer {p['layer']:>2}  {p['mean']:.3f} [{p['q1']:.3f}, {p['median']:.3f}, {p['q3']:.3f}]"
                  for p in r["per_layer"]]
        if "use" in r:
            lines.append(format_routing_use(r["use"]))
            per_type = r["use"].get("per_type_executed") or {}
            if per_type:
                lines.append("  filters executed per type: " + " ".join(
                    f"{t}={100 * v:.1f}%" for t, v in per_type.items()))
    return "\n".join(lines)


def public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def write_plots(result: dict, out_dir: str | Path, metrics_file: str | Path | None = None) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plots needs matplotlib: pip install -e '.[plots]'") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    ratio = result.get("_execution_ratio")
    if ratio is not None:
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * ratio.shape[1] + 2), 3.5))
        ax.boxplot([ratio[:, l] for l in range(ratio.shape[1])], showfliers=False)
        ax.set_xlabel("modular layer")
        ax.set_ylabel("module execution ratio")
        ax.set_title("Execution ratio per layer (paper Figure 3)")
        fig.tight_layout()
        fig.savefig(out / "execution_ratio.png", dpi=120)
        plt.close(fig)
        written.append(out / "execution_ratio.png")
    if metrics_file and Path(metrics_file).exists():
        train, val = [], []
        for line in Path(metrics_file).read_text().splitlines():
            rec = json.loads(line)
            (val if rec.get("split") == "val" else train).append(rec)
        if train:
            fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
            ax[0].plot([r["step"] for r in train], [r["loss"] for r in train])
            ax[0].set_xlabel("step"), ax[0].set_ylabel("training loss")
            ax[1].plot([r["step"] for r in train], [r["acc"] for r in train], label="train")
            if val:
                ax[1].plot([r["step"] for r in val], [r["overall"] for r in val], "o-", label="val")
            ax[1].set_xlabel("step"), ax[1].set_ylabel("accuracy"), ax[1].legend()
            fig.tight_layout()
            fig.savefig(out / "training_curves.png", dpi=120)
            plt.close(fig)
            written.append(out / "training_curves.png")
    return written


def within_limit(samples, limit: int) -> tuple[list, int]:
    """The questions a model with this token limit takes, and how many it does not: the runtime
    refuses longer ones (never truncates), so evaluation skips and counts them, in training too."""
    kept = [s for s in samples if len(tokenize(s.question)) <= limit]
    return kept, len(samples) - len(kept)


def build_eval_dataset(state: dict, data_root, jsonl, split: str, cache_dir=None, max_samples: int = 0) -> VQADataset:
    """The questions the model can take (longer ones are counted in `skipped`), the first
    `max_samples` of them when that is > 0."""
    cfg = ModelConfig.from_dict(state["model_config"])
    if jsonl:
        samples, where, name = load_jsonl(jsonl), Path(jsonl).parent, cache_name(str(jsonl))
    else:
        samples, where, name = load_clevr(data_root, split), Path(data_root), split
    vocab = Vocab(list(state["vocab"]))
    kept, skipped = within_limit(samples, int(state["max_question_len"]))
    kept = kept[:max_samples] if max_samples > 0 else kept
    cache = open_cache(cache_dir or default_cache_dir(where), name, cfg.image_size, [s.image for s in kept],
                       build=False)
    dataset = VQADataset(kept, vocab, list(state["answers"]), cfg.image_size, cache)
    dataset.skipped = skipped
    return dataset


def main(argv=None) -> int:
    from .checkpoint import CheckpointError, check_fits, load_checkpoint, model_from_checkpoint

    ap = argparse.ArgumentParser(prog="python -m qgmrn.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--data-root", help="CLEVR layout root (default: the one the checkpoint was trained on)")
    ap.add_argument("--jsonl", help="JSON-lines file to evaluate on")
    ap.add_argument("--split", default="val")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--plots", help="write PNG figures here (needs matplotlib)")
    ap.add_argument("--cache-dir", help="image cache directory (default: as training finds it)")
    a = ap.parse_args(argv)
    if a.batch_size < 1:
        ap.error(f"--batch-size must be at least 1, got {a.batch_size}")
    try:
        _check_writable(a.json, a.plots)
        if a.plots:
            import importlib.util
            if importlib.util.find_spec("matplotlib") is None:
                raise DataError("--plots needs matplotlib: pip install -e '.[plots]'")
        state = load_checkpoint(a.checkpoint)
        model = model_from_checkpoint(state)
        check_fits(state, model, a.checkpoint)
        data_root = a.data_root or (None if a.jsonl else state["train_config"].get("data_root"))
        if not data_root and not a.jsonl:
            raise DataError("give --data-root or --jsonl: the checkpoint does not name its data")
        dataset = build_eval_dataset(state, data_root, a.jsonl, a.split, a.cache_dir)
    except (CheckpointError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dataset.skipped:
        print(f"warning: {dataset.skipped} question(s) longer than the model's limit of "
              f"{state['max_question_len']} tokens are not evaluated (the runtime refuses them too)",
              file=sys.stderr)
    if not len(dataset):
        print("error: no question to evaluate", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = evaluate_model(model.to(device), dataset, a.batch_size, device)
    print(format_table(result))
    try:
        if a.json:
            Path(a.json).write_text(json.dumps(public(result), indent=2))
        if a.plots:
            metrics = Path(a.checkpoint).parent / "metrics.jsonl"
            for p in write_plots(result, a.plots, metrics):
                print(f"wrote {p}")
    except OSError as e:
        print(f"error: cannot write the results ({e}); the table above is complete", file=sys.stderr)
        return 1
    return 0


def _check_writable(json_path, plots_dir) -> None:
    """Fail before the work, not after it, when the results cannot be written."""
    if json_path:
        parent = Path(json_path).resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK) or Path(json_path).is_dir():
            raise DataError(f"--json {json_path}: cannot write there")
    if plots_dir:
        p = Path(plots_dir).resolve()
        probe = p if p.exists() else p.parent
        while not probe.exists():
            probe = probe.parent
        if (p.exists() and not p.is_dir()) or not os.access(probe, os.W_OK):
            raise DataError(f"--plots {plots_dir}: cannot write there")


if __name__ == "__main__":
    sys.exit(main())
