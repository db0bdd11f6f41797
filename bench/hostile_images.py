"""Work that hostile images cost, before and after the structure check (trust round 5, S1/S2):
the issue's files at their sizes, opened by Pillow alone (what decoding did before) and by
qgmrn.preprocess.load_rgb (which walks the container first and refuses them), side by side.

    python bench/hostile_images.py [--scans 600]
"""
from __future__ import annotations

import argparse
import io
import struct
import sys
import time
import zlib
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qgmrn.preprocess import ImageError, load_rgb  # noqa: E402


def _jpeg(size, progressive=False) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 120, 120)).save(buf, "JPEG", progressive=progressive, quality=90)
    return buf.getvalue()


def files(scans: int) -> dict[str, bytes]:
    small = _jpeg((8, 8))
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    p = png.getvalue()
    end = p.rindex(b"IEND") - 4
    chunk = struct.pack(">I", 0) + b"teXt" + struct.pack(">I", zlib.crc32(b"teXt"))
    prog = _jpeg((4000, 3000), progressive=True)
    last = prog.rindex(b"\xff\xda")
    return {"JPEG, 4.75 M empty comment segments (19 MB)": small[:2] + b"\xff\xfe\x00\x02" * 4_750_000 + small[2:],
            "PNG, 1.58 M empty metadata chunks (19 MB)": p[:end] + chunk * 1_580_000 + p[end:],
            f"progressive JPEG 4000x3000, last scan x{scans}": prog[:last] + prog[last:-2] * scans + prog[-2:]}


def pillow(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as im:
        im.load()


def refused(data: bytes) -> None:
    try:
        load_rgb(data)
    except ImageError:
        return
    raise SystemExit("not refused")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=600)
    a = ap.parse_args(argv)
    print("| file | bytes | Pillow opens and decodes (s) | load_rgb refuses (s) |\n|---|---|---|---|")
    for name, data in files(a.scans).items():
        times = []
        for fn in (pillow, refused):
            t = time.perf_counter()
            try:
                fn(data)
            except Exception:
                pass
            times.append(time.perf_counter() - t)
        print(f"| {name} | {len(data):,} | {times[0]:.2f} | {times[1]:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
