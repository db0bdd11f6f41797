"""CLEVR's world as numbers: camera, lights, sizes and placement rules, and the pinhole
projection the scenes' pixel_coords come from. No Blender here: the Blender renderer builds its
scene from these, the scene sampler and the fidelity fit use them without bpy.

Facts from ../shared/DESIGN.md ("CLEVR's render setup, as numbers"): metres, z up, lights and
camera aimed at the origin; each image jitters the camera by +-0.5 and each light by +-1.0 per
coordinate.
"""
from __future__ import annotations

import math
import random

from .programs import ATTRIBUTES, RELATIONS

CAMERA = (7.48, -6.51, 5.34)
LENS_MM, SENSOR_MM = 35.0, 32.0           # sensor fit: the wider image side (CLEVR is 3:2)
CAMERA_JITTER, LIGHT_JITTER = 0.5, 1.0
# name: (location, (size_x, size_y), power in W, rgb)
LIGHTS = {
    "key": ((6.45, -2.91, 4.26), (0.5, 0.1), 78.5, (1.0, 0.93, 0.82)),
    "fill": ((-4.67, -4.01, 3.01), (0.5, 0.1), 23.6, (0.76, 0.82, 1.0)),
    "back": ((-1.17, 2.65, 5.82), (1.0, 0.1), 39.3, (1.0, 1.0, 1.0)),
}
SUN_STRENGTH = 0.45
SCALE = {"large": 0.7, "small": 0.35}     # half the extent of a shape; it stands at z = scale
COLORS = {  # sRGB 0-255, as CLEVR's properties give them
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
MIN_DIST, MARGIN = 0.25, 0.4              # placement: gap between objects, margin along each direction
MAX_RETRIES = 50                          # rejections of one object before the scene starts over
MIN_PIXELS = 200                          # visible pixels per object at 480 x 320 (scaled with the area)
RELATION_EPS = 0.2                        # CLEVR's compute_all_relationships


def _sub(a, b):
    return [x - y for x, y in zip(a, b)]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _unit(a):
    n = math.sqrt(_dot(a, a))
    return [x / n for x in a]


def _cross(a, b):
    return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]


def camera_basis(location) -> tuple[list[float], list[float], list[float]]:
    """(right, up, forward) of a camera at `location` tracking the origin with world z up
    (Blender's track-to with -Z forward and Y up keeps the camera's x axis level)."""
    forward = _unit([-c for c in location])
    right = _unit(_cross(forward, [0.0, 0.0, 1.0]))
    up = _cross(right, forward)
    return right, up, forward


def directions(location) -> dict[str, list[float]]:
    """CLEVR's six directions on the ground plane as the camera sees them."""
    right, _, forward = camera_basis(location)
    behind = _unit([forward[0], forward[1], 0.0])
    right = [right[0], right[1], 0.0]
    return {"right": right, "left": [-c for c in right], "behind": behind, "front": [-c for c in behind],
            "above": [0.0, 0.0, 1.0], "below": [0.0, 0.0, -1.0]}


def project(point, location, width: int, height: int) -> list[float]:
    """Pixel x, pixel y and depth of a world point, as Blender's world_to_camera_view gives
    them (x from the left, y from the top, depth along the view axis)."""
    right, up, forward = camera_basis(location)
    d = _sub(point, location)
    depth = _dot(d, forward)
    focal = LENS_MM / SENSOR_MM * max(width, height)      # pixels
    return [width / 2 + focal * _dot(d, right) / depth, height / 2 - focal * _dot(d, up) / depth, depth]


def relationships(objects: list[dict], dirs: dict) -> dict[str, list[list[int]]]:
    """rel[name][i]: the objects that are `name` of object i (CLEVR's rule, eps 0.2)."""
    out: dict[str, list[list[int]]] = {}
    for name in RELATIONS:
        d = dirs[name]
        out[name] = [[j for j, b in enumerate(objects) if j != i and
                      _dot(_sub(b["3d_coords"], a["3d_coords"]), d) > RELATION_EPS]
                     for i, a in enumerate(objects)]
    return out


def _jitter(rng: random.Random, point, amount: float) -> list[float]:
    return [c + rng.uniform(-amount, amount) for c in point]


def sample_layout(rng: random.Random, n_objects: int) -> dict:
    """Camera and light jitter and objects placed by CLEVR's rules (gap 0.25 between objects,
    0.4 margin along each direction; after 50 rejections of one object the scene starts over).
    Visibility is the renderer's to check."""
    camera = _jitter(rng, CAMERA, CAMERA_JITTER)
    lights = {name: _jitter(rng, spec[0], LIGHT_JITTER) for name, spec in LIGHTS.items()}
    # Real CLEVR's directions are the unjittered camera's (every scene of the release has the
    # same six; Blender had not yet updated the camera's matrix when they were read): so are ours.
    dirs = directions(CAMERA)
    while True:
        objects = _place(rng, n_objects, dirs)
        if objects is not None:
            return {"camera": camera, "lights": lights, "directions": dirs, "objects": objects}


def _place(rng: random.Random, n_objects: int, dirs: dict) -> list[dict] | None:
    objects: list[dict] = []
    for _ in range(n_objects):
        size = rng.choice(ATTRIBUTES["size"])
        r = SCALE[size]
        for _ in range(MAX_RETRIES):
            x, y = rng.uniform(-3, 3), rng.uniform(-3, 3)
            if all(_apart(x, y, r, o, dirs) for o in objects):
                break
        else:
            return None
        objects.append({"shape": rng.choice(ATTRIBUTES["shape"]), "color": rng.choice(ATTRIBUTES["color"]),
                        "size": size, "material": rng.choice(ATTRIBUTES["material"]),
                        "rotation": rng.uniform(0, 360), "3d_coords": [x, y, r]})
    return objects


def _apart(x: float, y: float, r: float, other: dict, dirs: dict) -> bool:
    ox, oy, orad = other["3d_coords"]
    dx, dy = x - ox, y - oy
    if math.hypot(dx, dy) - r - orad < MIN_DIST:
        return False
    return not any(0 < dx * dirs[n][0] + dy * dirs[n][1] < MARGIN for n in ("left", "right", "front", "behind"))


def scene_record(layout: dict, index: int, split: str, width: int, height: int) -> dict:
    """The CLEVR v1.0 scene entry of a layout rendered at width x height (pixel_coords in that
    image's pixels)."""
    objects = [dict(o, pixel_coords=[round(v) if k < 2 else v for k, v in
                                     enumerate(project(o["3d_coords"], layout["camera"], width, height))])
               for o in layout["objects"]]
    return {"split": split, "image_index": index, "image_filename": f"CLEVR_{split}_{index:06d}.png",
            "objects": objects, "relationships": relationships(objects, layout["directions"]),
            "directions": layout["directions"],
            "render": {"camera": layout["camera"], "lights": layout["lights"], "size": [width, height]}}
