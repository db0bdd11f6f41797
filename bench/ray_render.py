"""Blender images/s against Ray workers, on a local multi-node cluster (ray.cluster_utils), beside
the one-machine process pool on the same cores; run it alone on the machine.

    python bench/ray_render.py [--images 24] [--size 240 160] [--samples 32] [--nodes 1 2]

Each row renders the same fresh dataset (seed 0) into a temporary folder: the local pool with as
many processes as the row has workers, then a Ray cluster of that many one-CPU nodes (the first is
the head). A row's time includes starting the workers' Blender scenes, not starting the cluster.
Prints a Markdown table (and --json FILE writes it) with the CPU model.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

from qgmrn.data.rendered import generate_rendered  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(**kw) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate_rendered(Path(tmp) / "d", log=lambda m: None, **kw)
        return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--size", type=int, nargs=2, default=(240, 160))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from ray.cluster_utils import Cluster
    kw = dict(images=a.images, val_images=1, questions=1, seed=0, size=tuple(a.size), samples=a.samples)
    n = a.images + 1
    rows = []
    for nodes in a.nodes:
        local = timed(workers=nodes, **kw)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            for _ in range(nodes - 1):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            on_ray = timed(ray_address=cluster.address, **kw)
        finally:
            cluster.shutdown()
        rows.append({"workers": nodes, "local_images_per_s": n / local, "ray_images_per_s": n / on_ray})
    print(f"CPU: {cpu_model()}; {n} images at {a.size[0]}x{a.size[1]}, {a.samples} samples, one Cycles thread each\n")
    print("| workers | local pool images/s | Ray cluster images/s | Ray / local |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['local_images_per_s']:.3f} | {r['ray_images_per_s']:.3f} | "
              f"{r['ray_images_per_s'] / r['local_images_per_s']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"cpu": cpu_model(), "images": n, "size": list(a.size),
                                            "samples": a.samples, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
