"""A small vectorised ray caster for rooms: a box-shaped shell plus boxes and cylinders.

Used by the synthetic ScanNet generator to render RGB-D frames. All rays of a frame share one
origin (a pinhole camera). The room shell (floor and walls) is one analytic exit test per ray;
each object is then intersected, in a few numpy operations on ``(rays, primitives)`` arrays
(slab test for boxes, a quadratic plus caps for vertical cylinders), with only the pixels its
bounding box can cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEAR_CLIP = 0.05  # metres: surfaces closer to the camera than this are not seen (as a sensor)
# The 12 edges of a box whose 8 corners are indexed by bits (x, y, z) = (4, 2, 1).
_BOX_EDGES = np.array([(n, n | bit) for n in range(8) for bit in (1, 2, 4) if not n & bit])


@dataclass
class Primitives:
    """Solid geometry in one frame (the axis-aligned room frame).

    Boxes: ``box_min``/``box_max`` ``(B, 3)``; vertical cylinders: ``cyl_center`` ``(C, 2)``
    (x, y), ``cyl_radius`` ``(C,)``, ``cyl_z`` ``(C, 2)`` (bottom, top). ``box_part``/``cyl_part``
    are the caller's ids reported for hits; ``box_group``/``cyl_group`` bundle primitives into
    objects, the unit of view culling.
    """

    box_min: np.ndarray
    box_max: np.ndarray
    box_part: np.ndarray
    box_group: np.ndarray
    cyl_center: np.ndarray
    cyl_radius: np.ndarray
    cyl_z: np.ndarray
    cyl_part: np.ndarray
    cyl_group: np.ndarray

    def select(self, group: int) -> Primitives:
        """The primitives of one group."""
        b, c = self.box_group == group, self.cyl_group == group
        return Primitives(
            self.box_min[b], self.box_max[b], self.box_part[b], self.box_group[b],
            self.cyl_center[c], self.cyl_radius[c], self.cyl_z[c], self.cyl_part[c],
            self.cyl_group[c],
        )  # fmt: skip

    def group_bounds(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounds ``(lo (3,), hi (3,))`` of one group."""
        b, c = self.box_group == group, self.cyl_group == group
        radius = self.cyl_radius[c, None]
        cyl_lo = np.concatenate([self.cyl_center[c] - radius, self.cyl_z[c, :1]], axis=1)
        cyl_hi = np.concatenate([self.cyl_center[c] + radius, self.cyl_z[c, 1:]], axis=1)
        lo = np.concatenate([self.box_min[b], cyl_lo]).min(axis=0)
        hi = np.concatenate([self.box_max[b], cyl_hi]).max(axis=0)
        return lo, hi


@dataclass
class Shell:
    """The inside of a box-shaped room, seen from within: ``lo``/``hi`` ``(3,)`` and the part
    id of each face, ``face_part[axis, 0]`` for the ``lo`` side, ``[axis, 1]`` for ``hi``
    (-1: open, e.g. no ceiling)."""

    lo: np.ndarray
    hi: np.ndarray
    face_part: np.ndarray


@dataclass
class Hits:
    """Nearest hit per ray: ``t`` ``(R,)`` (inf = miss), ``part`` ``(R,)`` (-1 = miss),
    ``normal`` ``(R, 3)`` unit surface normal facing the ray."""

    t: np.ndarray
    part: np.ndarray
    normal: np.ndarray


@dataclass
class PinholeView:
    """A pinhole image: ``intrinsic`` ``(3, 3)`` or ``(4, 4)``, ``width`` x ``height``."""

    intrinsic: np.ndarray
    width: int
    height: int


def pixel_rays(intrinsic: np.ndarray, width: int, height: int) -> np.ndarray:
    """Camera-frame ray directions with z = 1 for every pixel, row-major, ``(H * W, 3)``.

    With z = 1, the ray parameter of a hit is its depth along the optical axis (what an RGB-D
    sensor stores), and pixel ``(u, v)`` back-projects as ``((u - cx) z / fx, (v - cy) z / fy, z)``.
    """
    fx, fy, cx, cy = intrinsic[0, 0], intrinsic[1, 1], intrinsic[0, 2], intrinsic[1, 2]
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], axis=-1).reshape(-1, 3)


def render_views(
    camera_to_world: np.ndarray, views: list[PinholeView], prims: Primitives, shell: Shell
) -> list[Hits]:
    """Cast every pixel of each view from one camera pose; one :class:`Hits` per view.

    Rays first hit the room shell (analytic), then each group is intersected only with the
    pixels inside the image rectangle its bounding box projects to, which keeps the work
    near ``pixels + sum(object areas)`` instead of ``pixels x primitives``.
    """
    rotation, origin = camera_to_world[:3, :3], camera_to_world[:3, 3]
    cam_rays = [pixel_rays(v.intrinsic, v.width, v.height) for v in views]
    directions = np.concatenate(cam_rays) @ rotation.T
    directions = np.where(np.abs(directions) < 1e-12, 1e-12, directions)  # no 0 * inf below
    hits = _cast_shell(origin, directions, shell)
    starts = np.cumsum([0] + [len(r) for r in cam_rays])
    for group in np.unique(np.concatenate([prims.box_group, prims.cyl_group])):
        lo, hi = prims.group_bounds(int(group))
        corners = np.stack(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij"), -1)
        corners_cam = (corners.reshape(-1, 3) - origin) @ rotation
        rows = [
            start + _covered_pixels(corners_cam, view)
            for start, view in zip(starts[:-1], views, strict=True)
        ]
        rows = np.concatenate(rows)
        if len(rows) == 0:
            continue
        sub = cast(origin, directions[rows], prims.select(int(group)))
        closer = sub.t < hits.t[rows]
        rows = rows[closer]
        hits.t[rows], hits.part[rows] = sub.t[closer], sub.part[closer]
        hits.normal[rows] = sub.normal[closer]
    return [
        Hits(hits.t[a:b], hits.part[a:b], hits.normal[a:b])
        for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]


def _covered_pixels(corners_cam: np.ndarray, view: PinholeView) -> np.ndarray:
    """Flat indices of the pixels a box (corners in camera frame, ``(8, 3)``) can cover."""
    front = corners_cam[:, 2] > NEAR_CLIP
    if not front.any():  # entirely behind the near plane
        return np.zeros(0, dtype=np.int64)
    points = corners_cam[front]
    if not front.all():  # clip to the near plane: add where the box edges cross it
        a, b = corners_cam[_BOX_EDGES[:, 0]], corners_cam[_BOX_EDGES[:, 1]]
        crossing = front[_BOX_EDGES[:, 0]] != front[_BOX_EDGES[:, 1]]
        a, b = a[crossing], b[crossing]
        s = (NEAR_CLIP - a[:, 2]) / (b[:, 2] - a[:, 2])
        points = np.concatenate([points, a + s[:, None] * (b - a)])
    k = view.intrinsic
    u = k[0, 0] * points[:, 0] / points[:, 2] + k[0, 2]
    v = k[1, 1] * points[:, 1] / points[:, 2] + k[1, 2]
    u0, u1 = max(int(np.floor(u.min())), 0), min(int(np.ceil(u.max())), view.width - 1)
    v0, v1 = max(int(np.floor(v.min())), 0), min(int(np.ceil(v.max())), view.height - 1)
    if u0 > u1 or v0 > v1:
        return np.zeros(0, dtype=np.int64)
    return (np.arange(v0, v1 + 1)[:, None] * view.width + np.arange(u0, u1 + 1)).reshape(-1)


def _cast_shell(origin: np.ndarray, d: np.ndarray, shell: Shell) -> Hits:
    """Where rays from inside the room leave it: the nearest face crossed."""
    side = (d > 0).astype(np.int64)  # 1: leaves through the hi face of that axis
    bounds = np.where(side == 1, shell.hi, shell.lo)
    t_axes = (bounds - origin) / d  # (R, 3), all >= 0 from inside
    axis = np.argmin(t_axes, axis=1)
    rows = np.arange(len(d))
    t = t_axes[rows, axis]
    part = shell.face_part[axis, side[rows, axis]]
    normal = np.zeros_like(d)
    normal[rows, axis] = -np.sign(d[rows, axis])
    t = np.where(part >= 0, t, np.inf)
    return Hits(t=t, part=part.copy(), normal=normal)


def cast(origin: np.ndarray, directions: np.ndarray, prims: Primitives) -> Hits:
    """Intersect rays ``origin + t * directions`` (``(3,)``, ``(R, 3)``) with all primitives."""
    directions = np.where(np.abs(directions) < 1e-12, 1e-12, directions)  # no 0 * inf below
    t_box, n_box, part_box = _cast_boxes(origin, directions, prims)
    t_cyl, n_cyl, part_cyl = _cast_cylinders(origin, directions, prims)
    use_cyl = t_cyl < t_box
    t = np.where(use_cyl, t_cyl, t_box)
    part = np.where(use_cyl, part_cyl, part_box)
    part[~np.isfinite(t)] = -1
    normal = np.where(use_cyl[:, None], n_cyl, n_box)
    return Hits(t=t, part=part, normal=normal)


def _cast_boxes(
    origin: np.ndarray, d: np.ndarray, prims: Primitives
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rays = len(d)
    if len(prims.box_part) == 0:
        return np.full(rays, np.inf), np.zeros((rays, 3)), np.full(rays, -1)
    inv = (1.0 / d)[:, None, :]  # (R, 1, 3)
    t1 = (prims.box_min - origin) * inv  # (R, B, 3): where each slab is crossed
    t2 = (prims.box_max - origin) * inv
    t_enter = np.minimum(t1, t2)
    t_near = t_enter.max(axis=2)  # the ray is inside the box after its last slab entry...
    t_far = np.maximum(t1, t2).min(axis=2)  # ...and until its first slab exit
    t_hit = np.where((t_far >= t_near) & (t_near > NEAR_CLIP), t_near, np.inf)
    best = np.argmin(t_hit, axis=1)
    rows = np.arange(rays)
    t = t_hit[rows, best]
    axis = t_enter[rows, best].argmax(axis=1)  # the face entered last is the one hit
    normal = np.zeros((rays, 3))
    normal[rows, axis] = -np.sign(d[rows, axis])  # the face entered faces the ray
    return t, normal, prims.box_part[best]


def _cast_cylinders(
    origin: np.ndarray, d: np.ndarray, prims: Primitives
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rays = len(d)
    if len(prims.cyl_part) == 0:
        return np.full(rays, np.inf), np.zeros((rays, 3)), np.full(rays, -1)
    ox = origin[0] - prims.cyl_center[:, 0]  # (C,)
    oy = origin[1] - prims.cyl_center[:, 1]
    dx, dy, dz = d[:, 0, None], d[:, 1, None], d[:, 2, None]  # (R, 1)
    a = dx**2 + dy**2
    b = 2.0 * (ox * dx + oy * dy)
    c = ox**2 + oy**2 - prims.cyl_radius**2
    disc = b**2 - 4.0 * a * c
    t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
    z_side = origin[2] + t_side * dz
    side_ok = (disc >= 0) & (t_side > NEAR_CLIP)
    side_ok &= (z_side >= prims.cyl_z[:, 0]) & (z_side <= prims.cyl_z[:, 1])
    t_side = np.where(side_ok, t_side, np.inf)
    # Caps: the plane the ray meets first (top if coming from above), inside the disc.
    cap_z = np.where(origin[2] > prims.cyl_z[:, 1], prims.cyl_z[:, 1], prims.cyl_z[:, 0])
    t_cap = (cap_z - origin[2]) / dz
    cap_in = (ox + t_cap * dx) ** 2 + (oy + t_cap * dy) ** 2 <= prims.cyl_radius**2
    t_cap = np.where(cap_in & (t_cap > NEAR_CLIP), t_cap, np.inf)
    t_all = np.minimum(t_side, t_cap)
    best = np.argmin(t_all, axis=1)
    rows = np.arange(rays)
    t = t_all[rows, best]
    on_side = t_side[rows, best] <= t_cap[rows, best]
    hit_x = ox[best] + t * d[:, 0]
    hit_y = oy[best] + t * d[:, 1]
    radius = prims.cyl_radius[best]
    normal = np.zeros((rays, 3))
    with np.errstate(invalid="ignore"):  # misses have t = inf; their normal is unused
        normal[:, 0] = np.where(on_side, hit_x / radius, 0.0)
        normal[:, 1] = np.where(on_side, hit_y / radius, 0.0)
    normal[:, 2] = np.where(on_side, 0.0, -np.sign(d[:, 2]))
    return t, np.nan_to_num(normal), prims.cyl_part[best]
