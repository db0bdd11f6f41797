"""What the visual network encodes about each object: linear probes on its feature maps.

For every object of a CLEVR-style scene file (scenes JSON with `pixel_coords`), take each stage's
feature vector at the object's centre and fit a linear classifier per attribute (shape, colour,
size, material) on training scenes; report its accuracy on held-apart scenes, for the checkpoint
and for a random-init twin (the floor a random network's features give), next to the majority
answer. All gates open: what the network can see, before the question chooses modules.

A high probe accuracy with low query accuracy means the model sees the attribute but does not
select the object the question names (a routing/binding failure); a probe near the majority means
the features do not hold the attribute at all (a representation failure).

    python bench/probe_objects.py CKPT --data-root DIR [--train-scenes 2000] [--val-scenes 1000]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qgmrn.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from qgmrn.model import QGMRN  # noqa: E402
from qgmrn.preprocess import preprocess_image  # noqa: E402

ATTRS = ("shape", "color", "size", "material")
WIDTH, HEIGHT = 480, 320          # pixel_coords are in the render's pixels: CLEVR's and the generator's size


def scenes(root: Path, split: str, n: int) -> list[dict]:
    path = root / "scenes" / f"CLEVR_{split}_scenes.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: the probe needs a CLEVR layout with scene files "
                         "(object positions and attributes)")
    return json.loads(path.read_text())["scenes"][:n]


@torch.no_grad()
def object_features(model: QGMRN, root: Path, split: str, items: list[dict], batch: int = 64):
    """Per stage: (objects, C) features at each object's centre; labels per attribute."""
    size = model.cfg.image_size
    gates = [torch.ones(1, m) for m in model.cfg.layer_sizes]
    feats: list[list[np.ndarray]] = []
    labels = {a: [] for a in ATTRS}
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        x = torch.from_numpy(np.stack([preprocess_image(root / "images" / split / s["image_filename"], size)
                                       for s in chunk]))
        maps = []
        h = model.visual.stem(x)
        for block, g in zip(model.visual.blocks, gates):
            h = block(h, g.expand(len(chunk), -1))
            maps.append(h)
        per_stage = [[] for _ in maps]
        for j, s in enumerate(chunk):
            for o in s["objects"]:
                px, py = o["pixel_coords"][0] / WIDTH, o["pixel_coords"][1] / HEIGHT
                for k, m in enumerate(maps):
                    cy = min(int(py * m.shape[2]), m.shape[2] - 1)
                    cx = min(int(px * m.shape[3]), m.shape[3] - 1)
                    per_stage[k].append(m[j, :, cy, cx].numpy())
                for a in ATTRS:
                    labels[a].append(o[a])
        if not feats:
            feats = [[] for _ in maps]
        for k in range(len(maps)):
            feats[k].extend(per_stage[k])
    return [np.stack(f) for f in feats], labels


def probe(xtr: np.ndarray, ytr: list[str], xva: np.ndarray, yva: list[str], steps: int = 300) -> float:
    """Multinomial logistic regression (standardised features, L2 1e-3, full-batch LBFGS)."""
    classes = sorted(set(ytr))
    index = {c: i for i, c in enumerate(classes)}
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a = torch.from_numpy((xtr - mu) / sd).float()
    b = torch.from_numpy((xva - mu) / sd).float()
    ya = torch.tensor([index[c] for c in ytr])
    yb = torch.tensor([index.get(c, -1) for c in yva])
    lin = torch.nn.Linear(a.shape[1], len(classes))
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(a), ya) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(b).argmax(1) == yb).float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--train-scenes", type=int, default=2000)
    ap.add_argument("--val-scenes", type=int, default=1000)
    ap.add_argument("--image-size", type=int, help="run the checkpoint at this input size instead")
    ap.add_argument("--out", help="write the table as JSON here")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    root = Path(a.data_root)
    state = load_checkpoint(a.checkpoint)
    trained = model_from_checkpoint(state)
    cfg = trained.cfg if not a.image_size else trained.cfg.replace(image_size=a.image_size)
    if a.image_size:
        twin = QGMRN(cfg)
        twin.load_state_dict(trained.state_dict())
        trained = twin
    models = {"trained": trained.eval(), "random init": QGMRN(cfg).eval()}
    tr, va = scenes(root, "train", a.train_scenes), scenes(root, "val", a.val_scenes)
    result = {"checkpoint": str(a.checkpoint), "image_size": cfg.image_size, "majority": {}, "probes": {}}
    t0 = time.time()
    for name, model in models.items():
        ftr, ltr = object_features(model, root, "train", tr)
        fva, lva = object_features(model, root, "val", va)
        result["probes"][name] = {}
        for k in range(len(ftr)):
            row = {att: probe(ftr[k], ltr[att], fva[k], lva[att]) for att in ATTRS}
            result["probes"][name][f"block {k + 1} ({ftr[k].shape[1]} ch)"] = row
        for att in ATTRS:
            vals, counts = np.unique(lva[att], return_counts=True)
            result["majority"][att] = float(counts.max() / counts.sum())
    result["objects"] = {"train": int(len(ltr["shape"])), "val": int(len(lva["shape"]))}
    print(f"linear probes at object centres, {result['objects']['train']} train / "
          f"{result['objects']['val']} val objects, input {cfg.image_size} px, all gates open "
          f"({time.time() - t0:.0f} s)")
    print(f"{'model':<12} {'features':<20} " + " ".join(f"{att:>9}" for att in ATTRS))
    print(f"{'majority':<12} {'':<20} " + " ".join(f"{100 * result['majority'][att]:9.1f}" for att in ATTRS))
    for name, rows in result["probes"].items():
        for feat, row in rows.items():
            print(f"{name:<12} {feat:<20} " + " ".join(f"{100 * row[att]:9.1f}" for att in ATTRS))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
