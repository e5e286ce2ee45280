"""Synthetic object benchmarks written in the real ModelNet40 and ShapeNetPart formats.

* ``synthetic_modelnet40``: 8 primitive classes (sphere, cube, cylinder, cone, torus,
  pyramid, octahedron, bowl). Every shape is a random deformation of its primitive (per-axis
  scale, taper, shear, a free rotation about the up axis and a small tilt) sampled on its
  surface with Gaussian noise, so the class is decided by topology and outline, not by size.
* ``synthetic_shapenetpart``: composite objects of six ShapeNetPart categories with their
  standard part ids (Airplane: body / wing / tail / engine; Chair: back / seat / leg / arm;
  Guitar; Lamp; Mug; Table). Part proportions are random and optional parts (engines, arms,
  bulb, table shelf) are present in only some shapes, so a part absent from a shape is a
  normal case for the metrics.

Both are small but real learning problems for short CPU runs. Shapes are y-up, as in
ShapeNet. Points are drawn on triangle meshes area-uniformly; normals are the faces' normals
after deformation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import trimesh.creation as tc

from cd2p._atomic import atomic_write_text
from cd2p.data.common import SYNTHETIC_MARKER, progress_bar
from cd2p.data.modelnet40 import write_modelnet40
from cd2p.data.shapenetpart import STANDARD_PARTS, STANDARD_SYNSETS, write_shapenetpart

Mesh = tuple[np.ndarray, np.ndarray]  # vertices (V, 3) float64, faces (F, 3) int64
Part = tuple[Mesh, int]  # a mesh and its part id


# -- meshes and sampling --------------------------------------------------------------------


def _mesh(m) -> Mesh:
    return np.asarray(m.vertices, dtype=np.float64), np.asarray(m.faces, dtype=np.int64)


_Z_TO_Y = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # rotation taking +z to +y


def _y_up(mesh: Mesh) -> Mesh:
    """trimesh builds along z; our shapes are y-up."""
    return mesh[0] @ _Z_TO_Y.T, mesh[1]


def _moved(mesh: Mesh, offset: Sequence[float]) -> Mesh:
    return mesh[0] + np.asarray(offset, dtype=np.float64), mesh[1]


def box(size: Sequence[float], center: Sequence[float] = (0, 0, 0)) -> Mesh:
    """Axis-aligned box of ``size`` (x, y, z) at ``center``."""
    return _moved(_mesh(tc.box(extents=size)), center)


def cylinder_y(radius: float, height: float, center: Sequence[float] = (0, 0, 0)) -> Mesh:
    """Closed cylinder along y."""
    return _moved(_y_up(_mesh(tc.cylinder(radius, height, sections=24))), center)


def revolved_y(profile: Sequence[tuple[float, float]], center: Sequence[float] = (0, 0, 0)) -> Mesh:
    """Surface of revolution about y of a ``(radius, height)`` polyline (open where it is)."""
    return _moved(_y_up(_mesh(tc.revolve(np.asarray(profile, float), sections=32))), center)


def sample_surface(
    parts: Sequence[Part], num_points: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area-uniform points on the union of ``parts``.

    Returns ``points (N, 3)``, unit ``normals (N, 3)`` and ``labels (N,)`` (the part id of the
    face each point lies on).
    """
    tris, labels = [], []
    for (verts, faces), part in parts:
        tris.append(verts[faces])
        labels.append(np.full(len(faces), part))
    tri = np.concatenate(tris)  # (F, 3, 3)
    face_labels = np.concatenate(labels)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = np.linalg.norm(cross, axis=1)
    chosen = rng.choice(len(tri), size=num_points, p=area / area.sum())
    u, v = rng.random((2, num_points))
    flip = u + v > 1  # fold the unit square onto the triangle
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    t = tri[chosen]
    points = t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])
    normals = cross[chosen] / np.maximum(area[chosen], 1e-12)[:, None]
    return points, normals, face_labels[chosen]


def _rotation_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rotation_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def deform(
    parts: Sequence[Part],
    rng: np.random.Generator,
    scale: float,
    taper: float,
    shear: float,
    yaw: float,
    tilt: float,
) -> list[Part]:
    """One random smooth deformation applied to every part's vertices (faces follow)."""
    s = rng.uniform(1 - scale, 1 + scale, 3)
    t = rng.uniform(-taper, taper)
    sh = np.eye(3)
    sh[0, 1], sh[2, 1] = rng.uniform(-shear, shear, 2)
    rot = _rotation_y(rng.uniform(-yaw, yaw)) @ _rotation_x(rng.uniform(-tilt, tilt))
    out = []
    for (verts, faces), part in parts:
        v = verts * s
        v = v * np.stack([1 + t * v[:, 1], np.ones(len(v)), 1 + t * v[:, 1]], 1)  # taper along y
        out.append((((v @ sh.T) @ rot.T, faces), part))
    return out


# -- ModelNet40-format primitives -----------------------------------------------------------


def _pyramid() -> Mesh:
    verts = np.array([[-1, 0, -1], [1, 0, -1], [1, 0, 1], [-1, 0, 1], [0, 1.6, 0]], float)
    faces = np.array([[0, 1, 2], [0, 2, 3], [0, 4, 1], [1, 4, 2], [2, 4, 3], [3, 4, 0]])
    return _moved((verts, faces), (0, -0.6, 0))


def _octahedron() -> Mesh:
    verts = np.array(
        [[1, 0, 0], [-1, 0, 0], [0, 1.2, 0], [0, -1.2, 0], [0, 0, 1], [0, 0, -1]], float
    )
    faces = np.array(
        [[0, 2, 4], [4, 2, 1], [1, 2, 5], [5, 2, 0], [0, 4, 3], [4, 1, 3], [1, 5, 3], [5, 0, 3]]
    )
    return verts, faces


PRIMITIVES: dict[str, Callable[[], Mesh]] = {
    "sphere": lambda: _mesh(tc.icosphere(subdivisions=3)),
    "cube": lambda: box((1.6, 1.6, 1.6)),
    "cylinder": lambda: cylinder_y(0.7, 2.0),
    "cone": lambda: _moved(_y_up(_mesh(tc.cone(1.0, 2.0, sections=32))), (0, -0.8, 0)),
    "torus": lambda: _mesh(tc.torus(1.0, 0.35, 32, 16)),  # ring in the xy plane: stands up
    "pyramid": _pyramid,
    "octahedron": _octahedron,
    "bowl": lambda: revolved_y(
        [(1.0 * math.sin(a), -math.cos(a)) for a in np.linspace(0.05, math.pi / 2, 10)]
    ),
}


def primitive_shape(
    name: str, rng: np.random.Generator, num_points: int, noise: float = 0.01
) -> np.ndarray:
    """A randomly deformed, noisy sample of primitive ``name`` -> ``(num_points, 6)`` xyz+normal."""
    if name not in PRIMITIVES:
        raise ValueError(f"unknown primitive {name!r}; known: {', '.join(PRIMITIVES)}")
    parts = deform(
        [(PRIMITIVES[name](), 0)],
        rng,
        scale=0.3,
        taper=0.25,
        shear=0.2,
        yaw=math.pi,
        tilt=math.radians(10),
    )
    points, normals, _ = sample_surface(parts, num_points, rng)
    points = points + rng.normal(0, noise, points.shape)
    return np.concatenate([points, normals], 1).astype(np.float32)


def synthetic_modelnet40(
    out: str | Path,
    num_classes: int = 8,
    train_per_class: int = 40,
    test_per_class: int = 10,
    num_points: int = 2048,
    noise: float = 0.01,
    seed: int = 0,
    show_progress: bool = True,
) -> Path:
    """Write a ModelNet40-format dataset of ``num_classes`` (<= 8) deformed primitives."""
    if not 2 <= num_classes <= len(PRIMITIVES):
        raise ValueError(f"num_classes must be in [2, {len(PRIMITIVES)}], got {num_classes}")
    names = list(PRIMITIVES)[:num_classes]
    rng = np.random.default_rng(seed)
    splits: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "test": []}
    counts = {"train": train_per_class, "test": test_per_class}
    with progress_bar(show_progress) as bar:
        task = bar.add_task(
            "synthetic shapes", total=num_classes * (train_per_class + test_per_class)
        )
        for split, count in counts.items():
            for name in names:
                for _ in range(count):
                    splits[split].append((name, primitive_shape(name, rng, num_points, noise)))
                    bar.advance(task)
    write_modelnet40(out, names, splits)
    # Marks the folder as synthetic, so that caches and model cards never call it ModelNet40.
    marker = {"generator": "synthetic_modelnet40", "seed": seed, "classes": names}
    atomic_write_text(Path(out) / SYNTHETIC_MARKER, json.dumps(marker))
    return Path(out)


# -- ShapeNetPart-format composites ---------------------------------------------------------


def _airplane(rng: np.random.Generator) -> list[Part]:
    body, wing, tail, engine = STANDARD_PARTS["Airplane"]
    length, radius = rng.uniform(1.8, 2.4), rng.uniform(0.12, 0.2)
    span, chord = rng.uniform(1.6, 2.4), rng.uniform(0.3, 0.5)
    fuselage = _mesh(tc.capsule(height=length, radius=radius))  # along z = the flight axis
    parts = [
        (fuselage, body),
        (box((span, 0.04, chord), (0, 0, rng.uniform(-0.1, 0.2))), wing),
        (box((0.04, rng.uniform(0.3, 0.5), 0.25), (0, 0.25, -length / 2)), tail),
        (box((rng.uniform(0.5, 0.8), 0.03, 0.18), (0, 0.05, -length / 2)), tail),
    ]
    if rng.random() < 0.6:  # engines under the wings, in some planes only
        for side in (-1, 1):
            pod = _mesh(tc.cylinder(0.08, 0.4, sections=16))
            parts.append((_moved(pod, (side * span * 0.3, -0.12, 0.1)), engine))
    return parts


def _chair(rng: np.random.Generator) -> list[Part]:
    back, seat, leg, arm = STANDARD_PARTS["Chair"]
    w, d, h = rng.uniform(0.8, 1.1), rng.uniform(0.8, 1.0), rng.uniform(0.7, 1.0)
    parts = [
        (box((w, 0.08, d), (0, h, 0)), seat),
        (box((w, rng.uniform(0.6, 1.0), 0.08), (0, h + 0.4, -d / 2)), back),
    ]
    for sx in (-1, 1):
        for sz in (-1, 1):
            parts.append(
                (box((0.07, h, 0.07), (sx * (w / 2 - 0.05), h / 2, sz * (d / 2 - 0.05))), leg)
            )
    if rng.random() < 0.5:
        for sx in (-1, 1):
            parts.append((box((0.07, 0.07, d), (sx * w / 2, h + 0.3, 0)), arm))
    return parts


def _guitar(rng: np.random.Generator) -> list[Part]:
    head, neck, body = STANDARD_PARTS["Guitar"]
    r = rng.uniform(0.45, 0.6)
    lower = _mesh(tc.icosphere(subdivisions=2))
    lower = (lower[0] * [r, r * 1.2, 0.15], lower[1])
    neck_len = rng.uniform(1.0, 1.4)
    return [
        (lower, body),
        (box((0.12, neck_len, 0.06), (0, r * 1.2 + neck_len / 2, 0)), neck),
        (box((0.2, 0.3, 0.07), (0, r * 1.2 + neck_len + 0.15, 0)), head),
    ]


def _lamp(rng: np.random.Generator) -> list[Part]:
    base, pole, shade, bulb = STANDARD_PARTS["Lamp"]
    height = rng.uniform(1.2, 1.8)
    top, bottom = rng.uniform(0.15, 0.3), rng.uniform(0.4, 0.6)
    parts = [
        (cylinder_y(rng.uniform(0.3, 0.45), 0.08, (0, 0.04, 0)), base),
        (cylinder_y(0.04, height, (0, height / 2, 0)), pole),
        (revolved_y([(bottom, 0.0), (top, 0.4)], (0, height - 0.2, 0)), shade),
    ]
    if rng.random() < 0.5:
        sphere = _mesh(tc.icosphere(subdivisions=1, radius=0.1))
        parts.append((_moved(sphere, (0, height - 0.05, 0)), bulb))
    return parts


def _mug(rng: np.random.Generator) -> list[Part]:
    body, handle = STANDARD_PARTS["Mug"]
    r, h = rng.uniform(0.35, 0.5), rng.uniform(0.7, 1.1)
    ring = _mesh(tc.torus(h * 0.28, 0.05, 24, 8))  # in the xy plane: a vertical handle
    return [
        (revolved_y([(0.0, 0.0), (r, 0.0), (r, h)]), body),
        (_moved((ring[0] * [1.0, 1.0, 1.0], ring[1]), (r + h * 0.15, h / 2, 0)), handle),
    ]


def _table(rng: np.random.Generator) -> list[Part]:
    top, leg, shelf = STANDARD_PARTS["Table"]
    w, d, h = rng.uniform(1.2, 2.0), rng.uniform(0.7, 1.1), rng.uniform(0.7, 1.0)
    parts = [(box((w, 0.08, d), (0, h, 0)), top)]
    for sx in (-1, 1):
        for sz in (-1, 1):
            parts.append(
                (box((0.08, h, 0.08), (sx * (w / 2 - 0.08), h / 2, sz * (d / 2 - 0.08))), leg)
            )
    if rng.random() < 0.5:
        parts.append((box((w - 0.2, 0.05, d - 0.2), (0, h * 0.3, 0)), shelf))
    return parts


COMPOSITES: dict[str, Callable[[np.random.Generator], list[Part]]] = {
    "Airplane": _airplane,
    "Chair": _chair,
    "Guitar": _guitar,
    "Lamp": _lamp,
    "Mug": _mug,
    "Table": _table,
}


def composite_shape(
    category: str, rng: np.random.Generator, num_points: int, noise: float = 0.005
) -> tuple[np.ndarray, np.ndarray]:
    """A random object of ``category`` -> ``(points (N, 6) xyz+normal, parts (N,))``."""
    if category not in COMPOSITES:
        raise ValueError(f"unknown category {category!r}; known: {', '.join(COMPOSITES)}")
    parts = deform(
        COMPOSITES[category](rng),
        rng,
        scale=0.15,
        taper=0.1,
        shear=0.1,
        yaw=math.radians(15),
        tilt=math.radians(5),
    )
    points, normals, labels = sample_surface(parts, num_points, rng)
    points = points + rng.normal(0, noise, points.shape)
    return np.concatenate([points, normals], 1).astype(np.float32), labels.astype(np.int64)


def synthetic_shapenetpart(
    out: str | Path,
    categories: Sequence[str] = tuple(COMPOSITES),
    train_per_category: int = 40,
    val_per_category: int = 5,
    test_per_category: int = 10,
    points_range: tuple[int, int] = (2048, 2800),
    seed: int = 0,
    show_progress: bool = True,
) -> Path:
    """Write a ShapeNetPart-format dataset of composite objects with labelled parts.

    Every shape has a random number of points in ``points_range`` (like the real data,
    where shapes differ in size).
    """
    unknown = [c for c in categories if c not in COMPOSITES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; known: {', '.join(COMPOSITES)}")
    rng = np.random.default_rng(seed)
    counts = {"train": train_per_category, "val": val_per_category, "test": test_per_category}
    splits: dict[str, list] = {split: [] for split in counts}
    with progress_bar(show_progress) as bar:
        task = bar.add_task("synthetic parts", total=len(categories) * sum(counts.values()))
        for split, count in counts.items():
            for category in categories:
                for i in range(count):
                    n = int(rng.integers(points_range[0], points_range[1] + 1))
                    points, parts = composite_shape(category, rng, n)
                    shape_id = f"{split}{i:05d}{category.lower()}"
                    splits[split].append((STANDARD_SYNSETS[category], shape_id, points, parts))
                    bar.advance(task)
    write_shapenetpart(out, [(c, STANDARD_SYNSETS[c]) for c in categories], splits)
    marker = {"generator": "synthetic_shapenetpart", "seed": seed, "categories": list(categories)}
    atomic_write_text(Path(out) / SYNTHETIC_MARKER, json.dumps(marker))
    return Path(out)


__all__ = [
    "COMPOSITES",
    "PRIMITIVES",
    "composite_shape",
    "primitive_shape",
    "sample_surface",
    "synthetic_modelnet40",
    "synthetic_shapenetpart",
]
