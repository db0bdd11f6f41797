"""CLEVR scenes rendered by Blender (Cycles on the CPU), built in code from clevr_world's numbers:
no downloaded assets. Needs the `render` extra (`pip install -e '.[render]'`, which brings bpy).

    renderer = BlenderRenderer(width=128, height=85, samples=16)
    renderer.visible_pixels(layout)     # pixels each object shows (CLEVR's visibility check)
    renderer.render(layout, path)       # a PNG, written atomically

One renderer per process: bpy holds one scene.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from . import clevr_world as world

INSTALL_HINT = "the Blender renderer needs bpy: pip install -e '.[render]' (Python 3.11)"
# Calibrated against the real sample (study/render_fidelity.py; 8 scenes at 120 x 80 and 240 x 160):
GROUND_ALBEDO = 0.47      # with LIGHT_SCALE: the floor's brightness and its fall-off to the back
CUBE_SCALE, CUBE_BEVEL = 1.0, 0.12       # 0.9 or 0.8, or a rounder bevel (0.25), re-render worse
RUBBER_SHEEN_IOR, RUBBER_COAT_IOR, RUBBER_COAT_ROUGHNESS = 0.6, 1.2, 0.175   # DESIGN.md's; the coat barely matters
LIGHT_SCALE = 1.8         # Blender 2.7x lamp strengths -> today's Watts


def import_bpy():
    try:
        import bpy  # noqa: F401
    except ImportError as e:
        raise RuntimeError(INSTALL_HINT) from e
    return bpy


@contextlib.contextmanager
def _quiet():
    """Blender prints a line per render tile to fd 1; keep the progress lines readable."""
    import sys
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _use_nodes(datablock) -> None:
    """Node trees are always on from Blender 6; 5.x still wants the switch (and warns about it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        datablock.use_nodes = True


def _linear(rgb255) -> tuple[float, float, float, float]:
    # CLEVR hands its 0-255 colours to the shaders divided by 255, as linear values
    return (rgb255[0] / 255, rgb255[1] / 255, rgb255[2] / 255, 1.0)


class BlenderRenderer:
    def __init__(self, width: int, height: int, samples: int = 16, denoise: bool = True, threads: int = 0):
        self.bpy = import_bpy()
        self.threads = threads
        self.width, self.height, self.samples, self.denoise = width, height, samples, denoise
        with _quiet():
            self.bpy.ops.wm.read_factory_settings(use_empty=True)
        self.scene = self.bpy.context.scene
        self._setup_render()
        self._target = self._empty()
        self.camera = self._add_camera()
        self.lights = {name: self._add_area_light(name, spec) for name, spec in world.LIGHTS.items()}
        self._add_sun()
        self.ground = self._add_ground()
        self.meshes = {"cube": self._cube_mesh(), "sphere": self._sphere_mesh(), "cylinder": self._cylinder_mesh()}
        self.materials = {"rubber": self._rubber(), "metal": self._metal()}
        self._flat = self._flat_material()
        self._objects: list = []

    # ---- the fixed world -------------------------------------------------------------------
    def _setup_render(self):
        s, bpy = self.scene, self.bpy
        s.render.engine = "CYCLES"
        s.cycles.device = "CPU"
        s.render.resolution_x, s.render.resolution_y = self.width, self.height
        s.render.resolution_percentage = 100
        s.render.use_file_extension = False
        s.render.image_settings.file_format = "PNG"
        s.render.image_settings.color_mode = "RGB"
        s.render.image_settings.color_depth = "8"
        s.render.image_settings.compression = 15
        s.view_settings.view_transform = "Standard"
        s.view_settings.look = "None"
        s.cycles.max_bounces, s.cycles.diffuse_bounces, s.cycles.glossy_bounces = 12, 4, 4
        s.cycles.transmission_bounces, s.cycles.transparent_max_bounces = 4, 8
        s.cycles.blur_glossy = 2.0                 # CLEVR's filter glossy
        s.cycles.use_adaptive_sampling = False     # same work for every image: same timing, same noise
        s.render.threads_mode = "FIXED" if self.threads else "AUTO"
        if self.threads:
            s.render.threads = self.threads
        world_ = bpy.data.worlds.new("World")
        _use_nodes(world_)
        world_.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.0
        s.world = world_

    def _link(self, obj):
        self.scene.collection.objects.link(obj)
        return obj

    def _empty(self):
        return self._link(self.bpy.data.objects.new("Target", None))

    def _track(self, obj):
        c = obj.constraints.new("TRACK_TO")
        c.target, c.track_axis, c.up_axis = self._target, "TRACK_NEGATIVE_Z", "UP_Y"

    def _add_camera(self):
        cam = self.bpy.data.cameras.new("Camera")
        cam.lens, cam.sensor_width, cam.sensor_fit = world.LENS_MM, world.SENSOR_MM, "AUTO"
        obj = self._link(self.bpy.data.objects.new("Camera", cam))
        self._track(obj)
        self.scene.camera = obj
        return obj

    def _add_area_light(self, name, spec):
        location, (sx, sy), power, rgb = spec
        light = self.bpy.data.lights.new(name, type="AREA")
        light.shape, light.size, light.size_y = "RECTANGLE", sx, sy
        light.energy, light.color = power * LIGHT_SCALE, rgb
        obj = self._link(self.bpy.data.objects.new(name, light))
        obj.location = location
        self._track(obj)
        return obj

    def _add_sun(self):
        sun = self.bpy.data.lights.new("sun", type="SUN")
        sun.energy = world.SUN_STRENGTH * LIGHT_SCALE
        obj = self._link(self.bpy.data.objects.new("sun", sun))
        obj.rotation_euler = (math.radians(30), 0.0, math.radians(30))

    def _add_ground(self):
        """A floor that curves up far behind the objects (seen from the camera), so no horizon."""
        import bmesh
        bpy = self.bpy
        bm = bmesh.new()
        profile = [(-40.0 + 2.0 * k, 0.0) for k in range(29)]            # u: along the view, to u = 16
        profile += [(16.0 + 8 * math.sin(a), 8 - 8 * math.cos(a)) for a in np.linspace(0.1, math.pi / 2, 12)]
        profile += [(24.0, 16.0), (24.0, 40.0)]
        rows = []
        for v in (-40.0, 40.0):
            rows.append([bm.verts.new((u, v, z)) for u, z in profile])
        for k in range(len(profile) - 1):
            bm.faces.new((rows[0][k], rows[0][k + 1], rows[1][k + 1], rows[1][k]))
        for f in bm.faces:
            f.smooth = True
        mesh = bpy.data.meshes.new("Ground")
        bm.to_mesh(mesh)
        bm.free()
        obj = self._link(bpy.data.objects.new("Ground", mesh))
        behind = world.directions(world.CAMERA)["behind"]
        obj.rotation_euler = (0.0, 0.0, math.atan2(behind[1], behind[0]))
        mat = bpy.data.materials.new("Ground")
        _use_nodes(mat)
        bsdf = mat.node_tree.nodes["Principled BSDF"]
        bsdf.inputs["Base Color"].default_value = (GROUND_ALBEDO,) * 3 + (1.0,)
        bsdf.inputs["Roughness"].default_value = 1.0
        mesh.materials.append(mat)
        return obj

    # ---- shapes: 2 units across, centred at the origin, scaled per object ---------------------
    def _mesh(self, name, bm):
        mesh = self.bpy.data.meshes.new(name)
        bm.to_mesh(mesh)
        bm.free()
        mesh.materials.append(None)
        return mesh

    def _cube_mesh(self):
        import bmesh
        bm = bmesh.new()
        bmesh.ops.create_cube(bm, size=2.0)
        rounded = bmesh.ops.bevel(bm, geom=list(bm.edges) + list(bm.verts), offset=CUBE_BEVEL, segments=4,
                                  profile=0.5, affect="EDGES")
        for f in rounded["faces"]:
            f.smooth = True
        return self._mesh("cube", bm)

    def _sphere_mesh(self):
        import bmesh
        bm = bmesh.new()
        bmesh.ops.create_uvsphere(bm, u_segments=48, v_segments=24, radius=1.0)
        for f in bm.faces:
            f.smooth = True
        return self._mesh("sphere", bm)

    def _cylinder_mesh(self):
        import bmesh
        bm = bmesh.new()
        bmesh.ops.create_cone(bm, cap_ends=True, cap_tris=False, segments=64, radius1=1.0, radius2=1.0, depth=2.0)
        caps = {f for f in bm.faces if abs(f.normal.z) > 0.99}
        rims = [e for e in bm.edges if any(f in caps for f in e.link_faces) and
                not all(f in caps for f in e.link_faces)]
        for f in bm.faces:
            f.smooth = f not in caps
        rounded = bmesh.ops.bevel(bm, geom=rims, offset=0.08, segments=3, profile=0.5, affect="EDGES")
        for f in rounded["faces"]:
            f.smooth = True
        return self._mesh("cylinder", bm)

    # ---- materials: colour from the object (Object Info), so one material per kind --------------
    def _material(self, name):
        mat = self.bpy.data.materials.new(name)
        _use_nodes(mat)
        nodes = mat.node_tree.nodes
        nodes.remove(nodes["Principled BSDF"])
        return mat, nodes, mat.node_tree.links, nodes.new("ShaderNodeObjectInfo"), nodes["Material Output"]

    def _rubber(self):
        mat, nodes, links, info, out = self._material("Rubber")
        diffuse = nodes.new("ShaderNodeBsdfDiffuse")
        sheen = nodes.new("ShaderNodeBsdfSheen")
        sheen.distribution = "ASHIKHMIN"                # Cycles' old velvet
        sheen.inputs["Roughness"].default_value = 1.0
        for n in (diffuse, sheen):
            links.new(info.outputs["Color"], n.inputs["Color"])
        fresnel_a, fresnel_b = nodes.new("ShaderNodeFresnel"), nodes.new("ShaderNodeFresnel")
        fresnel_a.inputs["IOR"].default_value, fresnel_b.inputs["IOR"].default_value = RUBBER_SHEEN_IOR, RUBBER_COAT_IOR
        cloth = nodes.new("ShaderNodeMixShader")
        links.new(fresnel_a.outputs[0], cloth.inputs[0])
        links.new(diffuse.outputs[0], cloth.inputs[1])
        links.new(sheen.outputs[0], cloth.inputs[2])
        gloss = nodes.new("ShaderNodeBsdfGlossy")
        gloss.distribution = "GGX"
        gloss.inputs["Color"].default_value = (0.8, 0.8, 0.8, 1.0)
        gloss.inputs["Roughness"].default_value = RUBBER_COAT_ROUGHNESS
        coat = nodes.new("ShaderNodeMixShader")
        links.new(fresnel_b.outputs[0], coat.inputs[0])
        links.new(cloth.outputs[0], coat.inputs[1])
        links.new(gloss.outputs[0], coat.inputs[2])
        links.new(coat.outputs[0], out.inputs["Surface"])
        return mat

    def _metal(self):
        mat, nodes, links, info, out = self._material("Metal")
        layers = []
        for roughness in (0.447, 0.1):
            g = nodes.new("ShaderNodeBsdfGlossy")
            g.distribution = "GGX"
            g.inputs["Roughness"].default_value = roughness
            g.inputs["Anisotropy"].default_value = 0.25
            links.new(info.outputs["Color"], g.inputs["Color"])
            layers.append(g)
        mix = nodes.new("ShaderNodeMixShader")
        mix.inputs[0].default_value = 0.4              # 0.6 of the rough layer, 0.4 of the sharp one
        links.new(layers[0].outputs[0], mix.inputs[1])
        links.new(layers[1].outputs[0], mix.inputs[2])
        links.new(mix.outputs[0], out.inputs["Surface"])
        return mat

    def _flat_material(self):
        """Emission in the object's colour: the visibility check's flat render."""
        mat, nodes, links, info, out = self._material("Flat")
        emit = nodes.new("ShaderNodeEmission")
        links.new(info.outputs["Color"], emit.inputs["Color"])
        links.new(emit.outputs[0], out.inputs["Surface"])
        return mat

    # ---- per image ------------------------------------------------------------------------------
    def _set_layout(self, layout: dict):
        bpy = self.bpy
        for obj in self._objects:
            bpy.data.objects.remove(obj, do_unlink=True)
        self._objects = []
        self.camera.location = layout["camera"]
        for name, obj in self.lights.items():
            obj.location = layout["lights"][name]
        for k, o in enumerate(layout["objects"]):
            obj = self._link(bpy.data.objects.new(f"obj{k}", self.meshes[o["shape"]]))
            r = o["3d_coords"][2] * (CUBE_SCALE if o["shape"] == "cube" else 1.0)
            obj.scale = (r, r, r)
            obj.location = (o["3d_coords"][0], o["3d_coords"][1], r)
            # CLEVR records `rotation` in degrees but hands it to Blender, which reads radians:
            # the real scenes are turned by that many radians, and so are ours
            obj.rotation_euler = (0.0, 0.0, o["rotation"])
            obj.material_slots[0].link = "OBJECT"      # the shared mesh keeps one empty slot
            obj.material_slots[0].material = self.materials[o["material"]]
            obj.color = _linear(world.COLORS[o["color"]])
            self._objects.append(obj)

    def _render_to(self, path: str, seed: int):
        s = self.scene
        s.render.filepath = path
        s.cycles.seed = seed
        with _quiet():
            self.bpy.ops.render.render(write_still=True)

    def render(self, layout: dict, path: str | os.PathLike, seed: int = 0):
        """Render the layout to `path` (PNG, RGB); written to a temporary name and renamed, so a
        killed render never leaves a half-written image under the final name."""
        self._set_layout(layout)
        s = self.scene
        s.cycles.samples = self.samples
        s.cycles.use_denoising = self.denoise
        if self.denoise:
            s.cycles.denoiser = "OPENIMAGEDENOISE"
        s.cycles.filter_width = 1.5
        from ..files import atomic_file
        raw_dir = tempfile.mkdtemp(prefix=f".{Path(path).name}.", suffix=".raw", dir=Path(path).parent)
        raw = os.path.join(raw_dir, "render.png")       # Blender writes by name: in a fresh folder of ours
        try:
            self._render_to(raw, seed)
            with Image.open(raw) as im, atomic_file(path, binary=True) as f:   # drop Blender's stamps (date,
                im.convert("RGB").save(f, format="PNG", compress_level=6)      # render time): same bytes
        finally:
            shutil.rmtree(raw_dir, ignore_errors=True)

    def visible_pixels(self, layout: dict) -> list[int]:
        """Pixels each object shows, from a flat render (one sample, emission only, no ground):
        CLEVR's check that no object is hidden."""
        self._set_layout(layout)
        s, view = self.scene, self.bpy.context.view_layer
        n = len(self._objects)
        for k, obj in enumerate(self._objects):
            obj.color = ((k + 1) * 20 / 255, 0.0, 0.0, 1.0)
        saved = (s.cycles.samples, s.cycles.use_denoising, s.cycles.max_bounces, s.cycles.filter_width,
                 s.view_settings.view_transform)
        s.cycles.samples, s.cycles.use_denoising, s.cycles.max_bounces, s.cycles.filter_width = 1, False, 0, 0.01
        s.view_settings.view_transform = "Raw"
        view.material_override = self._flat
        self.ground.visible_camera = False
        # A private directory (mode 0700, a fresh name): a predictable path in the shared temp
        # folder lets a planted symlink redirect the render onto another file.
        with tempfile.TemporaryDirectory(prefix="qgmrn-visibility-") as private:
            tmp = Path(private) / "visibility.png"
            try:
                self._render_to(str(tmp), 0)
                with Image.open(tmp) as im:
                    red = np.asarray(im.convert("RGB"))[..., 0].astype(np.int32)
            finally:
                view.material_override = None
                self.ground.visible_camera = True
                (s.cycles.samples, s.cycles.use_denoising, s.cycles.max_bounces, s.cycles.filter_width,
                 s.view_settings.view_transform) = saved
        label = np.rint(red / 20.0).astype(np.int32)            # 0: background, k + 1: object k
        counts = np.bincount(label.ravel(), minlength=n + 2)
        return [int(c) for c in counts[1:n + 1]]

    def min_pixels(self) -> int:
        return max(1, round(world.MIN_PIXELS * self.width * self.height / (480 * 320)))
