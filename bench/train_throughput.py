"""Training-step throughput (forward + backward + Adam step, samples/s) of the paper presets and the
CPU preset, side by side in one run; parameter counts and forward MACs per sample too.

    python bench/train_throughput.py                     # CPU: all presets, batch 16
    python bench/train_throughput.py --presets brn-c32 --batch-size 64 --device cuda   # fp32 vs bf16

On CUDA, and on CPUs with AMX-BF16 (where the trainer's precision "auto" picks it), every preset
is measured in fp32 and in bf16 autocast with channels-last, as the trainer runs them; peak memory
on CUDA.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from qgmrn.model import count_macs, count_parameters, create_model
from qgmrn.train import TrainConfig, cpu_has_bf16, training_loss

DEFAULT_PRESETS = ["small", "brn-c8", "brn-c16", "brn-c32", "frn"]


def _targets(batch: int, device: str) -> torch.Tensor:
    """Scene/program targets shaped as data.supervision.SceneTargets.item gives them: (B, 10, 7)."""
    g = torch.Generator().manual_seed(1)
    t = torch.full((batch, 10, 7), -1.0)
    n = torch.randint(3, 11, (batch,), generator=g)
    for b in range(batch):
        k = int(n[b])
        t[b, :k, :2] = torch.rand(k, 2, generator=g)
        t[b, :k, 2:6] = torch.stack([torch.randint(0, c, (k,), generator=g) for c in (8, 3, 2, 2)], 1).float()
        t[b, :k, 6] = (torch.rand(k, generator=g) < 0.3).float()
    return t.to(device)


def measure(preset: str, batch: int, device: str, amp: bool, steps: int, warmup: int, aux: bool = False,
            compiled: bool = False) -> dict:
    """aux: the scene and where losses (scene_weight 0.5, where_weight 1) as the trainer runs them;
    compiled: torch.compile (inductor) around the training forward."""
    from qgmrn.train.supervision import TrainingForward, build_heads
    torch.manual_seed(0)
    model = create_model(preset, vocab_size=90, num_answers=28).to(device).train()
    cfg = model.cfg
    weights = TrainConfig(scene_weight=0.5 if aux else 0.0, where_weight=1.0 if aux else 0.0)
    heads = build_heads(model.visual.out_channels, weights.scene_weight, weights.where_weight)
    forward = TrainingForward(model, heads).to(device)
    run_forward = torch.compile(forward) if compiled else forward
    targets = _targets(batch, device) if aux else None
    cuda = device.startswith("cuda")
    channels_last = cuda or amp                 # as the trainer: channels-last with CPU bf16
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(forward.parameters(), 3e-4)
    image = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    tokens = torch.randint(2, 90, (batch, 20), device=device)
    lengths = torch.randint(8, 21, (batch,), device=device)
    labels = torch.randint(0, 28, (batch,), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=amp):
            out, extra = run_forward(image, tokens, lengths, targets)
            loss, _ = training_loss(weights, cfg.layer_sizes, out, extra, labels)     # the trainer's loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"preset": preset, "image": cfg.image_size, "params_m": count_parameters(model) / 1e6,
            "gmacs": count_macs(model.float().to(memory_format=torch.contiguous_format)) / 1e9,
            "samples_s": batch * steps / dt, "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--losses", nargs="+", choices=("paper", "both"), default=["paper"],
                    help="both: with the training-only scene and where losses (issue 28)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (inductor)")
    a = ap.parse_args(argv)
    modes = [False, True] if a.device.startswith("cuda") or cpu_has_bf16() else [False]
    print(f"device {a.device} ({torch.cuda.get_device_name() if a.device.startswith('cuda') else f'{torch.get_num_threads()} threads'}), "
          f"batch {a.batch_size}, {a.steps} timed steps after {a.warmup} warm-up, torch {torch.__version__}")
    print(f"{'preset':<10}{'input':>6}{'params M':>10}{'GMACs':>8}{'mode':>7}{'losses':>8}{'compile':>8}"
          f"{'samples/s':>11}{'vs first':>9}{'peak MiB':>10}")
    for preset in a.presets:
        first = None
        for amp in modes:
            for losses in a.losses:
                for compiled in ([False, True] if a.compile else [False]):
                    r = measure(preset, a.batch_size, a.device, amp, a.steps, a.warmup, losses == "both", compiled)
                    first = first or r["samples_s"]
                    peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
                    print(f"{preset:<10}{r['image']:>6}{r['params_m']:>10.2f}{r['gmacs']:>8.3f}"
                          f"{'bf16' if amp else 'fp32':>7}{losses:>8}{'yes' if compiled else 'no':>8}"
                          f"{r['samples_s']:>11.1f}{r['samples_s'] / first:>8.2f}x{peak:>10}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
