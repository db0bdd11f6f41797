"""CLEVR-style scenes drawn with Pillow: a ground plane seen from the front and above, objects
painted back to front so nearer objects occlude farther ones, each with a shadow.

Visible cues: shape (cube = box with a lit top, sphere = shaded disc, cylinder = body with an
elliptic top), size (large objects 2x small ones, perspective at most 1.3x), material (metal: a
large white specular highlight, still visible when the image is shrunk to 64 px, and high
contrast shading; rubber: matte, no highlight), colour (CLEVR's 8), depth (higher in the image
and smaller when farther away).
"""
from __future__ import annotations

import random

from PIL import Image, ImageDraw

from .programs import ATTRIBUTES, RELATIONS

WIDTH, HEIGHT = 480, 320
COLORS = {  # CLEVR's palette
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
RADIUS = {"large": 44.0, "small": 22.0}
# Ground coordinates: x in [-3, 3] (right), y in [-3, 3] (behind). Directions are axis aligned.
DIRECTIONS = {"right": [1.0, 0.0, 0.0], "left": [-1.0, 0.0, 0.0], "behind": [0.0, 1.0, 0.0],
              "front": [0.0, -1.0, 0.0], "above": [0.0, 0.0, 1.0], "below": [0.0, 0.0, -1.0]}


def _project(x: float, y: float) -> tuple[float, float, float]:
    """Ground point -> pixel x, pixel y, perspective scale (farther = higher and smaller)."""
    # Mild perspective (1.13 at the front edge, 0.87 at the back), so that a large object is
    # larger than a small one wherever both stand, as in CLEVR's renders.
    scale = 1.0 - 0.05 * y
    px = WIDTH / 2 + x * 62.0 * scale
    py = 205.0 - y * 30.0 + 18.0                   # back row near 133, front row near 313
    return px, py - 18.0 * (1 - scale), scale


def _overlap(a, b) -> float:
    """Overlap of two objects' drawn boxes (x +- r, from 2r above the ground point down to it),
    as a fraction of the smaller box."""
    (ax, ay, ar), (bx, by, br) = a, b
    w = min(ax + ar, bx + br) - max(ax - ar, bx - br)
    h = min(ay, by) - max(ay - 2 * ar, by - 2 * br)
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / min(4 * ar * ar, 4 * br * br)


def sample_scene(rng: random.Random, n_objects: int, image_index: int, split: str) -> dict:
    """A scene graph in CLEVR's schema, objects kept apart enough to stay recognisable."""
    objects = []
    for _ in range(400):
        if len(objects) == n_objects:
            break
        size = rng.choice(ATTRIBUTES["size"])
        x, y = rng.uniform(-2.8, 2.8), rng.uniform(-2.6, 2.6)
        px, py, s = _project(x, y)
        r = RADIUS[size] * s
        if not (r < px < WIDTH - r and 2 * r < py < HEIGHT - 4):
            continue
        if any(_overlap((px, py, r), (o["pixel_coords"][0], o["pixel_coords"][1], o["_r"])) > 0.2
               for o in objects):
            continue                                # keep every object mostly visible
        objects.append({
            "shape": rng.choice(ATTRIBUTES["shape"]), "color": rng.choice(ATTRIBUTES["color"]),
            "size": size, "material": rng.choice(ATTRIBUTES["material"]),
            "rotation": rng.uniform(0, 360), "3d_coords": [x, y, 0.7 if size == "large" else 0.35],
            "pixel_coords": [round(px), round(py), round(10.0 + y, 3)], "_r": r,
        })
    relationships = {name: [] for name in RELATIONS}
    for o in objects:
        for name in RELATIONS:
            d = DIRECTIONS[name]
            relationships[name].append([j for j, p in enumerate(objects) if p is not o and
                                        (p["3d_coords"][0] - o["3d_coords"][0]) * d[0] +
                                        (p["3d_coords"][1] - o["3d_coords"][1]) * d[1] > 0.05])
    return {"split": split, "image_index": image_index,
            "image_filename": f"CLEVR_{split}_{image_index:06d}.png",
            "objects": objects, "relationships": relationships, "directions": DIRECTIONS}


def _shade(rgb, f: float):
    return tuple(max(0, min(255, int(c * f))) for c in rgb)


def _mix(rgb, other, t: float):
    return tuple(int(a + (b - a) * t) for a, b in zip(rgb, other))


def render(scene: dict) -> Image.Image:
    im = Image.new("RGBA", (WIDTH, HEIGHT), (0, 0, 0, 255))
    d = ImageDraw.Draw(im)
    for row in range(HEIGHT):                       # lit ground, darker towards the horizon
        g = int(96 + 44 * row / HEIGHT)
        d.line([(0, row), (WIDTH, row)], fill=(g, g, g + 2, 255))
    order = sorted(range(len(scene["objects"])), key=lambda i: scene["objects"][i]["pixel_coords"][1])
    for i in order:                                 # back to front: occlusion
        _draw_object(d, scene["objects"][i])
    return im


def _highlight(d: ImageDraw.ImageDraw, x: float, y: float, r: float):
    """Specular highlight of a metal object: a white disc with a soft edge."""
    d.ellipse([x - r, y - r, x + r, y + r], fill=(205, 205, 210, 255))
    d.ellipse([x - 0.6 * r, y - 0.6 * r, x + 0.6 * r, y + 0.6 * r], fill=(252, 252, 252, 255))


def _draw_object(d: ImageDraw.ImageDraw, o: dict):
    px, py, _ = o["pixel_coords"]
    r = o["_r"]
    base = COLORS[o["color"]]
    metal = o["material"] == "metal"
    d.ellipse([px - r * 1.1 + 6, py - r * 0.28, px + r * 1.1 + 10, py + r * 0.32], fill=(60, 60, 62, 255))
    if o["shape"] == "sphere":
        cx, cy = px, py - r
        steps = 7
        for k in range(steps):                      # radial shading towards the light (upper left)
            t = k / steps
            rr = r * (1 - t * 0.75)
            off = r * 0.3 * t
            f = 0.55 + 0.6 * t if not metal else 0.35 + 0.9 * t
            d.ellipse([cx - rr - off, cy - rr - off, cx + rr - off, cy + rr - off], fill=_shade(base, f) + (255,))
        if metal:
            _highlight(d, cx - r * 0.35, cy - r * 0.35, r * 0.33)
    elif o["shape"] == "cube":
        s = r * 0.85                                # half edge of the front face
        depth = s * 0.55
        front = [(px - s, py - 2 * s), (px + s, py - 2 * s), (px + s, py), (px - s, py)]
        top = [(px - s, py - 2 * s), (px - s + depth, py - 2 * s - depth),
               (px + s + depth, py - 2 * s - depth), (px + s, py - 2 * s)]
        side = [(px + s, py - 2 * s), (px + s + depth, py - 2 * s - depth), (px + s + depth, py - depth),
                (px + s, py)]
        d.polygon(side, fill=_shade(base, 0.45 if metal else 0.62) + (255,))
        d.polygon(front, fill=_shade(base, 0.85) + (255,))
        d.polygon(top, fill=_mix(base, (255, 255, 255), 0.55 if metal else 0.25) + (255,))
        if metal:                                   # a large highlight and a dark rim
            _highlight(d, px - s * 0.35, py - s * 1.3, s * 0.38)
            d.polygon(front, outline=_shade(base, 0.35) + (255,))
    else:                                           # cylinder
        w = r * 0.85
        hgt = r * 1.7
        e = w * 0.4                                 # half height of the end ellipses
        d.ellipse([px - w, py - e, px + w, py + e], fill=_shade(base, 0.7) + (255,))
        d.rectangle([px - w, py - hgt, px + w, py], fill=_shade(base, 0.8) + (255,))
        d.rectangle([px + w * 0.35, py - hgt, px + w, py], fill=_shade(base, 0.55 if metal else 0.68) + (255,))
        d.ellipse([px - w, py - hgt - e, px + w, py - hgt + e],
                  fill=_mix(base, (255, 255, 255), 0.5 if metal else 0.22) + (255,))
        if metal:
            _highlight(d, px - w * 0.4, py - hgt * 0.5, w * 0.36)
