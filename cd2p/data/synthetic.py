"""A synthetic ScanNet v2: small procedural rooms rendered to RGB-D ``.sens`` videos.

``generate_synthetic_scannet(out, num_scenes, frames_per_scene, seed)`` writes the real
ScanNet layout (``scans/<scene>/...``, split lists, label table), so that every reader and
``cd2p prepare scannet`` run on it exactly as on the real download. Each room has a floor,
four walls, a door, pictures and furniture of ScanNet classes (boxes and cylinders, one
instance each, a colour per class with per-instance noise), placed without overlap. The room
is rotated and shifted in the "raw scan" frame, and ``axisAlignment`` in ``<scene>.txt``
maps it back, as in ScanNet. A camera orbits inside the room looking at the furniture; frames
are ray cast (:mod:`cd2p.data.render`) at a small resolution: colour and depth have different
sizes but share one camera, so the depth intrinsics are the colour ones scaled. A few frames
get ScanNet's faults: ``-inf`` poses and empty (all-zero) depth.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trimesh

from cd2p._atomic import atomic_write_bytes
from cd2p.data import scannet_files as sf
from cd2p.data.common import SYNTHETIC_MARKER
from cd2p.data.render import PinholeView, Primitives, Shell, pixel_rays, render_views
from cd2p.data.sens import (
    COLOR_JPEG,
    DEPTH_ZLIB_USHORT,
    IMU_DTYPE,
    SensFrame,
    SensHeader,
    encode_depth,
    encode_jpeg,
    write_sens,
)

# ScanNet's full-resolution colour camera (1296 x 968); the small renders keep its field of view.
_SCANNET_COLOR_WIDTH, _SCANNET_FX = 1296, 1170.187988
DEPTH_SHIFT = 1000.0
MESH_EDGE = 0.15  # metres: longest mesh edge, so that meshes have enough vertices to sample
SEGMENT_CELL = 1.0  # metres: over-segmentation cell size (segments never cross objects)
_FRAME_MICROSECONDS = 33_333


@dataclass(frozen=True)
class Category:
    """A ScanNet category: its label-table row and a base colour for rendering."""

    raw_category: str
    nyu40id: int
    nyu40class: str
    eigen13id: int
    eigen13class: str
    mpcat40: str
    mpcat40index: int
    color: tuple[int, int, int]


CATEGORIES = {
    c.raw_category: c
    for c in (
        Category("wall", 1, "wall", 12, "wall", "wall", 1, (215, 205, 190)),
        Category("floor", 2, "floor", 5, "floor", "floor", 2, (150, 108, 70)),
        Category("cabinet", 3, "cabinet", 6, "furniture", "cabinet", 7, (125, 85, 55)),
        Category("bed", 4, "bed", 1, "bed", "bed", 11, (205, 205, 225)),
        Category("chair", 5, "chair", 4, "chair", "chair", 3, (170, 60, 45)),
        Category("couch", 6, "sofa", 9, "sofa", "sofa", 10, (70, 95, 150)),
        Category("table", 7, "table", 10, "table", "table", 5, (175, 125, 75)),
        Category("door", 8, "door", 12, "wall", "door", 4, (140, 100, 65)),
        Category("bookshelf", 10, "bookshelf", 6, "furniture", "shelving", 31, (105, 72, 45)),
        Category("picture", 11, "picture", 8, "picture", "picture", 6, (60, 140, 170)),
        Category("desk", 14, "desk", 10, "table", "table", 5, (195, 165, 115)),
        Category("refrigerator", 24, "refridgerator", 6, "furniture", "appliances", 37,
                 (228, 228, 228)),
        Category("toilet", 33, "toilet", 7, "objects", "toilet", 18, (240, 240, 236)),
        Category("bathtub", 36, "bathtub", 7, "objects", "bathtub", 25, (232, 236, 240)),
        Category("trash can", 39, "otherfurniture", 6, "furniture", "objects", 39, (55, 60, 60)),
    )
}  # fmt: skip

# ScanNet's nyu40 colour palette (the colours of .labels.ply) for the ids used here.
NYU40_COLORS = {
    0: (0, 0, 0), 1: (174, 199, 232), 2: (152, 223, 138), 3: (31, 119, 180),
    4: (255, 187, 120), 5: (188, 189, 34), 6: (140, 86, 75), 7: (255, 152, 150),
    8: (214, 39, 40), 10: (148, 103, 189), 11: (196, 156, 148), 14: (247, 182, 210),
    24: (255, 127, 14), 33: (44, 160, 44), 36: (227, 119, 194), 39: (82, 84, 163),
}  # fmt: skip

# ScanNet sceneType -> the furniture such a room gets (sampled with replacement).
ROOM_TYPES = {
    "Bedroom / Hotel": ("bed", "cabinet", "desk", "chair", "bookshelf", "trash can"),
    "Living room / Lounge": ("couch", "table", "chair", "bookshelf", "cabinet", "couch"),
    "Office": ("desk", "chair", "bookshelf", "cabinet", "table", "trash can", "chair"),
    "Bathroom": ("toilet", "bathtub", "cabinet", "trash can"),
    "Kitchen": ("refrigerator", "cabinet", "table", "chair", "trash can", "cabinet"),
}


# --------------------------------------------------------------------------- room model


@dataclass
class Part:
    """One primitive of an object in the aligned room frame: a box (``lo``/``hi`` corners)
    or a vertical cylinder (``center`` xy, ``radius``, ``lo[2]``/``hi[2]`` as bottom/top)."""

    kind: str  # "box" | "cylinder"
    lo: np.ndarray
    hi: np.ndarray
    obj: int
    radius: float = 0.0
    pattern: str = ""  # "planks" (floor), "shelves" (bookshelf) or "" (plain)


@dataclass
class SceneObject:
    """An object instance; ``label`` is the raw category, None for unannotated clutter."""

    label: str | None
    color: np.ndarray  # float (3,) in 0..255


@dataclass
class Room:
    """A room centred at the origin of its aligned frame, floor at z = 0."""

    width: float
    depth: float
    height: float
    scene_type: str
    objects: list[SceneObject] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    camera_center: np.ndarray = field(default_factory=lambda: np.zeros(2))
    camera_radius: float = 0.5
    shell_face_part: np.ndarray = field(default_factory=lambda: np.full((3, 2), -1))

    def add_object(self, label: str | None, color: np.ndarray, parts: list[Part]) -> None:
        for part in parts:
            part.obj = len(self.objects)
            self.parts.append(part)
        self.objects.append(SceneObject(label, color))


def _box(lo: tuple[float, ...], hi: tuple[float, ...], pattern: str = "") -> Part:
    return Part("box", np.asarray(lo, float), np.asarray(hi, float), -1, pattern=pattern)


def _cylinder(x: float, y: float, radius: float, z0: float, z1: float) -> Part:
    return Part("cylinder", np.array([x, y, z0]), np.array([x, y, z1]), -1, radius=radius)


def _legs(w: float, d: float, h: float, size: float = 0.05) -> list[Part]:
    xs, ys = (-w / 2, w / 2 - size), (-d / 2, d / 2 - size)
    return [_box((x, y, 0), (x + size, y + size, h)) for x in xs for y in ys]


def furniture_parts(label: str, rng: np.random.Generator) -> list[Part]:
    """Parts of one piece of furniture in its local frame: footprint centred at the origin,
    standing on z = 0, back towards +y."""
    u = rng.uniform
    if label == "bed":
        w, d = u(1.0, 1.6), u(1.9, 2.1)
        return [
            _box((-w / 2, -d / 2, 0), (w / 2, d / 2, 0.5)),
            _box((-w / 2, d / 2 - 0.08, 0.5), (w / 2, d / 2, u(0.9, 1.1))),
        ]
    if label == "chair":
        s, seat = u(0.42, 0.5), u(0.42, 0.48)
        return [
            *_legs(s, s, seat - 0.05),
            _box((-s / 2, -s / 2, seat - 0.05), (s / 2, s / 2, seat)),
            _box((-s / 2, s / 2 - 0.05, seat), (s / 2, s / 2, seat + u(0.4, 0.5))),
        ]
    if label == "couch":
        w, d = u(1.6, 2.2), u(0.8, 0.95)
        return [
            _box((-w / 2, -d / 2, 0), (w / 2, d / 2, 0.42)),
            _box((-w / 2, d / 2 - 0.22, 0.42), (w / 2, d / 2, 0.85)),
            _box((-w / 2, -d / 2, 0.42), (-w / 2 + 0.16, d / 2 - 0.22, 0.6)),
            _box((w / 2 - 0.16, -d / 2, 0.42), (w / 2, d / 2 - 0.22, 0.6)),
        ]
    if label in ("table", "desk"):
        w, d, h = (u(1.0, 1.6), u(0.7, 0.9), 0.74) if label == "table" else (u(1.1, 1.5), 0.6, 0.76)
        top = _box((-w / 2, -d / 2, h - 0.04), (w / 2, d / 2, h))
        if label == "table":
            return [top, *_legs(w, d, h - 0.04)]
        return [
            top,
            _box((-w / 2, -d / 2, 0), (-w / 2 + 0.04, d / 2, h - 0.04)),
            _box((w / 2 - 0.04, -d / 2, 0), (w / 2, d / 2, h - 0.04)),
        ]
    if label == "bookshelf":
        w, d, h = u(0.8, 1.0), 0.32, u(1.6, 2.0)
        return [_box((-w / 2, -d / 2, 0), (w / 2, d / 2, h), pattern="shelves")]
    if label == "cabinet":
        w, h = u(0.6, 1.2), u(0.7, 1.0)
        return [_box((-w / 2, -0.23, 0), (w / 2, 0.23, h))]
    if label == "refrigerator":
        return [_box((-0.35, -0.35, 0), (0.35, 0.35, u(1.7, 1.9)))]
    if label == "toilet":
        return [_cylinder(0.0, -0.05, 0.2, 0.0, 0.4), _box((-0.22, 0.15, 0), (0.22, 0.33, 0.75))]
    if label == "bathtub":
        w = u(1.5, 1.7)
        return [_box((-w / 2, -0.37, 0), (w / 2, 0.37, 0.55))]
    if label == "trash can":
        return [_cylinder(0.0, 0.0, u(0.12, 0.18), 0.0, u(0.3, 0.45))]
    raise ValueError(f"no furniture model for {label!r}")


def _rotate_parts(parts: list[Part], quarter_turns: int, offset: np.ndarray) -> list[Part]:
    """Rotate parts by ``quarter_turns`` x 90 degrees about z, then move them by ``offset``."""
    angle = quarter_turns * math.pi / 2
    rot = np.array([[round(math.cos(angle)), -round(math.sin(angle))],
                    [round(math.sin(angle)), round(math.cos(angle))]])  # fmt: skip
    moved = []
    for part in parts:
        lo, hi = part.lo.copy(), part.hi.copy()
        a, b = rot @ part.lo[:2], rot @ part.hi[:2]
        lo[:2], hi[:2] = (np.minimum(a, b), np.maximum(a, b)) if part.kind == "box" else (a, b)
        lo[:2] += offset
        hi[:2] += offset
        moved.append(Part(part.kind, lo, hi, part.obj, part.radius, part.pattern))
    return moved


def _footprint(parts: list[Part]) -> np.ndarray:
    """``(x0, y0, x1, y1)`` covering all parts."""
    lo = np.min([p.lo[:2] - p.radius for p in parts], axis=0)
    hi = np.max([p.hi[:2] + p.radius for p in parts], axis=0)
    return np.concatenate([lo, hi])


def _fits(rect: np.ndarray, taken: list[np.ndarray], room: Room, margin: float = 0.08) -> bool:
    half = np.array([room.width / 2, room.depth / 2])
    if (rect[:2] < -half).any() or (rect[2:] > half).any():
        return False
    for other in taken:
        if (rect[:2] < other[2:] + margin).all() and (other[:2] < rect[2:] + margin).all():
            return False
    # Keep the camera's orbit clear: distance from the orbit centre to the rectangle.
    nearest = np.clip(room.camera_center, rect[:2], rect[2:])
    return float(np.linalg.norm(nearest - room.camera_center)) > room.camera_radius + 0.45


def _place_furniture(room: Room, label: str, rng: np.random.Generator, taken: list) -> bool:
    """Try to place one piece (against a wall, or free-standing for tables and chairs)."""
    local = furniture_parts(label, rng)
    for _ in range(60):
        turns = int(rng.integers(4))
        free = label in ("table", "chair", "trash can") and rng.random() < 0.5
        parts = _rotate_parts(local, turns, np.zeros(2))
        rect = _footprint(parts)
        size = rect[2:] - rect[:2]
        half = np.array([room.width, room.depth]) / 2
        if free:
            center = rng.uniform(-half + size / 2, half - size / 2)
        else:  # back against the wall that local +y points to after the rotation
            normal = np.array([[0, 1], [-1, 0], [0, -1], [1, 0]][turns])
            along = rng.uniform(-half + size / 2, half - size / 2)
            center = np.where(normal != 0, normal * (half - size / 2 - 0.02), along)
        offset = center - (rect[:2] + rect[2:]) / 2
        rect = rect + np.tile(offset, 2)
        if _fits(rect, taken, room):
            taken.append(rect)
            color = np.asarray(CATEGORIES[label].color, float) + rng.normal(0, 12, 3)
            room.add_object(label, color, _rotate_parts(parts, 0, offset))
            return True
    return False


def _add_shell(room: Room, rng: np.random.Generator) -> None:
    """Floor, four walls (as 10 cm thick boxes outside the room), a door and pictures."""
    w, d, h, t = room.width / 2, room.depth / 2, room.height, 0.1
    floor_color = np.asarray(CATEGORIES["floor"].color, float) + rng.normal(0, 10, 3)
    room.add_object("floor", floor_color, [_box((-w - t, -d - t, -t), (w + t, d + t, 0), "planks")])
    wall_color = np.asarray(CATEGORIES["wall"].color, float) + rng.normal(0, 14, 3)
    walls = [
        ((-w - t, d, 0), (w + t, d + t, h)),
        ((-w - t, -d - t, 0), (-w, d + t, h)),
        ((-w - t, -d - t, 0), (w + t, -d, h)),
        ((w, -d - t, 0), (w + t, d + t, h)),
    ]
    for lo, hi in walls:  # same order as furniture rotations: +y, -x, -y, +x
        room.add_object("wall", wall_color, [_box(lo, hi)])
    # Part ids of the faces seen from inside, [axis, lo/hi side]; no ceiling (open, as scans).
    room.shell_face_part = np.array([[2, 4], [3, 1], [0, -1]])


def _add_wall_items(room: Room, rng: np.random.Generator, taken: list) -> None:
    """A door (keeping the floor in front of it free) and one or two pictures."""
    door_wall = int(rng.integers(4))
    for label, count in (("door", 1), ("picture", int(rng.integers(1, 3)))):
        for _ in range(count):
            wall = door_wall if label == "door" else int(rng.integers(4))
            if label == "picture" and wall == door_wall:
                wall = (wall + 2) % 4
            width, z0, z1 = (
                (0.9, 0.0, 2.05)
                if label == "door"
                else (rng.uniform(0.5, 1.0), rng.uniform(1.2, 1.4), rng.uniform(1.6, 1.9))
            )
            half_len = (room.width if wall % 2 == 0 else room.depth) / 2
            pos = rng.uniform(-half_len + width / 2 + 0.1, half_len - width / 2 - 0.1)
            thick = 0.04 if label == "door" else 0.03
            local = _box((pos - width / 2, -thick / 2, z0), (pos + width / 2, thick / 2, z1))
            normal = np.array([[0, 1], [-1, 0], [0, -1], [1, 0]][wall])
            wall_dist = (room.depth if wall % 2 == 0 else room.width) / 2 - thick / 2
            # Rotate so the local +y faces the wall, then push against it.
            part = _rotate_parts([local], wall, normal * wall_dist)[0]
            spread = 12 if label == "door" else 45  # pictures vary a lot
            color = np.asarray(CATEGORIES[label].color, float) + rng.normal(0, spread, 3)
            if label == "door":
                local_clear = _box((pos - 0.5, -0.8, 0), (pos + 0.5, 0, 1))
                clear = _rotate_parts([local_clear], wall, normal * wall_dist)[0]
                taken.append(np.concatenate([clear.lo[:2], clear.hi[:2]]))
            room.add_object(label, color, [part])


def build_room(rng: np.random.Generator) -> Room:
    """A random furnished room of a random ScanNet scene type."""
    scene_type = str(rng.choice(list(ROOM_TYPES)))
    small = scene_type == "Bathroom"
    room = Room(
        width=rng.uniform(2.8, 3.6) if small else rng.uniform(4.2, 6.0),
        depth=rng.uniform(2.6, 3.4) if small else rng.uniform(3.8, 5.5),
        height=rng.uniform(2.4, 2.8),
        scene_type=scene_type,
    )
    room.camera_radius = 0.15 * min(room.width, room.depth)
    room.camera_center = rng.uniform(-0.2, 0.2, 2)
    _add_shell(room, rng)
    taken: list[np.ndarray] = []
    _add_wall_items(room, rng, taken)
    wanted = rng.choice(ROOM_TYPES[scene_type], size=int(rng.integers(5, 9)))
    for label in wanted:
        _place_furniture(room, str(label), rng, taken)
    for _ in range(int(rng.integers(1, 3))):  # unannotated clutter (label 0, as in ScanNet)
        size = rng.uniform(0.2, 0.45, 3)
        for _ in range(30):
            center = rng.uniform(-1, 1, 2) * (np.array([room.width, room.depth]) / 2 - 0.4)
            rect = np.concatenate([center - size[:2] / 2, center + size[:2] / 2])
            if _fits(rect, taken, room):
                taken.append(rect)
                parts = [_box((*rect[:2], 0.0), (*rect[2:], size[2]))]
                room.add_object(None, rng.uniform(60, 200, 3), parts)
                break
    return room


def room_geometry(room: Room) -> tuple[Primitives, Shell]:
    """The room for the ray caster: objects as primitives (part ids index ``room.parts``,
    groups are object ids) and the floor + walls as the shell."""
    shell_parts = set(room.shell_face_part.reshape(-1).tolist())
    boxes = [i for i, p in enumerate(room.parts) if p.kind == "box" and i not in shell_parts]
    cylinders = [i for i, p in enumerate(room.parts) if p.kind == "cylinder"]
    parts = room.parts
    prims = Primitives(
        box_min=np.array([parts[i].lo for i in boxes]).reshape(-1, 3),
        box_max=np.array([parts[i].hi for i in boxes]).reshape(-1, 3),
        box_part=np.array(boxes, dtype=np.int64),
        box_group=np.array([parts[i].obj for i in boxes], dtype=np.int64),
        cyl_center=np.array([parts[i].lo[:2] for i in cylinders]).reshape(-1, 2),
        cyl_radius=np.array([parts[i].radius for i in cylinders]),
        cyl_z=np.array([[parts[i].lo[2], parts[i].hi[2]] for i in cylinders]).reshape(-1, 2),
        cyl_part=np.array(cylinders, dtype=np.int64),
        cyl_group=np.array([parts[i].obj for i in cylinders], dtype=np.int64),
    )
    half = np.array([room.width / 2, room.depth / 2])
    shell = Shell(np.array([*-half, 0.0]), np.array([*half, room.height]), room.shell_face_part)
    return prims, shell


# --------------------------------------------------------------------------- appearance


def albedo(room: Room, part_ids: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Surface colour (0..255 floats) of parts at aligned-frame points ``(N, 3)`` -> ``(N, 3)``."""
    colors = np.array([o.color for o in room.objects])
    part_obj = np.array([p.obj for p in room.parts])
    out = colors[part_obj[part_ids]].copy()
    patterns = np.array([p.pattern for p in room.parts])[part_ids]
    planks = patterns == "planks"
    if planks.any():  # 18 cm boards of varying tone with dark seams
        board = np.floor(points[planks, 0] / 0.18)
        tone = 0.82 + 0.18 * ((board * 0.618034) % 1.0)
        seam = (points[planks, 0] / 0.18) % 1.0 < 0.06
        out[planks] *= np.where(seam, 0.6, tone)[:, None]
    shelves = patterns == "shelves"
    if shelves.any():  # dark shelf boards and rows of "books"
        level = (points[shelves, 2] / 0.38) % 1.0
        book = np.floor(points[shelves, 0] / 0.05) + np.floor(points[shelves, 1] / 0.05)
        book_tone = 0.55 + 0.45 * ((book * 0.754877) % 1.0)
        out[shelves] *= np.where(level < 0.1, 0.5, book_tone)[:, None]
    return out


_LIGHT = np.array([0.35, -0.25, 0.9]) / np.linalg.norm([0.35, -0.25, 0.9])


def shade(room: Room, part_ids: np.ndarray, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Lambertian shading of the albedo under one soft light, ``(N, 3)`` floats."""
    light = 0.55 + 0.45 * np.clip(normals @ _LIGHT, 0.0, 1.0) + 0.1 * np.abs(normals[:, 0])
    return albedo(room, part_ids, points) * light[:, None]


# --------------------------------------------------------------------------- mesh


def _quad(corners: np.ndarray) -> trimesh.Trimesh:
    return trimesh.Trimesh(corners, [[0, 1, 2], [0, 2, 3]], process=False)


def _part_mesh(room: Room, part: Part) -> trimesh.Trimesh:
    """Mesh of a part; floor and walls are only their surface facing into the room."""
    label = room.objects[part.obj].label
    w, d, h = room.width / 2, room.depth / 2, room.height
    if label == "floor":
        return _quad(np.array([[-w, -d, 0], [w, -d, 0], [w, d, 0], [-w, d, 0]]))
    if label == "wall":
        center = (part.lo + part.hi) / 2
        if abs(center[1]) > d:  # +y or -y wall
            y = d if center[1] > 0 else -d
            return _quad(np.array([[-w, y, 0], [w, y, 0], [w, y, h], [-w, y, h]]))
        x = w if center[0] > 0 else -w
        return _quad(np.array([[x, -d, 0], [x, d, 0], [x, d, h], [x, -d, h]]))
    if part.kind == "cylinder":
        return trimesh.creation.cylinder(
            radius=part.radius, segment=[part.lo, part.hi], sections=24
        )
    return trimesh.creation.box(bounds=[part.lo, part.hi])


def room_mesh(room: Room) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triangle mesh of the room in the aligned frame.

    Returns vertices ``(N, 3)``, faces ``(M, 3)`` and the part id of every vertex ``(N,)``.
    """
    vertices, faces, part_of_vertex = [], [], []
    count = 0
    for part_id, part in enumerate(room.parts):
        mesh = _part_mesh(room, part)
        v, f = trimesh.remesh.subdivide_to_size(mesh.vertices, mesh.faces, max_edge=MESH_EDGE)
        vertices.append(v)
        faces.append(f + count)
        part_of_vertex.append(np.full(len(v), part_id))
        count += len(v)
    return np.concatenate(vertices), np.concatenate(faces), np.concatenate(part_of_vertex)


def segment_ids(vertices: np.ndarray, part_of_vertex: np.ndarray) -> np.ndarray:
    """Over-segmentation: one segment per (part, 1 m cell), ``np.int64 (N,)``."""
    cells = np.floor(vertices / SEGMENT_CELL).astype(np.int64)
    keys = np.concatenate([part_of_vertex[:, None], cells], axis=1)
    return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)


# --------------------------------------------------------------------------- camera


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world ``(4, 4)``: camera looks along +z, x right, y down (z is world up)."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, eye
    return pose


def camera_path(room: Room, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Camera-to-world poses ``(F, 4, 4)`` in the aligned frame: one orbit around the room
    centre, looking across the room and down at the furniture, with a little wobble."""
    start, turns = rng.uniform(0, 2 * math.pi), rng.choice([-1.0, 1.0])
    height, pitch = rng.uniform(1.25, 1.6), rng.uniform(0.3, 0.5)
    poses = np.empty((num_frames, 4, 4))
    for i in range(num_frames):
        angle = start + turns * 2 * math.pi * i / max(num_frames, 1)
        eye = np.array([*room.camera_center, height])
        eye[:2] += room.camera_radius * np.array([math.cos(angle), math.sin(angle)])
        eye[2] += 0.05 * math.sin(3 * angle)
        yaw = angle + math.pi + 0.35 * math.sin(2 * angle)  # through the centre
        tilt = pitch + 0.08 * math.cos(5 * angle)
        view = np.array([math.cos(yaw) * math.cos(tilt), math.sin(yaw) * math.cos(tilt),
                         -math.sin(tilt)])  # fmt: skip
        poses[i] = look_at(eye, eye + view)
    return poses


def intrinsics(width: int, height: int) -> np.ndarray:
    """``(4, 4)`` intrinsics with ScanNet's colour field of view at ``width x height``."""
    focal = _SCANNET_FX * width / _SCANNET_COLOR_WIDTH
    matrix = np.eye(4)
    matrix[0, 0] = matrix[1, 1] = focal
    matrix[0, 2], matrix[1, 2] = (width - 1) / 2, (height - 1) / 2
    return matrix


def scaled_intrinsics(intrinsic: np.ndarray, scale: float) -> np.ndarray:
    """The same camera at ``scale`` x the resolution (pixel centres at integer coordinates)."""
    out = intrinsic.copy()
    out[0, 0] *= scale
    out[1, 1] *= scale
    out[0, 2] = (intrinsic[0, 2] + 0.5) * scale - 0.5
    out[1, 2] = (intrinsic[1, 2] + 0.5) * scale - 0.5
    return out


# --------------------------------------------------------------------------- rendering


@dataclass
class FrameRenderer:
    """Renders colour ``(H, W, 3) uint8`` and depth ``(h, w) float32`` metres of one room."""

    room: Room
    color_view: PinholeView
    depth_view: PinholeView

    def __post_init__(self) -> None:
        self._prims, self._shell = room_geometry(self.room)

    def render(self, pose: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Colour and depth seen from camera-to-world ``pose`` ``(4, 4)`` (aligned frame)."""
        views = [self.color_view, self.depth_view]
        color_hits, depth_hits = render_views(pose, views, self._prims, self._shell)
        w, h = self.color_view.width, self.color_view.height

        hit = color_hits.part >= 0
        color = np.full((w * h, 3), 24.0)  # background where rays leave the room (no ceiling)
        rays = pixel_rays_world(self.color_view, pose)[hit]
        points = pose[:3, 3] + color_hits.t[hit, None] * rays
        color[hit] = shade(self.room, color_hits.part[hit], points, color_hits.normal[hit])
        color += rng.normal(0.0, 2.5, color.shape)  # sensor noise
        color_image = np.clip(color, 0, 255).astype(np.uint8).reshape(h, w, 3)

        depth = np.where(depth_hits.part >= 0, depth_hits.t, 0.0)
        depth[rng.random(depth.shape) < 0.01] = 0.0  # sensor dropouts (0 = no measurement)
        depth_image = depth.reshape(self.depth_view.height, self.depth_view.width)
        return color_image, depth_image.astype(np.float32)


def pixel_rays_world(view: PinholeView, pose: np.ndarray) -> np.ndarray:
    """World-frame ray directions (z = 1 in the camera) of every pixel, ``(H * W, 3)``."""
    return pixel_rays(view.intrinsic, view.width, view.height) @ pose[:3, :3].T


# --------------------------------------------------------------------------- writing


@dataclass
class SyntheticScanNetSummary:
    """What :func:`generate_synthetic_scannet` wrote."""

    root: Path
    scenes: list[str]
    splits: dict[str, list[str]]
    frames_per_scene: int
    invalid_pose_frames: dict[str, list[int]]
    empty_depth_frames: dict[str, list[int]]
    instances: dict[str, int]  # raw category -> number of instances over all scenes

    def to_dict(self) -> dict:
        return {
            "root": str(self.root),
            "scenes": self.scenes,
            "splits": self.splits,
            "frames_per_scene": self.frames_per_scene,
            "invalid_pose_frames": self.invalid_pose_frames,
            "empty_depth_frames": self.empty_depth_frames,
            "instances": self.instances,
        }


def _raw_from_aligned(rng: np.random.Generator) -> np.ndarray:
    """A random rotation about z plus a shift: where the scan "happened" to be recorded."""
    angle = rng.uniform(-math.pi, math.pi)
    transform = np.eye(4)
    transform[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    transform[:3, 3] = [*rng.uniform(-3, 3, 2), rng.uniform(-0.1, 0.1)]
    return transform


def _faulty_frames(num_frames: int, fraction: float, rng: np.random.Generator,
                   exclude: set[int]) -> list[int]:  # fmt: skip
    """``round(fraction * F)`` (at least one when ``fraction > 0``) frame ids not in exclude."""
    if fraction <= 0 or num_frames < 2:
        return []
    candidates = [i for i in range(num_frames) if i not in exclude]
    count = min(len(candidates), max(1, round(fraction * num_frames)))
    return sorted(int(i) for i in rng.choice(candidates, size=count, replace=False))


def _imu_records(num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """One plausible IMU record per frame (exercises the IMU block of the format)."""
    imu = np.zeros(num_frames, dtype=IMU_DTYPE)
    imu["rotation_rate"] = rng.normal(0, 0.05, (num_frames, 3))
    imu["acceleration"] = rng.normal(0, 0.02, (num_frames, 3))
    imu["magnetic_field"] = [20.0, 0.0, -40.0]
    imu["attitude"] = rng.normal(0, 0.1, (num_frames, 3))
    imu["gravity"] = [0.0, -1.0, 0.0]
    imu["timestamp"] = np.arange(num_frames, dtype=np.uint64) * _FRAME_MICROSECONDS
    return imu


@dataclass
class SceneSpec:
    """Rendering settings shared by all scenes of a run."""

    frames: int
    color_size: tuple[int, int] = (160, 120)
    depth_size: tuple[int, int] = (80, 60)
    invalid_pose_fraction: float = 0.05
    empty_depth_fraction: float = 0.05
    jpeg_quality: int = 90


def _sens_header(spec: SceneSpec, color_k: np.ndarray, depth_k: np.ndarray) -> SensHeader:
    return SensHeader(
        version=4, sensor_name="StructureSensor",
        intrinsic_color=color_k.astype(np.float32), extrinsic_color=np.eye(4, dtype=np.float32),
        intrinsic_depth=depth_k.astype(np.float32), extrinsic_depth=np.eye(4, dtype=np.float32),
        color_compression=COLOR_JPEG, depth_compression=DEPTH_ZLIB_USHORT,
        color_width=spec.color_size[0], color_height=spec.color_size[1],
        depth_width=spec.depth_size[0], depth_height=spec.depth_size[1],
        depth_shift=DEPTH_SHIFT, num_frames=spec.frames,
    )  # fmt: skip


def _scene_meta(
    spec: SceneSpec, color_k: np.ndarray, depth_k: np.ndarray, scene_type: str
) -> dict[str, object]:
    """The ``<scene>.txt`` keys ScanNet writes (``axisAlignment`` is added by the caller)."""
    return {
        "colorHeight": spec.color_size[1], "colorWidth": spec.color_size[0],
        "depthHeight": spec.depth_size[1], "depthWidth": spec.depth_size[0],
        "colorToDepthExtrinsics": np.eye(4),
        "fx_color": color_k[0, 0], "fy_color": color_k[1, 1],
        "mx_color": color_k[0, 2], "my_color": color_k[1, 2],
        "fx_depth": depth_k[0, 0], "fy_depth": depth_k[1, 1],
        "mx_depth": depth_k[0, 2], "my_depth": depth_k[1, 2],
        "numColorFrames": spec.frames, "numDepthFrames": spec.frames,
        "numIMUmeasurements": spec.frames, "sceneType": scene_type,
    }  # fmt: skip


def write_scene(scene_dir: Path, scene_id: str, spec: SceneSpec,
                rng: np.random.Generator) -> tuple[Room, list[int], list[int]]:  # fmt: skip
    """Generate one room and write all its ScanNet files into ``scene_dir``.

    Returns the room (aligned frame), the frames with ``-inf`` poses and the empty-depth ones.
    """
    scene_dir.mkdir(parents=True, exist_ok=True)
    room = build_room(rng)
    raw_from_aligned = _raw_from_aligned(rng)
    _write_scene_meshes(scene_dir, scene_id, room, raw_from_aligned)

    color_k = intrinsics(*spec.color_size)
    depth_k = scaled_intrinsics(color_k, spec.depth_size[0] / spec.color_size[0])
    header = _sens_header(spec, color_k, depth_k)
    invalid = _faulty_frames(spec.frames, spec.invalid_pose_fraction, rng, set())
    empty = _faulty_frames(spec.frames, spec.empty_depth_fraction, rng, set(invalid))
    poses = camera_path(room, spec.frames, rng)
    renderer = FrameRenderer(
        room, PinholeView(color_k, *spec.color_size), PinholeView(depth_k, *spec.depth_size)
    )

    def frames() -> Iterator[SensFrame]:
        for i, pose in enumerate(poses):
            color, depth = renderer.render(pose, rng)
            if i in empty:
                depth[:] = 0.0
            stored_pose = raw_from_aligned @ pose
            if i in invalid:  # ScanNet marks failed tracking with an all -inf matrix
                stored_pose = np.full((4, 4), -np.inf)
            yield SensFrame(
                index=i,
                camera_to_world=stored_pose.astype(np.float32),
                timestamp_color=i * _FRAME_MICROSECONDS,
                timestamp_depth=i * _FRAME_MICROSECONDS,
                color_bytes=encode_jpeg(color, spec.jpeg_quality),
                depth_bytes=encode_depth(depth, DEPTH_SHIFT),
            )

    write_sens(scene_dir / f"{scene_id}.sens", header, frames(), _imu_records(spec.frames, rng))
    meta = _scene_meta(spec, color_k, depth_k, room.scene_type)
    meta["axisAlignment"] = np.linalg.inv(raw_from_aligned)  # raw scan -> aligned room
    sf.write_scene_meta(scene_dir / f"{scene_id}.txt", meta)
    return room, invalid, empty


def _write_scene_meshes(
    scene_dir: Path, scene_id: str, room: Room, raw_from_aligned: np.ndarray
) -> None:
    """``_vh_clean_2.ply``, ``.labels.ply``, ``.segs.json`` and ``.aggregation.json``."""
    vertices, faces, part_of_vertex = room_mesh(room)
    colors = np.clip(albedo(room, part_of_vertex, vertices), 0, 255).astype(np.uint8)
    raw_vertices = vertices @ raw_from_aligned[:3, :3].T + raw_from_aligned[:3, 3]
    segments = segment_ids(vertices, part_of_vertex)
    obj_of_vertex = np.array([p.obj for p in room.parts])[part_of_vertex]
    object_labels = [CATEGORIES[o.label].nyu40id if o.label else 0 for o in room.objects]
    labels = np.array(object_labels)[obj_of_vertex]
    label_colors = np.array([NYU40_COLORS[int(label)] for label in labels], dtype=np.uint8)

    files = sf.scene_files(scene_dir.parent, scene_id)
    sf.write_mesh_ply(files["mesh"], raw_vertices, colors, faces)
    sf.write_mesh_ply(files["labels"], raw_vertices, label_colors, faces, labels=labels)
    sf.write_segs(files["segs"], scene_id, segments)
    groups = []
    for obj_id, obj in enumerate(room.objects):
        if obj.label is None:  # clutter stays unannotated
            continue
        segs = np.unique(segments[obj_of_vertex == obj_id]).tolist()
        groups.append(sf.SegGroup(len(groups), len(groups), segs, obj.label))
    sf.write_aggregation(files["aggregation"], scene_id, groups, files["segs"].name)


def label_table_rows(instances: dict[str, int]) -> list[dict[str, object]]:
    """Rows of ``scannetv2-labels.combined.tsv`` for the categories used here."""
    rows = []
    for row_id, cat in enumerate(CATEGORIES.values(), 1):
        rows.append({
            "id": row_id, "raw_category": cat.raw_category, "category": cat.raw_category,
            "count": instances.get(cat.raw_category, 0), "nyu40id": cat.nyu40id,
            "eigen13id": cat.eigen13id, "nyuClass": cat.raw_category,
            "nyu40class": cat.nyu40class, "eigen13class": cat.eigen13class,
            "mpcat40": cat.mpcat40, "mpcat40index": cat.mpcat40index,
        })  # fmt: skip
    return rows


def generate_synthetic_scannet(
    out: str | Path,
    num_scenes: int = 3,
    frames_per_scene: int = 60,
    seed: int = 0,
    *,
    color_size: tuple[int, int] = (160, 120),
    depth_size: tuple[int, int] = (80, 60),
    invalid_pose_fraction: float = 0.05,
    empty_depth_fraction: float = 0.05,
    val_fraction: float = 0.25,
    on_scene: Callable[[str], None] | None = None,
) -> SyntheticScanNetSummary:
    """Write a small synthetic ScanNet v2 under ``out`` (same seed -> identical bytes).

    ``color_size``/``depth_size`` are ``(width, height)``; the depth camera is the colour
    camera at a lower resolution (same aspect ratio required). The last
    ``round(val_fraction * num_scenes)`` scenes (at least one when there are two or more)
    form the val split. ``on_scene(scene_id)`` is called after each scene (progress).
    """
    if num_scenes < 1 or frames_per_scene < 1:
        raise ValueError("need at least one scene and one frame per scene")
    if color_size[0] * depth_size[1] != color_size[1] * depth_size[0]:
        raise ValueError(f"colour {color_size} and depth {depth_size} differ in aspect ratio")
    root = Path(out)
    scans = root / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    spec = SceneSpec(frames_per_scene, tuple(color_size), tuple(depth_size),
                     invalid_pose_fraction, empty_depth_fraction)  # fmt: skip
    scene_ids = [f"scene{i:04d}_00" for i in range(num_scenes)]
    invalid, empty, instances = {}, {}, Counter()
    for index, scene_id in enumerate(scene_ids):
        rng = np.random.default_rng([seed, index])  # scenes do not depend on num_scenes
        room, invalid[scene_id], empty[scene_id] = write_scene(scans / scene_id, scene_id, spec,
                                                               rng)  # fmt: skip
        instances.update(o.label for o in room.objects if o.label)
        if on_scene is not None:
            on_scene(scene_id)
    num_val = max(1, round(val_fraction * num_scenes)) if num_scenes >= 2 else 0
    splits = {"train": scene_ids[: num_scenes - num_val], "val": scene_ids[num_scenes - num_val :]}
    sf.write_split(root / "scannetv2_train.txt", splits["train"])
    sf.write_split(root / "scannetv2_val.txt", splits["val"])
    sf.write_label_table(root / "scannetv2-labels.combined.tsv", label_table_rows(instances))
    # Marks the root as synthetic: prepared data and model cards then say "synthetic-scannet".
    marker = {"generator": "cd2p synthetic scannet", "scenes": num_scenes, "seed": seed}
    atomic_write_bytes(root / SYNTHETIC_MARKER, json.dumps(marker).encode())
    return SyntheticScanNetSummary(
        root=root, scenes=scene_ids, splits=splits, frames_per_scene=frames_per_scene,
        invalid_pose_frames=invalid, empty_depth_frames=empty, instances=dict(instances),
    )  # fmt: skip
