"""Where a Blender render's time goes (issue 28, section 4): per image, the scene set-up (sampling a
layout, building it in bpy), the visibility pass (CLEVR's check that no object is hidden; a
rejected layout repeats both), and the main Cycles pass, measured exactly as
`python -m qgmrn.data.generate --renderer blender` renders (one Cycles thread per worker).

    python study/render_profile.py --images 20 --size 128 85 --samples 32 [--out docs/render/profile.json]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

from qgmrn.data import clevr_world as world  # noqa: E402


def profile(n: int, size, samples: int, seed: int = 0, threads: int = 1) -> dict:
    from qgmrn.data.blender import BlenderRenderer
    t = time.perf_counter()
    renderer = BlenderRenderer(size[0], size[1], samples, denoise=False, threads=threads)
    start_s = time.perf_counter() - t
    rows = []
    with tempfile.TemporaryDirectory(prefix="qgmrn-render-profile-") as tmp:
        for i in range(n):
            rng = random.Random(f"{seed}/profile/{i}")
            n_objects = rng.randint(3, 10)
            setup = visibility = 0.0
            tries = 0
            while True:
                tries += 1
                t = time.perf_counter()
                layout = world.sample_layout(rng, n_objects)
                renderer._set_layout(layout)                     # what both passes start with
                setup += time.perf_counter() - t
                t = time.perf_counter()
                shown = renderer.visible_pixels(layout)
                visibility += time.perf_counter() - t
                if min(shown) >= renderer.min_pixels():
                    break
            t = time.perf_counter()
            renderer.render(layout, Path(tmp) / f"{i}.png", seed=i)
            main = time.perf_counter() - t
            rows.append({"objects": n_objects, "tries": tries, "setup_s": setup, "visibility_s": visibility,
                         "main_s": main})
    total = sum(r["setup_s"] + r["visibility_s"] + r["main_s"] for r in rows)
    share = {k: sum(r[k] for r in rows) / total for k in ("setup_s", "visibility_s", "main_s")}
    return {"images": n, "size": list(size), "samples": samples, "threads": threads, "renderer_start_s": start_s,
            "images_per_s": n / total, "share": share,
            "median_s": {k: statistics.median(r[k] for r in rows) for k in ("setup_s", "visibility_s", "main_s")},
            "mean_tries": statistics.mean(r["tries"] for r in rows), "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--size", type=int, nargs=2, default=(128, 85))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="Cycles threads (the generator uses 1 per worker)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    from qgmrn.cpu import cpu_info
    res = {"cpu": cpu_info()[0], **profile(a.images, tuple(a.size), a.samples, threads=a.threads)}
    print(f"CPU: {res['cpu']}")
    print(f"{a.images} images at {a.size[0]}x{a.size[1]}, {a.samples} samples, {a.threads} Cycles thread(s): "
          f"{res['images_per_s']:.2f} images/s on one worker; layouts tried per image {res['mean_tries']:.2f}")
    for k, v in res["share"].items():
        print(f"  {k[:-2]:<11} {100 * v:5.1f}% of the time (median {res['median_s'][k]:.3f} s per image)")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
