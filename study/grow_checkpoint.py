"""Grow a trained checkpoint into a larger model of the same family, for warm-start study probes.

    python study/grow_checkpoint.py CKPT OUT --attention [--attn-dim 128 --attn-layers 1]
    python study/grow_checkpoint.py CKPT OUT --set image_size=96 [--set stage_strides=1,2,1,1]
    python study/grow_checkpoint.py CKPT OUT --deepen

--attention  replaces the plain head with a fresh attention head (paper 3.4); the textual, routing
             and visual networks keep their trained weights.
--set        runs the same weights with config fields that do not change their shapes: another
             input size or other stage strides (every layer is convolutional; the head pools over
             whatever map comes out).
--deepen     doubles every stage's depth, function-preserving: after each trained block comes a new
             block whose last norm starts at zero, so it passes its (non-negative, post-ReLU) input
             through unchanged; the router gains a layer of gates for it (small weights, the
             preset's initial execution bias). The grown model answers exactly as the trained one.

OUT is a fresh checkpoint (step 0, no optimizer state); train it with
`python -m qgmrn.train --init-from OUT ...`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qgmrn.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from qgmrn.config import parse_override  # noqa: E402
from qgmrn.model import QGMRN  # noqa: E402

SHAPE_FREE = {"image_size", "stage_strides"}        # config fields that leave every weight's shape alone


def deepen(old: QGMRN) -> QGMRN:
    """Every stage twice as deep; block i of the old model becomes block 2i, block 2i+1 is new
    and starts as the identity."""
    cfg = old.cfg
    if cfg.arch != "brn" or any(d != 1 for d in cfg.stage_depths):
        raise ValueError("--deepen grows BRN models whose stages are one block deep (the CPU presets)")
    new = QGMRN(cfg.replace(stage_depths=tuple(2 for _ in cfg.stage_depths)))
    state = new.state_dict()
    m = cfg.cardinality
    for k, v in old.state_dict().items():
        if k.startswith("visual.blocks."):
            i = int(k.split(".")[2])
            state[k.replace(f"visual.blocks.{i}.", f"visual.blocks.{2 * i}.", 1)] = v
        elif k.startswith("router.fc."):
            t = state[k].clone()
            for layer in range(cfg.num_layers):
                t[2 * layer * m:(2 * layer + 1) * m] = v[layer * m:(layer + 1) * m]
            state[k] = t
        else:
            state[k] = v
    for i in range(1, new.cfg.num_layers, 2):
        state[f"visual.blocks.{i}.norm3.weight"].zero_()
        state[f"visual.blocks.{i}.norm3.bias"].zero_()
    new.load_state_dict(state)
    return new


def with_config(old: QGMRN, keep_head: bool, **changes) -> QGMRN:
    new = QGMRN(old.cfg.replace(**changes))
    state = {k: v for k, v in old.state_dict().items() if keep_head or not k.startswith("head.")}
    if keep_head:
        want = {k: v.shape for k, v in new.state_dict().items()}
        have = {k: v.shape for k, v in state.items()}
        if want != have:
            differ = sorted(set(want) ^ set(have) | {k for k in set(want) & set(have) if want[k] != have[k]})
            raise ValueError(f"{', '.join(f'{k}={v}' for k, v in changes.items())} changes the model's "
                             f"weights ({', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}): "
                             "they cannot carry over")
    new.load_state_dict(state, strict=keep_head)
    return new


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--attention", action="store_true")
    how.add_argument("--set", action="append", metavar="FIELD=VALUE",
                     help="image_size or stage_strides (weights keep their shapes)")
    how.add_argument("--deepen", action="store_true")
    ap.add_argument("--attn-dim", type=int, default=128)
    ap.add_argument("--attn-layers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    try:
        state = load_checkpoint(a.checkpoint)
        old = model_from_checkpoint(state).eval()
        if a.attention:
            new = with_config(old, keep_head=False, attention=True, attn_dim=a.attn_dim, attn_layers=a.attn_layers)
        elif a.set:
            changes = dict(parse_override(t) for t in a.set)
            if set(changes) - SHAPE_FREE:
                raise ValueError(f"--set may change {sorted(SHAPE_FREE)}, not {sorted(set(changes) - SHAPE_FREE)}")
            new = with_config(old, keep_head=True, **changes)
        else:
            new = deepen(old)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_checkpoint(a.out, model=new, vocab=state["vocab"], answers=state["answers"],
                    max_question_len=state["max_question_len"], train_config=state.get("train_config") or {},
                    step=0, epoch=0)
    n_old, n_new = (sum(p.numel() for p in m.parameters()) for m in (old, new))
    print(f"wrote {a.out}: {n_new / 1e6:.2f} M parameters (was {n_old / 1e6:.2f} M), "
          f"routing {new.cfg.num_layers} x {new.cfg.max_modules}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
