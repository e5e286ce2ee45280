"""ScanNet's scene-level files: readers for the real ones and writers with the same layout.

Per scene ``scans/<scene>/``: ``<scene>_vh_clean_2.ply`` (binary mesh with RGBA vertex
colours), ``<scene>_vh_clean_2.labels.ply`` (same vertices, ``label`` = nyu40 id),
``<scene>_vh_clean_2.0.010000.segs.json`` (over-segmentation, one segment id per vertex),
``<scene>.aggregation.json`` (objects = groups of segments with a raw category) and
``<scene>.txt`` (``key = value`` metadata incl. ``axisAlignment``). Dataset-level: split lists
(one scene id per line) and ``scannetv2-labels.combined.tsv`` (raw category -> nyu40 id, ...).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cd2p._atomic import atomic_write_bytes

# Columns of ScanNet's scannetv2-labels.combined.tsv, in ScanNet's order.
LABEL_TABLE_COLUMNS = (
    "id",
    "raw_category",
    "category",
    "count",
    "nyu40id",
    "eigen13id",
    "nyuClass",
    "nyu40class",
    "eigen13class",
    "ModelNet40",
    "ModelNet10",
    "ShapeNetCore55",
    "synsetoffset",
    "wnsynsetid",
    "wnsynsetkey",
    "mpcat40",
    "mpcat40index",
)

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "<i2", "int16": "<i2", "ushort": "<u2", "uint16": "<u2",
    "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4",
    "float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8",
}  # fmt: skip
_MAX_PLY_HEADER = 1 << 16


def scene_files(scans_root: str | Path, scene_id: str) -> dict[str, Path]:
    """Standard paths of one scene's files under ``scans_root`` (``ROOT/scans``)."""
    scene_dir = Path(scans_root) / scene_id
    return {
        "sens": scene_dir / f"{scene_id}.sens",
        "mesh": scene_dir / f"{scene_id}_vh_clean_2.ply",
        "labels": scene_dir / f"{scene_id}_vh_clean_2.labels.ply",
        "segs": scene_dir / f"{scene_id}_vh_clean_2.0.010000.segs.json",
        "aggregation": scene_dir / f"{scene_id}.aggregation.json",
        "meta": scene_dir / f"{scene_id}.txt",
    }


# --------------------------------------------------------------------------- meshes (.ply)


@dataclass
class PlyMesh:
    """A triangle mesh as ScanNet stores it.

    ``vertices`` ``np.float32 (N, 3)``, ``colors`` ``np.uint8 (N, 3 or 4)`` (RGB[A]) or None,
    ``faces`` ``np.int64 (M, 3)``, ``labels`` ``np.int64 (N,)`` (the ``label`` property of
    ``.labels.ply``) or None; ``vertex_properties`` holds every vertex property by name.
    """

    vertices: np.ndarray
    colors: np.ndarray | None
    faces: np.ndarray
    labels: np.ndarray | None
    vertex_properties: dict[str, np.ndarray]


def write_mesh_ply(
    path: str | Path,
    vertices: np.ndarray,
    colors: np.ndarray,
    faces: np.ndarray,
    labels: np.ndarray | None = None,
) -> None:
    """Binary little-endian ply as ScanNet's: x y z float, red green blue alpha uchar,
    optional ushort ``label``, faces as ``list uchar int vertex_indices``.

    ``vertices`` (N, 3), ``colors`` (N, 3) or (N, 4) uint8, ``faces`` (M, 3), ``labels`` (N,).
    """
    vertices = np.asarray(vertices, dtype=np.float32)
    colors = np.asarray(colors, dtype=np.uint8)
    if colors.shape[1] == 3:
        colors = np.concatenate([colors, np.full((len(colors), 1), 255, np.uint8)], axis=1)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    fields += [(c, "u1") for c in ("red", "green", "blue", "alpha")]
    if labels is not None:
        fields.append(("label", "<u2"))
    vertex = np.empty(len(vertices), dtype=fields)
    for axis, name in enumerate("xyz"):
        vertex[name] = vertices[:, axis]
    for channel, name in enumerate(("red", "green", "blue", "alpha")):
        vertex[name] = colors[:, channel]
    if labels is not None:
        vertex["label"] = labels
    face = np.empty(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
    face["n"] = 3
    face["v"] = faces
    type_names = {"<f4": "float", "u1": "uchar", "<u2": "ushort"}
    lines = ["ply", "format binary_little_endian 1.0", "comment MLIB generated"]
    lines.append(f"element vertex {len(vertex)}")
    lines += [f"property {type_names[t]} {n}" for n, t in fields]
    lines += [f"element face {len(face)}", "property list uchar int vertex_indices", "end_header"]
    header = ("\n".join(lines) + "\n").encode("ascii")
    atomic_write_bytes(path, header + vertex.tobytes() + face.tobytes())


def read_mesh_ply(path: str | Path) -> PlyMesh:
    """Read a binary little-endian triangle-mesh ply (ScanNet's ``_vh_clean_2[.labels].ply``)."""
    path = Path(path)
    data = path.read_bytes()
    end = data.find(b"end_header\n", 0, _MAX_PLY_HEADER)
    if not data.startswith(b"ply") or end < 0:
        raise ValueError(f"{path}: not a ply file (no 'ply' magic or no end_header)")
    elements = _parse_ply_header(path, data[:end].decode("ascii", errors="replace"))
    offset = end + len(b"end_header\n")
    arrays: dict[str, np.ndarray] = {}
    for name, count, dtype in elements:
        need = count * dtype.itemsize
        if offset + need > len(data):
            raise ValueError(f"{path}: truncated: element {name!r} needs {need} bytes at {offset}")
        arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        offset += need
    if "vertex" not in arrays:
        raise ValueError(f"{path}: no vertex element")
    vertex = arrays["vertex"]
    props = {n: np.array(vertex[n]) for n in vertex.dtype.names}
    colors = None
    if all(c in props for c in ("red", "green", "blue")):
        channels = [c for c in ("red", "green", "blue", "alpha") if c in props]
        colors = np.stack([props[c] for c in channels], axis=1).astype(np.uint8)
    faces = np.zeros((0, 3), np.int64)
    if "face" in arrays:
        face = arrays["face"]
        if len(face) and not (face["n"] == 3).all():
            raise ValueError(f"{path}: only triangle faces are supported")
        faces = face["v"].astype(np.int64)
    return PlyMesh(
        vertices=np.stack([props[a] for a in "xyz"], axis=1).astype(np.float32),
        colors=colors,
        faces=faces,
        labels=props["label"].astype(np.int64) if "label" in props else None,
        vertex_properties=props,
    )


def _parse_ply_header(path: Path, header: str) -> list[tuple[str, int, np.dtype]]:
    """``[(element name, count, numpy record dtype)]``; faces become ``n`` + ``v`` (3,)."""
    lines = [line.split() for line in header.splitlines()[1:] if line.strip()]
    elements: list[tuple[str, int, list]] = []
    for words in lines:
        keyword = words[0]
        if keyword == "format" and words[1] != "binary_little_endian":
            raise ValueError(f"{path}: ply format {words[1]!r} unsupported (binary_little_endian)")
        if keyword == "element":
            elements.append((words[1], int(words[2]), []))
        elif keyword == "property":
            if not elements:
                raise ValueError(f"{path}: ply property before any element")
            fields = elements[-1][2]
            if words[1] == "list":
                count_type, index_type = _PLY_TYPES[words[2]], _PLY_TYPES[words[3]]
                # Triangle meshes: every list has 3 entries; checked after reading.
                fields += [("n", count_type), ("v", index_type, (3,))]
            elif words[1] in _PLY_TYPES:
                fields.append((words[2], _PLY_TYPES[words[1]]))
            else:
                raise ValueError(f"{path}: unknown ply property type {words[1]!r}")
    return [(name, count, np.dtype(fields)) for name, count, fields in elements]


# --------------------------------------------------------------------------- segments / objects


@dataclass
class SegGroup:
    """One annotated object of ``<scene>.aggregation.json``."""

    id: int
    object_id: int
    segments: list[int]
    label: str


def write_segs(path: str | Path, scene_id: str, seg_indices: Sequence[int] | np.ndarray) -> None:
    """``<scene>_vh_clean_2.0.010000.segs.json``: one segment id per mesh vertex."""
    payload = {
        "params": {"kThresh": "0.01", "segMinVerts": "20", "minPoints": "750",
                   "maxPoints": "30000", "thinThresh": "0.05", "flatThresh": "0.001",
                   "minLength": "0.02", "maxLength": "1"},
        "sceneId": scene_id,
        "segIndices": [int(s) for s in np.asarray(seg_indices).reshape(-1)],
    }  # fmt: skip
    atomic_write_bytes(path, json.dumps(payload).encode())


def read_segs(path: str | Path) -> np.ndarray:
    """Segment id per vertex, ``np.int64 (N,)``."""
    payload = _read_json(path)
    if "segIndices" not in payload:
        raise ValueError(f"{path}: no 'segIndices' key (not a ScanNet segs.json)")
    return np.asarray(payload["segIndices"], dtype=np.int64)


def write_aggregation(
    path: str | Path, scene_id: str, groups: Iterable[SegGroup], segs_file: str
) -> None:
    """``<scene>.aggregation.json`` with ScanNet's keys."""
    payload = {
        "sceneId": f"scannet.{scene_id}",
        "appId": "Aggregator.v2",
        "segGroups": [
            {"id": g.id, "objectId": g.object_id, "segments": [int(s) for s in g.segments],
             "label": g.label}
            for g in groups
        ],
        "segmentsFile": f"scannet.{segs_file}",
    }  # fmt: skip
    atomic_write_bytes(path, json.dumps(payload, indent=1).encode())


def read_aggregation(path: str | Path) -> list[SegGroup]:
    """The annotated objects of an aggregation file."""
    payload = _read_json(path)
    try:
        return [
            SegGroup(int(g["id"]), int(g["objectId"]), [int(s) for s in g["segments"]], g["label"])
            for g in payload["segGroups"]
        ]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: malformed aggregation file (missing {exc})") from None


def vertex_labels(
    seg_indices: np.ndarray, groups: Sequence[SegGroup], raw_to_nyu40: Mapping[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-vertex nyu40 label and instance id from segments + aggregation.

    Returns ``(semantic, instance)``, both ``np.int64 (N,)``; 0 means unannotated, instance ids
    are ``objectId + 1`` (ScanNet's convention). Categories missing from the label table map
    to 0.
    """
    semantic = np.zeros(len(seg_indices), dtype=np.int64)
    instance = np.zeros(len(seg_indices), dtype=np.int64)
    for group in groups:
        mask = np.isin(seg_indices, group.segments)
        semantic[mask] = raw_to_nyu40.get(group.label, 0)
        instance[mask] = group.object_id + 1
    return semantic, instance


def _read_json(path: str | Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from None


# --------------------------------------------------------------------------- <scene>.txt


def write_scene_meta(path: str | Path, meta: Mapping[str, object]) -> None:
    """``<scene>.txt``: ``key = value`` lines, arrays written as space-separated numbers."""
    lines = []
    for key in sorted(meta):
        value = meta[key]
        if isinstance(value, np.ndarray | list | tuple):
            value = " ".join(f"{float(v):.6f}" for v in np.asarray(value).reshape(-1))
        elif isinstance(value, float | np.floating):
            value = f"{float(value):.6f}"
        lines.append(f"{key} = {value}")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def read_scene_meta(path: str | Path) -> dict[str, str]:
    """``<scene>.txt`` as ``{key: value string}``."""
    meta = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        if "=" not in line:
            raise ValueError(f"{path}:{number}: expected 'key = value', got {line!r}")
        key, value = line.split("=", 1)
        meta[key.strip()] = value.strip()
    return meta


def axis_alignment(meta: Mapping[str, str], source: str = "<scene>.txt") -> np.ndarray:
    """The ``axisAlignment`` matrix (raw scan -> gravity/axis-aligned), ``np.float64 (4, 4)``.

    Identity when absent (ScanNet's test scenes have none). A matrix with NaN or infinity is
    refused here, where it is read, so that no preparer moves a scan by it.
    """
    if "axisAlignment" not in meta:
        return np.eye(4)
    values = meta["axisAlignment"].split()
    if len(values) != 16:
        raise ValueError(f"{source}: axisAlignment has {len(values)} numbers, expected 16")
    try:
        matrix = np.asarray([float(v) for v in values]).reshape(4, 4)
    except ValueError:
        raise ValueError(f"{source}: axisAlignment holds a value that is not a number") from None
    if not np.isfinite(matrix).all():
        raise ValueError(f"{source}: axisAlignment holds non-finite numbers")
    return matrix


# --------------------------------------------------------------------------- splits, label table


def write_split(path: str | Path, scene_ids: Iterable[str]) -> None:
    """A split list (``scannetv2_train.txt``...): one scene id per line."""
    atomic_write_bytes(path, "".join(f"{s}\n" for s in scene_ids).encode())


def read_split(path: str | Path) -> list[str]:
    """Scene ids of a split list, in file order."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def write_label_table(path: str | Path, rows: Iterable[Mapping[str, object]]) -> None:
    """``scannetv2-labels.combined.tsv``: ScanNet's columns; missing values left empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, LABEL_TABLE_COLUMNS, delimiter="\t", lineterminator="\n", restval=""
    )
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_bytes(path, buffer.getvalue().encode())


def read_label_table(path: str | Path) -> list[dict[str, str]]:
    """Rows of ``scannetv2-labels.combined.tsv`` as ``{column: value}``."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = {"raw_category", "nyu40id"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: label table lacks column(s) {sorted(missing)}")
        return list(reader)


def raw_to_nyu40(rows: Iterable[Mapping[str, str]]) -> dict[str, int]:
    """``raw_category -> nyu40id`` from label-table rows."""
    return {row["raw_category"]: int(row["nyu40id"]) for row in rows if row["nyu40id"]}
