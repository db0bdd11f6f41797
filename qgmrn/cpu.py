"""What this CPU is and which instruction-set features it has (torch-free: the trainer's precision
choice and the runtime's precision rows both read it)."""
from __future__ import annotations

import functools
import os
from pathlib import Path

BF16_FLAGS = {"avx512_bf16", "amx_bf16"}          # bf16 arithmetic in hardware
INT8_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}   # int8 dot products in hardware


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str | None, frozenset[str]]:
    """(model name, feature flags) from /proc/cpuinfo; (None, empty) where it is not there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, frozenset()
    lines = text.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return name, frozenset(flags)


def cpu_signature() -> dict:
    """Model name, core count and the features reduced precisions need."""
    name, flags = cpu_info()
    return {"model": name, "cores": os.cpu_count(), "bf16": bool(BF16_FLAGS & flags),
            "vnni": bool(INT8_FLAGS & flags), "amx": "amx_bf16" in flags}
