"""Why the trainer steps slower than bench/train_throughput.py: the same training step, side by side
in one run, with one thing changed per row.

    python bench/trainer_gap.py runs/builtin-sup/ckpt.pt [--batches 25 --warmup 5]

The checkpoint names the data, preset, losses and precision (its train_config). Rows:
  1. a fresh model on one synthetic batch reused every step (what the bench times),
  2. a fresh model on the run's real batches (its questions' lengths, its images and targets),
  3. the checkpoint's trained weights and optimizer state on the same real batches,
  4. as 3 with torch.set_flush_denormal(True) (denormal floats are slow on x86 CPUs),
  5. as 2 with torch.set_flush_denormal(True).
Each row: `--warmup` untimed steps, then `--batches` timed ones; samples/s and the ratio to row 1.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from qgmrn.checkpoint import load_checkpoint
from qgmrn.config import get_config
from qgmrn.data.datasets import collate
from qgmrn.model import QGMRN
from qgmrn.routing import load_balancing_loss
from qgmrn.train.data import resolve_data
from qgmrn.train.resume import restore_config
from qgmrn.train.run import build_or_restore
from qgmrn.train.supervision import TrainingForward, build_heads


def real_batches(state: dict, n: int, path: str):
    """n + a few batches of the run's own training data, in its own order, as the trainer sees them."""
    cfg = restore_config(state.get("train_config") or {}, {}, path)
    data = resolve_data(cfg, True, lambda *a, **k: None)
    run = build_or_restore(data.cfg, data, state, None, None, torch.device("cpu"), 0, 1, lambda *a, **k: None)
    idx = list(range(run.step * cfg.batch_size, (run.step + n) * cfg.batch_size))
    idx = [i % len(run.train_ds) for i in idx]
    batches = [collate([run.train_ds[i] for i in idx[k:k + cfg.batch_size]])
               for k in range(0, len(idx), cfg.batch_size)]
    return run, batches


def time_steps(forward: TrainingForward, model: QGMRN, opt, batches, cfg, amp, warmup: int, flush: bool) -> float:
    torch.set_flush_denormal(flush)
    noise = torch.Generator()
    model.router.noise_generator = noise
    forward.train()

    def step(k, batch):
        image, tokens, lengths, labels, *targets = batch
        noise.manual_seed(k)
        image = image.contiguous(memory_format=torch.channels_last) if amp else image
        target = targets[0] if targets else None
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=amp):
            out, aux = forward(image, tokens, lengths, target)
            loss = (F.cross_entropy(out.logits.float(), labels)
                    + cfg.load_weight * load_balancing_loss(out.gates.float(), model.cfg.layer_sizes)
                    + cfg.scene_weight * aux.scene + cfg.where_weight * aux.where)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for k in range(warmup):
        step(k, batches[k % len(batches)])
    t0 = time.perf_counter()
    for k, batch in enumerate(batches):
        step(k, batch)
    dt = time.perf_counter() - t0
    torch.set_flush_denormal(False)
    model.router.noise_generator = None
    return sum(b[0].shape[0] for b in batches) / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--batches", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args(argv)
    state = load_checkpoint(a.checkpoint)
    run, batches = real_batches(state, a.batches, a.checkpoint)
    cfg, amp = run.cfg, run.amp_dtype is not None
    b = cfg.batch_size
    lengths = torch.tensor([int(x[2].max()) for x in batches], dtype=torch.float)
    print(f"{a.checkpoint}: step {state['step']}, preset {cfg.preset}, batch {b}, "
          f"{'bf16 autocast' if amp else 'fp32'}, losses scene {cfg.scene_weight} where {cfg.where_weight} "
          f"({cfg.scene_gates} gates); {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"real batches: longest question per batch {lengths.mean():.1f} tokens on average "
          f"(the synthetic batch: 20)")

    def fresh():
        torch.manual_seed(0)
        model = QGMRN(get_config(cfg.preset, vocab_size=run.model.cfg.vocab_size,
                                 num_answers=run.model.cfg.num_answers))
        if amp:
            model = model.to(memory_format=torch.channels_last)
        heads = build_heads(model.visual.out_channels, cfg.scene_weight, cfg.where_weight)
        forward = TrainingForward(model, heads, cfg.scene_gates)
        return forward, model, torch.optim.Adam(forward.parameters(), lr=cfg.lr)

    def trained():
        forward = copy.deepcopy(run.ddp)
        opt = torch.optim.Adam(forward.parameters(), lr=cfg.lr)
        opt.load_state_dict(state["optimizer"])
        return forward, forward.model, opt

    g = torch.Generator().manual_seed(1)
    img = batches[0][0]
    synthetic = (torch.randn(img.shape, generator=g), torch.randint(2, run.model.cfg.vocab_size, (b, 20), generator=g),
                 torch.randint(8, 21, (b,), generator=g), batches[0][3], *batches[0][4:])
    rows = [("fresh model, one synthetic batch (the bench)", fresh, [synthetic] * a.batches, False),
            ("fresh model, the run's batches", fresh, batches, False),
            ("trained weights + optimizer, the run's batches", trained, batches, False),
            ("trained, the run's batches, flush denormals", trained, batches, True),
            ("fresh model, the run's batches, flush denormals", fresh, batches, True)]
    first = None
    print(f"{'row':<52}{'samples/s':>11}{'vs first':>10}")
    for name, make, data, flush in rows:
        forward, model, opt = make()
        sps = time_steps(forward, model, opt, data, cfg, amp, a.warmup, flush)
        first = first or sps
        print(f"{name:<52}{sps:>11.1f}{sps / first:>9.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
