"""A CLEVR v1.0-layout dataset rendered by Blender, resumable image by image.

    python -m qgmrn.data.generate --renderer blender --out DIR --images N [--size W H] [--samples S]

Each image's scene comes from its own seeded RNG (seed, split, index), so the dataset does not
depend on where a run stopped: a rerun of the same command skips every finished image and ends
with the same files as an uninterrupted run. An image is finished when its PNG (renamed into
place after a complete write) and its scene record in DIR/.render/ both exist. Ctrl-C or SIGTERM
lets the image in hand finish, keeps everything done, and exits non-zero; the scenes and
questions JSON are written once a split's images are all there. A rerun with another --questions
rewrites the questions from the same scenes without rendering again.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from .question_mix import AnswerBalancer, make_questions
from .questions import QUESTION_LANGUAGE
from .render_jobs import Interrupted, _StopFlag, _eta, _image, _record, _rng, render_scene
from .sources import write_json_atomic, write_split

CHUNK = 50            # images whose questions share one seeded RNG and answer balancer
# What the images depend on: a rerun with other settings would mix two datasets. The questions
# are not among them: they are written from the scene records at the end of every run, so a rerun
# with another --questions (or a newer question generator) rewrites them without re-rendering.
SETTINGS = ("renderer", "size", "samples", "seed", "objects")


class SettingsMismatch(ValueError):
    pass


def _check_settings(out: Path, settings: dict) -> None:
    """A rerun continues only the dataset it started; anything else in --out is not touched."""
    path = out / ".render" / "settings.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise SettingsMismatch(f"{path} is unreadable ({e}): the settings this dataset was rendered with "
                                   "are lost; restore the file, or give another --out") from e
        diff = [f"{k} {old.get(k)} (asked {settings[k]})" for k in SETTINGS if old.get(k) != settings[k]]
        if diff:
            raise SettingsMismatch(f"{out} holds a dataset rendered with other settings: {', '.join(diff)}; "
                                   f"rerun with those, or give another --out")
        return
    if (out / "scenes").exists() or (out / "questions").exists() or (out / "images").exists():
        raise SettingsMismatch(f"{out} already holds a dataset that this command did not start; "
                               f"give an empty or new --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings)


_RENDERER = None       # one per worker process: bpy holds one scene


def _start_worker(size, samples) -> None:
    """Workers leave SIGINT/SIGTERM to the parent, which stops handing out images and lets the ones
    in hand finish; one Cycles thread each, one worker per core: renders are then bit-identical
    from run to run (two threads or the denoiser change a pixel by one level now and then)."""
    global _RENDERER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from .blender import BlenderRenderer
    _RENDERER = BlenderRenderer(size[0], size[1], samples, denoise=False, threads=1)


def _render_one(job) -> int:
    out, split, index, settings = job
    out = Path(out)
    record = render_scene(_RENDERER, split, index, settings, _image(out, split, index))
    write_json_atomic(_record(out, split, index), record)
    return index


def _finished(out: Path, split: str, index: int) -> bool:
    """Its PNG (renamed into place whole) and then its scene record are both there."""
    return _record(out, split, index).exists() and _image(out, split, index).exists()


def _damage(out: Path, split: str, index: int, size) -> str | None:
    """What is wrong with a finished image's record or PNG (a rerun re-renders it), or None."""
    from PIL import Image
    record_path, image = _record(out, split, index), _image(out, split, index)
    try:
        record = json.loads(record_path.read_text())
        if not isinstance(record, dict):
            return "its scene record is not a JSON object"
        if record.get("image_index") != index or record.get("split") != split or \
                record.get("image_filename") != image.name:
            return "its scene record names another image"
        objects = record.get("objects")
        if not isinstance(objects, list) or not 1 <= len(objects) <= 10:
            return "its scene record has no usable object list"
        for o in objects:
            x, y, z = (float(v) for v in o["3d_coords"])
            px, py = float(o["pixel_coords"][0]), float(o["pixel_coords"][1])
            if not (abs(x) <= 4 and abs(y) <= 4 and 0 <= z <= 1 and -size[0] <= px <= 2 * size[0]
                    and -size[1] <= py <= 2 * size[1]):
                return f"its scene record places an object at {o['3d_coords']} / {o['pixel_coords']}"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"its scene record is unreadable ({type(e).__name__})"
    try:
        with Image.open(image) as im:
            if list(im.size) != list(size):
                return f"its PNG is {im.size[0]} x {im.size[1]}, not {size[0]} x {size[1]}"
            im.load()                                 # a truncated PNG fails here
    except (OSError, SyntaxError, ValueError) as e:
        return f"its PNG does not decode ({e})"
    return None


def _verified(out: Path, split: str, n: int, size, log) -> list[int]:
    """Indices below n still to render: missing ones, and finished ones whose record or PNG is
    damaged (removed here, named in the log)."""
    todo = []
    for i in range(n):
        if _finished(out, split, i):
            why = _damage(out, split, i, size)
            if why is None:
                continue
            log(f"{split} image {i}: {why}; rendering it again")
            _record(out, split, i).unlink(missing_ok=True)
            _image(out, split, i).unlink(missing_ok=True)
        todo.append(i)
    return todo


def _check_no_orphans(out: Path, split: str, n: int) -> None:
    """A rerun with fewer images than are rendered would leave images no scene file lists."""
    held = sum(1 for p in (out / ".render" / split).glob("*.json")) if (out / ".render" / split).exists() else 0
    if held > n:
        raise SettingsMismatch(f"{out} holds {held} rendered {split} images; asking for {n} would leave "
                               f"{held - n} of them out of the dataset: rerun with at least {held}, or give "
                               "another --out")


def _questions(scenes: list[dict], settings: dict, split: str) -> list[dict]:
    questions = []
    for start in range(0, len(scenes), CHUNK):
        rng = _rng(settings["seed"], split, "questions", start // CHUNK)
        balancer = AnswerBalancer(rng)
        for scene in scenes[start:start + CHUNK]:
            index = scene["image_index"]
            for q in make_questions(scene, settings["questions"], rng, balancer,
                                    first_family=index * settings["questions"]):
                q.update(image_index=index, image_filename=scene["image_filename"], split=split)
                questions.append(q)
    for i, q in enumerate(questions):
        q["question_index"] = i
    return questions


def generate_rendered(out, images: int, val_images: int, questions: int = 10, seed: int = 0,
                      size: tuple[int, int] = (240, 160), samples: int = 32, objects: tuple[int, int] = (3, 10),
                      log=print, workers: int | None = None, ray_address: str | None = None) -> dict:
    """Render (or continue rendering) the dataset; returns {"train": (images, questions), "val": ...,
    "rendered": new images, "seconds": s}. Raises Interrupted on SIGINT/SIGTERM. Renders are not
    denoised (the denoiser is not bit-reproducible); at 128 x 85 and 32 samples they are as close
    to a 256-sample render as 16 denoised samples, at the same cost on two cores.
    ray_address: render on a Ray cluster instead of local processes ("" : the cluster in RAY_ADDRESS,
    or a local one for this run; "auto", "HOST:PORT", "ray://HOST:10001": that cluster); the images
    come back to this process, which writes them, so the nodes need no shared disk."""
    out = Path(out)
    settings = {"renderer": "blender", "size": list(size), "samples": samples, "seed": seed,
                "objects": list(objects), "questions": questions}
    if ray_address is None and importlib.util.find_spec("bpy") is None:   # before anything is written
        from .blender import INSTALL_HINT
        raise RuntimeError(INSTALL_HINT)
    _check_settings(out, settings)
    for split, n in (("train", images), ("val", val_images)):
        _check_no_orphans(out, split, n)
    todo = [(split, i) for split, n in (("train", images), ("val", val_images))
            for i in _verified(out, split, n, size, log)]
    for split in ("train", "val"):
        for folder in (out / "images" / split, out / ".render" / split):
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("*.tmp"):          # what a killed run was writing
                stale.unlink(missing_ok=True)
            for stale in folder.glob(".*.raw"):         # a killed render's Blender output folder
                shutil.rmtree(stale, ignore_errors=True)
    info = {"version": "1.0", "license": "generated by qgmrn (CC0)", "seed": seed, "generator": "qgmrn.data.generate",
            "renderer": "blender", "size": list(size), "samples": samples, "objects": list(objects),
            "questions_per_image": questions, "question_language": QUESTION_LANGUAGE}
    start = time.perf_counter()
    if ray_address is not None:
        from .ray_render import render_on_ray
        rendered = render_on_ray(out, todo, settings, ray_address, log)
    else:
        rendered = _render_all(out, todo, settings, workers or os.cpu_count() or 1, log)
    stats: dict = {"rendered": rendered}
    for split, n in (("train", images), ("val", val_images)):
        scenes = [json.loads(_record(out, split, i).read_text()) for i in range(n)]
        qs = _questions(scenes, settings, split)
        write_split(out, split, info, scenes, qs)
        stats[split] = (len(scenes), len(qs))
        log(f"{split}: {len(scenes)} images, {len(qs)} questions")
    stats["seconds"] = time.perf_counter() - start
    return stats


def _render_all(out: Path, todo: list, settings: dict, workers: int, log) -> int:
    """Render the missing images, a few in flight per worker; on a signal stop handing out more,
    let those in hand finish, and raise Interrupted."""
    if not todo:
        return 0
    size = settings["size"]
    log(f"rendering {len(todo)} images at {size[0]}x{size[1]}, {settings['samples']} samples, {workers} workers")
    done, start, last = 0, time.perf_counter(), time.perf_counter()
    jobs = iter([(str(out), split, i, settings) for split, i in todo])
    with _StopFlag() as stop, ProcessPoolExecutor(workers, initializer=_start_worker,
                                                  initargs=(size, settings["samples"])) as pool:
        pending = {pool.submit(_render_one, job) for job in itertools.islice(jobs, 2 * workers)}
        while pending:
            finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for f in finished:
                f.result()
                done += 1
                if not stop.signum:
                    pending |= {pool.submit(_render_one, job) for job in itertools.islice(jobs, 1)}
            now = time.perf_counter()
            if finished and (now - last >= 10 or done == len(todo)):
                last, rate = now, done / (now - start)
                log(f"{done}/{len(todo)} images, {rate:.2f} images/s, ETA {_eta((len(todo) - done) / rate)}")
        if stop.signum:
            raise Interrupted(stop.signum, done)
    return done
