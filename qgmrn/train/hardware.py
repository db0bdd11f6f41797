"""Where and how a run computes: training precision (bf16 autocast where it is faster) and
distributed set-up (torchrun)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..cpu import BF16_FLAGS, cpu_info
from .settings import TrainConfig


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices with Intel AMX tiles."""
    return "amx_bf16" in cpu_info()[1]


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic in hardware (AMX-BF16 or AVX512-BF16), where
    oneDNN runs bf16 convolutions faster than float32: 1.6x the samples/s with AMX
    (bench/train_throughput.py), 1.48x with AVX512-BF16 on a 2-core AMD EPYC at equal accuracy
    (issue 19's rows: small-frn on 5,000 renders, 256k samples, 55.4% vs 54.4%). Without it,
    bf16 autocast on a CPU is slower than float32."""
    return bool(BF16_FLAGS & cpu_info()[1])


def training_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of the training step (None: float32). Evaluation always runs in float32,
    like the exported model. "auto": bf16 on CUDA and on CPUs with bf16 hardware."""
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {cfg.precision!r}")
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" or cpu_has_bf16():
        return torch.bfloat16
    return None


# -- distributed -------------------------------------------------------------------------------
def _dist_setup():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


