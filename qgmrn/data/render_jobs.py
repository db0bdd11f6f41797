"""What one rendered image needs wherever it is rendered (a local worker process or a Ray task):
its seeded scene, its paths in the dataset, and the stop flag and progress line of the loop that
hands images out. Shared by qgmrn.data.rendered and qgmrn.data.ray_render."""
from __future__ import annotations

import hashlib
import random
import signal
from pathlib import Path

from . import clevr_world as world


class Interrupted(Exception):
    """Rendering stopped on a signal; everything finished is kept."""

    def __init__(self, signum: int, done: int):
        super().__init__(f"stopped by signal {signum} after {done} new images")
        self.signum, self.done = signum, done


def _rng(seed: int, *parts) -> random.Random:
    digest = hashlib.sha256("/".join(str(p) for p in (seed, *parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the loop reads between images (a render is a few seconds)."""

    def __init__(self):
        self.signum = 0

    def __enter__(self):
        self._old = {s: signal.signal(s, self._set) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _set(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def render_scene(renderer, split: str, index: int, settings: dict, path: Path) -> dict:
    """Sample image `index`'s scene from its own seeded RNG, render it to `path` and return its
    scene record: the same bytes wherever it runs (one Cycles thread, no denoiser)."""
    rng = _rng(settings["seed"], split, index)
    lo, hi = settings["objects"]
    n_objects = rng.randint(lo, hi)
    while True:                                      # CLEVR: a hidden object starts the scene over
        layout = world.sample_layout(rng, n_objects)
        if min(renderer.visible_pixels(layout)) >= renderer.min_pixels():
            break
    width, height = settings["size"]
    record = world.scene_record(layout, index, split, width, height)
    seed = int.from_bytes(hashlib.sha256(f"{settings['seed']}/{split}/{index}".encode()).digest()[:4], "little") >> 1
    renderer.render(layout, path, seed=seed)
    return record


def _record(out: Path, split: str, index: int) -> Path:
    return out / ".render" / split / f"{index:06d}.json"


def _image(out: Path, split: str, index: int) -> Path:
    return out / "images" / split / f"CLEVR_{split}_{index:06d}.png"


def _eta(seconds: float) -> str:
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"
