"""Blender rendering spread over a Ray cluster's CPUs (`python -m qgmrn.data.generate --renderer
blender --ray [ADDRESS]`).

One Ray task renders one image: it samples the image's scene from the image's own seeded RNG,
renders it with one Cycles thread into the worker's temporary folder, and returns the PNG's bytes
and the scene record. This process writes both into --out as the local path does (PNG renamed into
place, then the record), so the dataset is the one a single machine makes with the same seed
(records byte for byte; pixels but for Cycles' rare one-level wobble), the nodes need no shared disk, and the resumability is the local path's: a rerun skips
every finished image. A task whose worker or node dies is run again by Ray (max_retries); Ctrl-C or
SIGTERM stops handing out images, keeps those that come back, and exits non-zero.

Every node needs `pip install -e '.[render]'` (bpy is Python 3.11 only), the same version as here.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ..files import atomic_file
from .render_jobs import Interrupted, _StopFlag, _eta, _image, _record, render_scene
from .sources import write_json_atomic

TASK_RETRIES = 5          # a task whose worker process or node died is run again, up to this often
IN_FLIGHT_PER_CPU = 2     # tasks queued per cluster CPU: none idles while results travel

_RENDERERS: dict = {}     # in each Ray worker process: one Blender scene per (size, samples)


def _render_remote(split: str, index: int, settings: dict) -> tuple[str, int, bytes, dict]:
    """Runs in a Ray worker: (split, index, PNG bytes, scene record)."""
    from .blender import BlenderRenderer
    key = (tuple(settings["size"]), settings["samples"])
    if key not in _RENDERERS:
        _RENDERERS[key] = BlenderRenderer(key[0][0], key[0][1], key[1], denoise=False, threads=1)
    with tempfile.TemporaryDirectory(prefix="qgmrn-render-") as tmp:
        path = Path(tmp) / f"CLEVR_{split}_{index:06d}.png"
        record = render_scene(_RENDERERS[key], split, index, settings, path)
        return split, index, path.read_bytes(), record


def render_on_ray(out: Path, todo: list, settings: dict, address: str, log) -> int:
    """Render `todo` [(split, index)] on the cluster at `address` ("" for RAY_ADDRESS or a local
    cluster); returns how many images were rendered. Raises Interrupted on SIGINT/SIGTERM."""
    if not todo:
        return 0
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("--ray needs Ray: pip install -e '.[ray]' (on every node: pip install -e '.[render,ray]')") from e
    started = not ray.is_initialized()
    if started:
        try:
            if not (address or os.environ.get("RAY_ADDRESS")):   # a local Ray: its ports on loopback only
                from ..ray_loopback import start_ray_on_loopback
                start_ray_on_loopback(ray, configure_logging=False)
            else:
                ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                         logging_level="ERROR", configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise RuntimeError(f"cannot reach the Ray cluster {address or '(RAY_ADDRESS or local)'}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        size = settings["size"]
        log(f"rendering {len(todo)} images at {size[0]}x{size[1]}, {settings['samples']} samples, "
            f"on a Ray cluster of {cpus} CPUs")
        task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(_render_remote)
        jobs = iter(todo)
        done, start, last = 0, time.perf_counter(), time.perf_counter()
        with _StopFlag() as stop:
            pending = [task.remote(split, i, settings) for split, i in _take(jobs, IN_FLIGHT_PER_CPU * cpus)]
            while pending:
                finished, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in finished:
                    try:
                        split, index, png, record = ray.get(ref)
                    except ray.exceptions.RayError as e:     # a task failed more than TASK_RETRIES times
                        raise RuntimeError(f"a render task failed on the cluster: {_first_line(e)}") from e
                    with atomic_file(_image(out, split, index), binary=True) as f:
                        f.write(png)
                    write_json_atomic(_record(out, split, index), record)    # after its PNG: finished
                    done += 1
                    if not stop.signum:
                        pending += [task.remote(s, i, settings) for s, i in _take(jobs, 1)]
                now = time.perf_counter()
                if finished and (now - last >= 10 or done == len(todo)):
                    last, rate = now, done / (now - start)
                    log(f"{done}/{len(todo)} images, {rate:.2f} images/s, ETA {_eta((len(todo) - done) / rate)}")
            if stop.signum:
                raise Interrupted(stop.signum, done)
        return done
    finally:
        if started:
            ray.shutdown()


def _take(it, n: int) -> list:
    return [x for _, x in zip(range(n), it)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__
