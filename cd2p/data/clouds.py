"""A user's own point cloud or scan, from the usual files: PLY (ASCII or binary, vertices with
optional colours, normals and a ``label`` property; faces are kept for writing the scan back),
``.npy`` / ``.npz`` arrays and ``.txt`` / ``.xyz`` tables (``x y z [r g b]``).

Every command that takes a user's cloud (``cd2p predict ...``, ``cd2p caption``) reads it
through :func:`read_cloud`, which checks what it returns: finite coordinates, at least one
point. :func:`pretraining_view` gives a cloud the point preprocessing of pre-training (what the
exported student expects).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cd2p.data.scannet_files import read_mesh_ply

SUFFIXES = (".ply", ".npy", ".npz", ".txt", ".xyz")


@dataclass
class Cloud:
    """A point cloud as read from a file.

    points: ``(N, 3)`` float32. colors: ``(N, 3)`` uint8 or None. labels: ``(N,)`` int64 (a
    PLY ``label`` property) or None. faces: ``(M, 3)`` int64 (PLY meshes) or None.
    """

    points: np.ndarray
    colors: np.ndarray | None = None
    labels: np.ndarray | None = None
    faces: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.points)


def _colors_from_floats(values: np.ndarray) -> np.ndarray:
    """Colours given as numbers: 0..1 floats are scaled to 0..255."""
    values = np.asarray(values, dtype=np.float64)
    if values.size and values.max() <= 1.0:
        values = values * 255.0
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def _read_ply(path: Path) -> Cloud:
    head = path.read_bytes()[:512]
    if b"format binary_little_endian" in head:
        mesh = read_mesh_ply(path)
        faces = mesh.faces if len(mesh.faces) else None
        colors = None if mesh.colors is None else mesh.colors[:, :3]
        return Cloud(mesh.vertices, colors, mesh.labels, faces)
    import trimesh  # ASCII and big-endian PLY

    try:
        loaded = trimesh.load(str(path), process=False, force=None)
    except Exception as exc:  # noqa: BLE001  (trimesh raises many types on bad files)
        raise ValueError(f"{path}: cannot read this PLY ({exc})") from None
    vertices = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))), dtype=np.float32)
    colors = None
    visual = getattr(loaded, "visual", None)
    raw = getattr(visual, "vertex_colors", None) if visual is not None else None
    if raw is None and hasattr(loaded, "colors"):
        raw = loaded.colors
    if raw is not None and len(raw) == len(vertices):
        colors = np.asarray(raw)[:, :3].astype(np.uint8)
    faces = getattr(loaded, "faces", None)
    faces = np.asarray(faces, dtype=np.int64) if faces is not None and len(faces) else None
    return Cloud(vertices, colors, None, faces)


def _read_array(path: Path) -> np.ndarray:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            key = next((k for k in ("points", "xyz", "coord") if k in archive), None)
            if key is None:
                if len(archive.files) != 1:
                    raise ValueError(
                        f"{path}: expected an array named points, xyz or coord (or a single "
                        f"array), found {', '.join(archive.files)}"
                    )
                key = archive.files[0]
            return archive[key]
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    try:
        return np.loadtxt(path, dtype=np.float64, ndmin=2, delimiter=None)
    except ValueError:
        try:
            return np.loadtxt(path, dtype=np.float64, ndmin=2, delimiter=",")
        except ValueError as exc:
            raise ValueError(f"{path}: not a table of numbers ({exc})") from None


def read_cloud(path: str | Path) -> Cloud:
    """Read a point cloud (see the module docstring for the formats).

    Arrays and tables hold ``x y z`` in their first three columns and, with six or more
    columns, ``r g b`` in the next three (0..255, or 0..1 floats). Raises ``ValueError`` naming
    the file for anything else, including non-finite coordinates.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown point-cloud format; cd2p reads {', '.join(SUFFIXES)}")
    if suffix == ".ply":
        cloud = _read_ply(path)
    else:
        table = np.asarray(_read_array(path))
        if table.ndim != 2 or table.shape[1] < 3:
            raise ValueError(f"{path}: expected an (N, 3+) array of points, got {table.shape}")
        colors = _colors_from_floats(table[:, 3:6]) if table.shape[1] >= 6 else None
        cloud = Cloud(table[:, :3].astype(np.float32), colors)
    cloud.source = str(path)
    if len(cloud.points) == 0:
        raise ValueError(f"{path}: the cloud has no points")
    bad = ~np.isfinite(cloud.points).all(axis=1)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} point(s) have non-finite coordinates")
    return cloud


def pretraining_view(
    points: np.ndarray, num_points: int, voxel_size: float | None = None, seed: int = 0
) -> np.ndarray:
    """A cloud as pre-training saw its pairs: ``(N, 3)`` -> ``(num_points, 3)`` float32.

    The steps of ``cd2p prepare scannet`` and ``cd2p pretrain`` without their random
    augmentation: keep one point per occupied ``voxel_size`` voxel (the density-evening grid
    of the pairs; skipped when ``None``), draw exactly ``num_points`` of them (without
    replacement when there are enough, from a generator seeded by ``seed``), and move the
    centroid to the origin. Units and axes are kept: the pairs are metres, z up.
    """
    from cd2p.data.scannet_pairs import sample_exact, voxel_downsample

    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"expected a non-empty (N, 3) cloud, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("the cloud has non-finite coordinates")
    if voxel_size:
        # The grid works on coordinates relative to the cloud's corner: voxels are the same
        # whatever the cloud's offset, and far-away coordinates do not overflow the keys.
        kept = voxel_downsample(points - points.min(0), voxel_size)
        points = points[kept]
    rng = np.random.default_rng(seed)
    view = points[sample_exact(len(points), num_points, rng)]
    return (view - view.mean(0, dtype=np.float64)).astype(np.float32)


__all__ = ["SUFFIXES", "Cloud", "pretraining_view", "read_cloud"]
