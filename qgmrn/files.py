"""Small file helpers shared by training, data preparation and export (no torch here)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path


def remove_stale(parent: Path, pattern: str, max_age_s: float) -> None:
    """Leftovers of a write that was killed (a `ckpt.pt.*.tmp`, an export's `.partial` staging
    directory): matches of `pattern` in `parent` older than `max_age_s`, so that a live write of
    another process, always younger, is never touched."""
    if not parent.is_dir():
        return
    now = time.time()
    for p in parent.glob(pattern):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        except OSError:
            pass
