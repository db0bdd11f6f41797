"""Prepared-image cache: every image decoded and resized once to the model's input size into a
uint8 memory-mapped array, so training epochs do not decode PNGs.

    python -m qgmrn.data.prepare --data-root DIR --size 64 [--splits train val] [--cache-dir D]
    python -m qgmrn.data.prepare --jsonl train.jsonl --size 224

Files: CACHE/{name}_{size}.u8 (N x size x size x 3) and CACHE/{name}_{size}.json (the image list
with each file's size and modification time, so a cache built before an image changed is not used).
One cache per source and size, found the same way by train, evaluate and this command: beside the
data (DATA_ROOT/qgmrn-cache, or beside the JSONL file), or under ~/.cache/qgmrn/images/ when that
directory is read-only, or in --cache-dir.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..files import remove_stale
from ..preprocess import load_rgb, resize_uint8
from .sources import DataError, load_clevr, load_jsonl, write_json_atomic

DEFAULT_CACHE = "qgmrn-cache"


MAX_SIZE = 1024             # pixels a side: the presets take 32-224; beyond this a cache is a mistake


def cache_paths(cache_dir: str | os.PathLike, name: str, size: int) -> tuple[Path, Path]:
    base = Path(cache_dir) / f"{name}_{size}"
    return base.with_suffix(".u8"), base.with_suffix(".json")


def _stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _writable(path: Path) -> bool:
    """Writable by this process, and not marked read-only: root may write anywhere, but a data
    folder whose mode has no write bit (a shared, read-only copy) is left as it is."""
    try:
        return os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)
    except OSError:
        return False


def default_cache_dir(data_location: str | os.PathLike) -> Path:
    """DATA/qgmrn-cache (DATA: a CLEVR root, or the directory of a JSONL file) when it can be
    written; otherwise a per-source directory under $QGMRN_CACHE or ~/.cache/qgmrn/images."""
    data = Path(data_location).resolve()
    beside = data / DEFAULT_CACHE
    if beside.is_dir() and _writable(beside) or not beside.exists() and _writable(data):
        return beside
    base = Path(os.environ.get("QGMRN_CACHE", Path.home() / ".cache" / "qgmrn"))
    digest = hashlib.sha256(str(data).encode()).hexdigest()[:12]
    return base / "images" / f"{data.name}-{digest}"


def cache_name(source: str) -> str:
    """Cache name of a split ("train", "val") or a JSONL file (its stem)."""
    return Path(source).stem if source.endswith(".jsonl") else source


def open_cache(cache_dir, name: str, size: int, images, build: bool, log=print) -> "ImageCache | None":
    """The cache for these images, built first when missing or stale and `build` allows."""
    images = sorted(set(images))
    cache = ImageCache.find(cache_dir, name, size)
    if cache is not None and cache.covers(images):
        return cache
    if not build:
        return None
    if cache is None:
        what = "is missing"
    elif not cache.stamps:
        what = "has no record of its images' sizes and times (built by an older qgmrn)"
    else:
        what = "is stale (images changed since it was built)"
    log(f"image cache {Path(cache_dir) / name}_{size} {what}: decoding {len(images)} images once")
    try:
        prepare(images, cache_dir, name, size)
    except OSError as e:
        raise DataError(f"cannot write the image cache in {cache_dir} ({e.strerror or e}); "
                        "give a writable --cache-dir") from e
    return ImageCache(cache_dir, name, size)


def _load_block(args):
    paths, size = args
    return np.stack([resize_uint8(load_rgb(p), size) for p in paths])


def prepare(images: list[str], cache_dir: str | os.PathLike, name: str, size: int,
            workers: int | None = None) -> Path:
    """Decode and resize each distinct image once; write the cache atomically."""
    images = sorted(set(images))
    if not 1 <= size <= MAX_SIZE:
        raise DataError(f"image size {size} is outside 1..{MAX_SIZE} pixels")
    data_path, index_path = cache_paths(cache_dir, name, size)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(data_path.parent, f"{data_path.name}.*.tmp", max_age_s=24 * 3600)   # a killed build's
    need, free = len(images) * size * size * 3, shutil.disk_usage(data_path.parent).free
    if need > free:
        raise DataError(f"the image cache of {len(images)} images at {size}x{size} needs {need / 2**30:.1f} GiB; "
                        f"{data_path.parent} has {free / 2**30:.1f} GiB free")
    # a name of its own: two trainings building the same cache at once each write their own file
    tmp = data_path.with_name(f"{data_path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(images), size, size, 3))
        block = 64
        jobs = [(images[i:i + block], size) for i in range(0, len(images), block)]
        with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
            for k, chunk in enumerate(pool.map(_load_block, jobs)):
                arr[k * block:k * block + len(chunk)] = chunk
        arr.flush()
        del arr
        os.replace(tmp, data_path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(index_path, {"size": size, "count": len(images), "images": images,
                                   "stamps": [_stamp(p) for p in images]})
    return data_path


class ImageCache:
    """Read side: image path -> (size, size, 3) uint8 row of the memory map."""

    def __init__(self, cache_dir: str | os.PathLike, name: str, size: int):
        data_path, index_path = cache_paths(cache_dir, name, size)
        with open(index_path) as f:
            index = json.load(f)
        self.size = size
        self.rows = {p: i for i, p in enumerate(index["images"])}
        self.stamps = {p: st for p, st in zip(index["images"], index.get("stamps", []))}
        self.array = np.load(data_path, mmap_mode="r")
        if self.array.shape != (index["count"], size, size, 3):
            raise DataError(f"image cache {data_path} does not match its index; run qgmrn.data.prepare again")

    @classmethod
    def find(cls, cache_dir: str | os.PathLike, name: str, size: int) -> "ImageCache | None":
        data_path, index_path = cache_paths(cache_dir, name, size)
        return cls(cache_dir, name, size) if data_path.exists() and index_path.exists() else None

    def covers(self, images) -> bool:
        """Every image is cached, and none changed since (size and modification time)."""
        try:
            return all(p in self.stamps and self.stamps[p] == _stamp(p) for p in set(images))
        except OSError:
            return False

    def get(self, path: str) -> np.ndarray:
        return self.array[self.rows[path]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qgmrn.data.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-root", help="CLEVR layout root (generated or the real download)")
    src.add_argument("--jsonl", nargs="+", help="JSON-lines files, one per split")
    ap.add_argument("--size", type=int, required=True, help="the model's input size (config image_size)")
    ap.add_argument("--splits", nargs="+", default=["train", "val"])
    ap.add_argument("--cache-dir", help=f"default: DATA_ROOT/{DEFAULT_CACHE} or beside the JSONL file")
    ap.add_argument("--workers", type=int)
    a = ap.parse_args(argv)
    try:
        if not 1 <= a.size <= MAX_SIZE:
            raise DataError(f"--size must lie in 1..{MAX_SIZE}, got {a.size}")
        if a.data_root:
            todo = [(s, load_clevr(a.data_root, s, require_answers=False),
                     a.cache_dir or default_cache_dir(a.data_root)) for s in a.splits]
        else:
            todo = [(cache_name(p), load_jsonl(p, require_answers=False),
                     a.cache_dir or default_cache_dir(Path(p).parent)) for p in a.jsonl]
        for name, samples, cache_dir in todo:
            t = time.perf_counter()
            try:
                path = prepare([s.image for s in samples], cache_dir, name, a.size, a.workers)
            except OSError as e:
                raise DataError(f"cannot write the image cache in {cache_dir} ({e.strerror or e}); "
                                "give a writable --cache-dir") from e
            print(f"{name}: {len({s.image for s in samples})} images -> {path} ({time.perf_counter() - t:.1f} s)")
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
