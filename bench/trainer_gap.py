"""Why the trainer steps slower than bench/train_throughput.py: the same training step, side by side
in one run, with one thing changed per row.

    python bench/trainer_gap.py runs/builtin-sup/ckpt.pt [--batches 25 --warmup 5]

The checkpoint names the data, preset, losses and precision (its train_config). Rows:
  1. a fresh model on one synthetic batch reused every step (what the bench times),
  2. a fresh model on the run's real batches (its questions' lengths, its images and targets),
  3. the checkpoint's trained weights and optimizer state on the same real batches,
  4. as 3 with torch.set_flush_denormal(True) (denormal floats are slow on x86 CPUs),
  5. as 2 with torch.set_flush_denormal(True).
Each row: `--warmup` untimed steps, then the timed ones: the `--batches` the trainer would take
next (fewer if its epoch ends sooner); samples/s and the ratio to row 1.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from qgmrn.checkpoint import load_checkpoint
from qgmrn.model import QGMRN
from qgmrn.train import batches_from, training_loss
from qgmrn.train.data import resolve_data
from qgmrn.train.resume import restore_config
from qgmrn.train.run import build_or_restore
from qgmrn.train.supervision import TrainingForward, build_heads


def real_batches(state: dict, n: int, path: str):
    """The run restored as --resume restores it, and the next n batches its trainer would take
    (at most the rest of the epoch or curriculum chunk it stopped in)."""
    cfg = restore_config(state.get("train_config") or {}, {}, path)
    data = resolve_data(cfg, True, lambda *a, **k: None)
    run = build_or_restore(data.cfg, data, state, None, None, torch.device("cpu"), 0, 1, lambda *a, **k: None)
    loader, _ = batches_from(run)
    return run, list(itertools.islice(loader, n))


def time_steps(forward: TrainingForward, model: QGMRN, opt, batches, run, warmup: int, flush: bool) -> float:
    torch.set_flush_denormal(flush)
    noise = torch.Generator()
    model.router.noise_generator = noise
    forward.train()

    def step(k, batch):
        image, tokens, lengths, labels, *targets = batch
        noise.manual_seed(k)
        image = image.contiguous(memory_format=torch.channels_last) if run.channels_last else image
        target = targets[0] if targets else None
        with torch.autocast(device_type="cpu", dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            out, aux = forward(image, tokens, lengths, target)
            loss, _ = training_loss(run.cfg, model.cfg.layer_sizes, out, aux, labels)
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
    if not batches:
        print(f"error: {a.checkpoint}: its run has no training batch left to take", file=sys.stderr)
        return 2
    cfg, b = run.cfg, run.cfg.batch_size
    lengths = torch.tensor([int(x[2].max()) for x in batches], dtype=torch.float)
    print(f"{a.checkpoint}: step {state['step']}, preset {cfg.preset}, batch {b}, "
          f"{'bf16 autocast' if run.amp_dtype is not None else 'fp32'}, losses scene {cfg.scene_weight} where {cfg.where_weight} "
          f"({cfg.scene_gates} gates); {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{len(batches)} real batches: longest question per batch {lengths.mean():.1f} tokens on average "
          f"(the synthetic batch: 20)")

    def fresh():                                   # the run's architecture (overrides included), new weights
        torch.manual_seed(0)
        model = QGMRN(run.model.cfg)
        if run.channels_last:
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
    rows = [("fresh model, one synthetic batch (the bench)", fresh, [synthetic] * len(batches), False),
            ("fresh model, the run's batches", fresh, batches, False),
            ("trained weights + optimizer, the run's batches", trained, batches, False),
            ("trained, the run's batches, flush denormals", trained, batches, True),
            ("fresh model, the run's batches, flush denormals", fresh, batches, True)]
    first = None
    print(f"{'row':<52}{'samples/s':>11}{'vs first':>10}")
    for name, make, data, flush in rows:
        forward, model, opt = make()
        sps = time_steps(forward, model, opt, data, run, a.warmup, flush)
        first = first or sps
        print(f"{name:<52}{sps:>11.1f}{sps / first:>9.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
