"""What the routing learned: the paper's analyses of section 4.6 as one command.

    python -m qgmrn.analyze CKPT [--data-root DIR | --jsonl FILE] --out DIR [--per-subtype 500]
                            [--image IMG --question Q [--question Q ...]]

Writes to --out:
- routing_stage{k}.png: t-SNE of the routing path (Figure 2). The path is split into the visual
  network's stages (by downsampling); each stage's gates, flattened, are one vector per question;
  up to --per-subtype questions of each subtype, coloured by subtype.
- routing.json: per stage, how well the subtypes separate in gate space: silhouette score (Hamming
  distance) and 5-nearest-neighbour subtype accuracy (5-fold cross-validated), for the checkpoint
  and for a random-init model of the same configuration (the baseline those numbers are read
  against), plus the distinct routing paths per stage.
- saliency.png: |d max score / d pixel| (max over colour channels) of one image under several
  questions, beside the image (Figure 4): --image and --question, or the first val image and its
  questions.
- execution_ratio.png: module execution ratio per layer (Figure 3), as `evaluate --plots`.
Needs matplotlib and scikit-learn: pip install -e '.[analysis]'.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .data.sources import DataError, load_clevr, load_jsonl
from .evaluate import build_eval_dataset, evaluate_model, write_plots
from .model import QGMRN
from .preprocess import Vocab, encode_batch, preprocess_image


def _require():
    missing = []
    for mod, pkg in (("matplotlib", "matplotlib"), ("sklearn", "scikit-learn")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise RuntimeError(f"qgmrn.analyze needs {' and '.join(missing)}: pip install -e '.[analysis]'")


def stage_slices(cfg) -> list[slice]:
    """Modular layers of each stage of the visual network (stages end where it downsamples)."""
    out, start = [], 0
    for depth in cfg.stage_depths:
        out.append(slice(start, start + depth))
        start += depth
    return out


@torch.no_grad()
def routing_paths(model: QGMRN, vocab: Vocab, questions: list[str], batch: int = 256) -> np.ndarray:
    """(N, L, M_max) test-time gates; routing depends on the question alone."""
    model.eval()
    out = []
    for i in range(0, len(questions), batch):
        tokens, lengths, _ = encode_batch(vocab, questions[i:i + batch])
        q = model.encode_question(torch.from_numpy(tokens), torch.from_numpy(lengths))
        gates, _ = model.route(q)
        out.append(model.router.to_layers(gates, 0.0).numpy())
    return np.concatenate(out)


def pick_per_subtype(samples, n: int, seed: int = 0) -> list:
    by = defaultdict(list)
    for s in samples:
        if s.subtype:
            by[s.subtype].append(s)
    rng = np.random.default_rng(seed)
    picked = []
    for sub in sorted(by):
        group = by[sub]
        idx = rng.choice(len(group), min(n, len(group)), replace=False)
        picked += [group[i] for i in sorted(idx)]
    return picked


def separation(vectors: np.ndarray, labels: list[str]) -> dict:
    """Silhouette (Hamming) and 5-NN cross-validated accuracy of subtype labels in gate space."""
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    distinct = len({v.tobytes() for v in vectors})
    result = {"samples": int(len(y)), "subtypes": int(len(classes)), "distinct_paths": distinct,
              "chance_knn": float(counts.max() / counts.sum())}
    if distinct < 2 or len(classes) < 2:
        result.update(silhouette=0.0, knn_accuracy=result["chance_knn"],
                      note="every question takes the same path: nothing separates")
        return result
    result["silhouette"] = float(silhouette_score(vectors, y, metric="hamming"))
    folds = int(min(5, counts.min())) if counts.min() >= 2 else 2
    knn = KNeighborsClassifier(n_neighbors=min(5, len(y) - 1), metric="hamming")
    result["knn_accuracy"] = float(cross_val_score(knn, vectors, y, cv=folds).mean())
    return result


def routing_analysis(model: QGMRN, vocab: Vocab, samples, out: Path, title: str, plot: bool = True) -> dict:
    gates = routing_paths(model, vocab, [s.question for s in samples])
    labels = [s.subtype for s in samples]
    stages = {}
    for k, sl in enumerate(stage_slices(model.cfg), 1):
        sizes = model.cfg.layer_sizes[sl]
        vec = np.concatenate([gates[:, l, :m] for l, m in zip(range(sl.start, sl.stop), sizes)], axis=1)
        stages[f"stage{k}"] = separation(vec.astype(np.float32), labels)
        if plot:
            _tsne_plot(vec, labels, out / f"routing_stage{k}.png", f"{title}: stage {k} ({vec.shape[1]} gates)")
    return stages


def _tsne_plot(vec: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    rng = np.random.default_rng(0)
    jitter = vec + rng.normal(0, 1e-3, vec.shape)      # identical paths would sit on one point
    emb = TSNE(2, perplexity=min(30, max(2, len(vec) // 4)), init="pca", random_state=0,
               ).fit_transform(jitter)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    cmap = plt.get_cmap("tab20")
    for i, sub in enumerate(sorted(set(labels))):
        m = np.asarray(labels) == sub
        ax.scatter(emb[m, 0], emb[m, 1], s=6, color=cmap(i % 20), label=sub)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def saliency(model: QGMRN, vocab: Vocab, answers: list[str], image, questions: list[str]) -> list[dict]:
    """|d max score / d pixel| per question (max over channels), with the predicted answer."""
    model.eval()
    x = torch.from_numpy(preprocess_image(image, model.cfg.image_size))[None]
    maps = []
    for q in questions:
        tokens, lengths, _ = encode_batch(vocab, [q])
        xi = x.clone().requires_grad_(True)
        logits = model(xi, torch.from_numpy(tokens), torch.from_numpy(lengths)).logits
        top = int(logits.argmax())
        logits[0, top].backward()
        maps.append({"question": q, "answer": answers[top],
                     "saliency": xi.grad[0].abs().amax(0).numpy()})
    return maps


def saliency_plot(image, maps: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .preprocess import load_rgb
    rgb = np.asarray(load_rgb(image))
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3.2 * (len(maps) + 1), 3.0))
    axes[0].imshow(rgb)
    axes[0].set_title("image", fontsize=8)
    for ax, m in zip(axes[1:], maps):
        ax.imshow(m["saliency"], cmap="hot")
        ax.set_title(f"{m['question']}\n-> {m['answer']}", fontsize=7)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
    ap = argparse.ArgumentParser(prog="python -m qgmrn.analyze", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--data-root", help="CLEVR layout (default: the data the checkpoint trained on)")
    ap.add_argument("--jsonl", help="JSON-lines questions (need a 'subtype' field for the t-SNE)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-subtype", type=int, default=500, help="questions per subtype (paper: 500)")
    ap.add_argument("--image", help="image for the saliency figure")
    ap.add_argument("--question", action="append", default=[], help="question for the saliency figure (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.per_subtype < 2:
        ap.error("--per-subtype must be at least 2")
    try:
        _require()
        state = load_checkpoint(a.checkpoint)
        model = model_from_checkpoint(state).eval()
        vocab, answers = Vocab(list(state["vocab"])), list(state["answers"])
        data_root = a.data_root or (None if a.jsonl else state["train_config"].get("data_root"))
        if not data_root and not a.jsonl:
            raise DataError("give --data-root or --jsonl: the checkpoint does not name its data")
        samples = load_jsonl(a.jsonl) if a.jsonl else load_clevr(data_root, "val")
        picked = pick_per_subtype(samples, a.per_subtype, a.seed)
        if len({s.subtype for s in picked}) < 2:
            raise DataError("the routing t-SNE needs questions of at least two subtypes (CLEVR programs or "
                            "a 'subtype' field)")
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
    except (CheckpointError, DataError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"checkpoint": str(a.checkpoint), "questions": len(picked), "per_subtype": a.per_subtype,
              "trained": routing_analysis(model, vocab, picked, out, "trained")}
    torch.manual_seed(a.seed)
    baseline = QGMRN(model.cfg)
    report["random_init"] = routing_analysis(baseline, vocab, picked, out, "random init", plot=False)
    print(f"{'stage':<8}{'silhouette':>12}{'(random)':>10}{'5-NN acc':>10}{'(random)':>10}{'paths':>7}")
    for k in report["trained"]:
        t, r = report["trained"][k], report["random_init"][k]
        print(f"{k:<8}{t['silhouette']:>12.3f}{r['silhouette']:>10.3f}{t['knn_accuracy']:>10.3f}"
              f"{r['knn_accuracy']:>10.3f}{t['distinct_paths']:>7}")
    try:
        if a.image:
            image, questions = a.image, a.question or ["What color is the large object?", "How many things are there?"]
        else:
            image = samples[0].image
            questions = a.question or [s.question for s in samples if s.image == image][:4]
        maps = saliency(model, vocab, answers, image, questions)
        saliency_plot(image, maps, out / "saliency.png")
        report["saliency"] = {"image": str(image), "questions": [{k: m[k] for k in ("question", "answer")} for m in maps]}
    except (ValueError, OSError) as e:
        print(f"error: saliency: {e}", file=sys.stderr)
        return 2
    dataset = build_eval_dataset(state, data_root, a.jsonl, "val", max_samples=2000)
    write_plots(evaluate_model(model, dataset, 256), out)
    (out / "routing.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out}/routing_stage*.png, saliency.png, execution_ratio.png, routing.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
