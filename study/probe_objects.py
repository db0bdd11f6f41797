"""What the visual network encodes about each object: linear probes on its feature maps.

For every object of a CLEVR-style scene file (scenes JSON with `pixel_coords`), take each stage's
feature vector at the object's centre and fit a linear classifier per attribute (shape, colour,
size, material) on training scenes; report its accuracy on held-apart scenes, for the checkpoint
and for a random-init twin (the floor a random network's features give), next to the majority
answer. All gates open: what the network can see, before the question chooses modules.

A high probe accuracy with low query accuracy means the model sees the attribute but does not
select the object the question names (a routing/binding failure); a probe near the majority means
the features do not hold the attribute at all (a representation failure).

    python study/probe_objects.py CKPT --data-root DIR [--train-scenes 2000] [--val-scenes 1000]
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

from qgmrn.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint  # noqa: E402
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


def load_objects(root: Path, split: str, items: list[dict], size: int):
    """The scenes' images, decoded once for every model probed, and each object's (image index,
    x, y) centre as a fraction of the image, with its attributes."""
    images = torch.from_numpy(np.stack([preprocess_image(root / "images" / split / s["image_filename"], size)
                                        for s in items]))
    where = [(i, o["pixel_coords"][0] / WIDTH, o["pixel_coords"][1] / HEIGHT)
             for i, s in enumerate(items) for o in s["objects"]]
    labels = {a: [o[a] for s in items for o in s["objects"]] for a in ATTRS}
    return images, where, labels


@torch.no_grad()
def block_features(model: QGMRN, images: torch.Tensor, where: list, batch: int = 64) -> list[np.ndarray]:
    """Per block: (objects, C) features at each object's centre, all gates open. The blocks' maps
    are read by forward hooks on the visual network's own forward pass."""
    maps: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: maps.append(out)) for b in model.visual.blocks]
    feats: list[list[np.ndarray]] = [[] for _ in model.visual.blocks]
    pos = 0                                                       # `where` is in image order
    try:
        for start in range(0, len(images), batch):
            x = images[start:start + batch]
            maps.clear()
            model.visual(x, [torch.ones(len(x), m) for m in model.cfg.layer_sizes])
            while pos < len(where) and where[pos][0] < start + len(x):
                i, px, py = where[pos]
                pos += 1
                for k, m in enumerate(maps):
                    cy, cx = min(int(py * m.shape[2]), m.shape[2] - 1), min(int(px * m.shape[3]), m.shape[3] - 1)
                    feats[k].append(m[i - start, :, cy, cx].numpy())
    finally:
        for h in hooks:
            h.remove()
    return [np.stack(f) for f in feats]


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
    try:
        trained = model_from_checkpoint(load_checkpoint(a.checkpoint))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # every layer is convolutional and the maps' sizes follow the input's: another input size needs
    # only other images, not another model
    size = a.image_size or trained.cfg.image_size
    models = {"trained": trained.eval(), "random init": QGMRN(trained.cfg).eval()}
    t0 = time.time()
    images_tr, where_tr, ltr = load_objects(root, "train", scenes(root, "train", a.train_scenes), size)
    images_va, where_va, lva = load_objects(root, "val", scenes(root, "val", a.val_scenes), size)
    result = {"checkpoint": str(a.checkpoint), "image_size": size, "majority": {}, "probes": {}}
    for att in ATTRS:
        _, counts = np.unique(lva[att], return_counts=True)
        result["majority"][att] = float(counts.max() / counts.sum())
    for name, model in models.items():
        ftr, fva = block_features(model, images_tr, where_tr), block_features(model, images_va, where_va)
        result["probes"][name] = {f"block {k + 1} ({ftr[k].shape[1]} ch)":
                                  {att: probe(ftr[k], ltr[att], fva[k], lva[att]) for att in ATTRS}
                                  for k in range(len(ftr))}
    result["objects"] = {"train": int(len(ltr["shape"])), "val": int(len(lva["shape"]))}
    print(f"linear probes at object centres, {result['objects']['train']} train / "
          f"{result['objects']['val']} val objects, input {size} px, all gates open "
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
