"""A user's own point cloud or scan, from the usual files, and writers of the same formats.

Formats (chosen by the suffix):

* ``.ply``: ASCII, binary little- or big-endian; vertices ``x y z`` with optional colours
  (``red green blue`` or ``r g b``, ``diffuse_*``), normals (``nx ny nz`` or ``normal_x ...``)
  and a ``label`` property; faces are kept for writing a scan back.
* ``.pcd`` (PCL): ``DATA ascii``, ``binary`` and ``binary_compressed`` (LZF); fields ``x y z``,
  ``rgb`` / ``rgba`` (packed), ``normal_x normal_y normal_z``, ``label``. Points with NaN
  coordinates (organised clouds mark missing pixels so) are dropped and counted.
* ``.npy``: an ``(N, 3+)`` array; ``.npz``: arrays named ``points`` / ``xyz`` / ``coord``
  (or a single array), with optional ``colors`` / ``rgb``, ``normals``, ``labels``.
* ``.txt`` / ``.xyz`` / ``.csv``: a table, spaces or commas. Columns ``x y z``, then a triple of
  unit vectors is read as normals (``x y z nx ny nz``, ModelNet40's files) and any other triple
  as colours (``x y z r g b``, 0..255 or 0..1); with nine columns the other triple follows.

Every command that takes a user's cloud (``cd2p predict``, ``cd2p embed``, ``cd2p caption``)
reads it through :func:`read_cloud`, which checks what it returns (finite coordinates, at
least one point) and names the file in every error. :func:`pretraining_view` gives a cloud the
point preprocessing of pre-training (what the exported student expects).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cd2p._atomic import atomic_output, atomic_write_bytes

SUFFIXES = (".ply", ".pcd", ".npy", ".npz", ".txt", ".xyz", ".csv")


@dataclass
class Cloud:
    """A point cloud as read from a file.

    points: ``(N, 3)`` float32. colors: ``(N, 3)`` uint8 or None. normals: ``(N, 3)`` float32
    or None. labels: ``(N,)`` int64 (a ``label`` property / field) or None. faces: ``(M, 3)``
    int64 (PLY meshes) or None. dropped: points left out because their coordinates were NaN.
    """

    points: np.ndarray
    colors: np.ndarray | None = None
    labels: np.ndarray | None = None
    faces: np.ndarray | None = None
    source: str = ""
    normals: np.ndarray | None = None
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.points)


def _colors_from_floats(values: np.ndarray) -> np.ndarray:
    """Colours given as numbers: 0..1 floats are scaled to 0..255."""
    values = np.asarray(values, dtype=np.float64)
    if values.size and values.max() <= 1.0:
        values = values * 255.0
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def _unit_vectors(values: np.ndarray) -> bool:
    """Whether every row of ``values (N, 3)`` is a unit vector (normals, not colours)."""
    norms = np.linalg.norm(np.asarray(values, dtype=np.float64), axis=1)
    return bool(len(norms)) and bool(np.all(np.abs(norms - 1.0) < 1e-2))


# -- PLY ----------------------------------------------------------------------------------------

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip
_COLOR_NAMES = (("red", "green", "blue"), ("r", "g", "b"),
                ("diffuse_red", "diffuse_green", "diffuse_blue"))  # fmt: skip
_NORMAL_NAMES = (("nx", "ny", "nz"), ("normal_x", "normal_y", "normal_z"))


@dataclass
class _PlyElement:
    name: str
    count: int
    # (name, numpy type) for scalars; (name, count type, item type) for lists
    properties: list[tuple[str, ...]]


def _ply_header(path: Path, data: bytes) -> tuple[str, list[_PlyElement], int]:
    end = data.find(b"end_header", 0, 1 << 16)
    if not data.startswith(b"ply") or end < 0:
        raise ValueError(f"{path}: not a PLY file (no 'ply' magic or no end_header)")
    body = data[end + len(b"end_header") :]
    start = end + len(b"end_header") + (2 if body.startswith(b"\r\n") else 1)
    fmt, elements = "", []
    for line in data[:end].decode("ascii", errors="replace").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            elements.append(_PlyElement(words[1], int(words[2]), []))
        elif words[0] == "property":
            if not elements:
                raise ValueError(f"{path}: a PLY property before any element")
            try:
                if words[1] == "list":
                    prop = (words[4], _PLY_TYPES[words[2]], _PLY_TYPES[words[3]])
                else:
                    prop = (words[2], _PLY_TYPES[words[1]])
            except (KeyError, IndexError):
                raise ValueError(f"{path}: unknown PLY property line {line!r}") from None
            elements[-1].properties.append(prop)
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"{path}: unknown PLY format {fmt!r}")
    return fmt, elements, start


def _read_ply_binary(path: Path, data: bytes, offset: int, element: _PlyElement, order: str):
    """One element's rows as a dict of arrays (lists: a ``(count, k)`` array when every list has
    the same length k, else a list of arrays), and the offset after it."""
    if all(len(p) == 2 for p in element.properties):
        dtype = np.dtype([(p[0], order + p[1]) for p in element.properties])
        need = dtype.itemsize * element.count
        if offset + need > len(data):
            raise ValueError(f"{path}: truncated: element {element.name!r} needs {need} bytes")
        rows = np.frombuffer(data, dtype=dtype, count=element.count, offset=offset)
        return {n: np.array(rows[n]) for n in dtype.names}, offset + need
    # Lists: try "every list holds 3 items" (triangle meshes) first, then row by row.
    if len(element.properties) == 1 and element.count:
        name, count_type, item_type = element.properties[0]
        dtype = np.dtype([("n", order + count_type), ("v", order + item_type, (3,))])
        need = dtype.itemsize * element.count
        if offset + need <= len(data):
            rows = np.frombuffer(data, dtype=dtype, count=element.count, offset=offset)
            if (rows["n"] == 3).all():
                return {name: np.array(rows["v"])}, offset + need
    out: dict[str, list] = {p[0]: [] for p in element.properties}
    for _ in range(element.count):
        for prop in element.properties:
            if len(prop) == 2:
                size = np.dtype(prop[1]).itemsize
                out[prop[0]].append(np.frombuffer(data, order + prop[1], 1, offset)[0])
                offset += size
            else:
                count_dtype, item_dtype = np.dtype(order + prop[1]), np.dtype(order + prop[2])
                n = int(np.frombuffer(data, count_dtype, 1, offset)[0])
                offset += count_dtype.itemsize
                out[prop[0]].append(np.frombuffer(data, item_dtype, n, offset))
                offset += n * item_dtype.itemsize
            if offset > len(data):
                raise ValueError(f"{path}: truncated in element {element.name!r}")
    return out, offset


def _read_ply_ascii(path: Path, lines: list[bytes], start: int, element: _PlyElement):
    rows = [line.split() for line in lines[start : start + element.count]]
    if len(rows) < element.count:
        raise ValueError(f"{path}: truncated: element {element.name!r} has {len(rows)} rows")
    if all(len(p) == 2 for p in element.properties):
        try:
            table = np.array(rows, dtype=np.float64).reshape(element.count, -1)
        except ValueError:
            raise ValueError(f"{path}: element {element.name!r} is not numbers") from None
        if table.shape[1] != len(element.properties):
            raise ValueError(f"{path}: element {element.name!r} rows do not match the header")
        return {p[0]: table[:, i] for i, p in enumerate(element.properties)}
    out: dict[str, list] = {p[0]: [] for p in element.properties}
    for words in rows:
        i = 0
        for prop in element.properties:
            if len(prop) == 2:
                out[prop[0]].append(float(words[i]))
                i += 1
            else:
                n = int(words[i])
                out[prop[0]].append(np.array(words[i + 1 : i + 1 + n], dtype=np.int64))
                i += 1 + n
    return out


def _triangles(path: Path, faces) -> np.ndarray | None:
    """Faces as ``(M, 3)`` int64; polygons are fanned into triangles."""
    if isinstance(faces, np.ndarray) and faces.ndim == 2:
        return faces.astype(np.int64) if len(faces) else None
    triangles = []
    for polygon in faces:
        polygon = np.asarray(polygon, dtype=np.int64)
        triangles += [(polygon[0], polygon[i], polygon[i + 1]) for i in range(1, len(polygon) - 1)]
    return np.array(triangles, dtype=np.int64).reshape(-1, 3) if triangles else None


def _first_triple(props: dict, options: tuple[tuple[str, str, str], ...]) -> np.ndarray | None:
    for names in options:
        if all(n in props for n in names):
            return np.stack([np.asarray(props[n]) for n in names], axis=1)
    return None


def _read_ply(path: Path) -> Cloud:
    data = path.read_bytes()
    fmt, elements, offset = _ply_header(path, data)
    values: dict[str, dict] = {}
    if fmt == "ascii":
        lines = [line for line in data[offset:].splitlines() if line.strip()]
        row = 0
        for element in elements:
            values[element.name] = _read_ply_ascii(path, lines, row, element)
            row += element.count
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        for element in elements:
            values[element.name], offset = _read_ply_binary(path, data, offset, element, order)
    vertex = values.get("vertex")
    if vertex is None or not all(a in vertex for a in "xyz"):
        raise ValueError(f"{path}: no vertex element with x, y and z")
    points = np.stack([np.asarray(vertex[a], dtype=np.float32) for a in "xyz"], axis=1)
    colors = _first_triple(vertex, _COLOR_NAMES)
    if colors is not None:
        is_float = np.issubdtype(colors.dtype, np.floating) and colors.max(initial=0) <= 1.0
        colors = _colors_from_floats(colors) if is_float else np.clip(colors, 0, 255).astype(
            np.uint8
        )
    normals = _first_triple(vertex, _NORMAL_NAMES)
    labels = np.asarray(vertex["label"]).astype(np.int64) if "label" in vertex else None
    faces = None
    face = values.get("face")
    if face:
        key = "vertex_indices" if "vertex_indices" in face else next(iter(face))
        faces = _triangles(path, face[key])
    return Cloud(points, colors, labels, faces,
                 normals=None if normals is None else normals.astype(np.float32))  # fmt: skip


def write_ply(path: str | Path, cloud: Cloud, binary: bool = True) -> Path:
    """Write ``cloud`` as a PLY (binary little-endian or ASCII): ``x y z`` float, then
    ``nx ny nz`` float, ``red green blue`` uchar and ``label`` int when present, and triangle
    faces. Atomic."""
    path = Path(path)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if cloud.normals is not None:
        fields += [("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4")]
    if cloud.colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if cloud.labels is not None:
        fields.append(("label", "<i4"))
    vertex = np.empty(len(cloud.points), dtype=fields)
    for i, a in enumerate("xyz"):
        vertex[a] = cloud.points[:, i]
    if cloud.normals is not None:
        for i, a in enumerate(("nx", "ny", "nz")):
            vertex[a] = cloud.normals[:, i]
    if cloud.colors is not None:
        for i, a in enumerate(("red", "green", "blue")):
            vertex[a] = cloud.colors[:, i]
    if cloud.labels is not None:
        vertex["label"] = cloud.labels
    faces = cloud.faces if cloud.faces is not None else np.zeros((0, 3), np.int64)
    names = {"<f4": "float", "u1": "uchar", "<i4": "int"}
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0",
              f"element vertex {len(vertex)}"]  # fmt: skip
    header += [f"property {names[t]} {n}" for n, t in fields]
    if len(faces):
        header += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    header.append("end_header")
    head = ("\n".join(header) + "\n").encode("ascii")
    if binary:
        face = np.empty(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
        face["n"], face["v"] = 3, faces
        body = vertex.tobytes() + face.tobytes()
    else:
        rows = [" ".join(repr(v.item()) for v in row) for row in vertex]
        rows += [f"3 {a} {b} {c}" for a, b, c in faces]
        body = ("\n".join(rows) + "\n").encode("ascii")
    atomic_write_bytes(path, head + body)
    return path


# -- PCD ----------------------------------------------------------------------------------------

_PCD_TYPES = {
    (kind, size): f"{kind.lower()}{size}"
    for kind, sizes in (("F", (4, 8)), ("U", (1, 2, 4, 8)), ("I", (1, 2, 4, 8)))
    for size in sizes
}


def lzf_decompress(data: bytes, size: int) -> bytes:
    """Decompress an LZF stream (liblzf, as PCL's ``binary_compressed``) of ``size`` bytes."""
    out = bytearray()
    i = 0
    while i < len(data):
        ctrl = data[i]
        i += 1
        if ctrl < 32:  # a literal run of ctrl + 1 bytes
            out += data[i : i + ctrl + 1]
            i += ctrl + 1
        else:  # a back-reference: length (ctrl >> 5) + 2, offset from the end
            length = ctrl >> 5
            if length == 7:
                length += data[i]
                i += 1
            ref = len(out) - ((ctrl & 0x1F) << 8) - data[i] - 1
            i += 1
            if ref < 0:
                raise ValueError("corrupt LZF data (a reference before the start)")
            for _ in range(length + 2):  # byte by byte: the copy may overlap itself
                out.append(out[ref])
                ref += 1
    if len(out) != size:
        raise ValueError(f"corrupt LZF data ({len(out)} bytes, the header says {size})")
    return bytes(out)


def lzf_literals(data: bytes) -> bytes:
    """An LZF stream that stores ``data`` as literal runs (valid for every LZF decoder; no
    compression): what :func:`write_pcd` writes for ``binary_compressed``."""
    out = bytearray()
    for start in range(0, len(data), 32):
        chunk = data[start : start + 32]
        out.append(len(chunk) - 1)
        out += chunk
    return bytes(out)


def _read_pcd(path: Path) -> Cloud:
    data = path.read_bytes()
    header: dict[str, list[str]] = {}
    offset = 0
    while True:
        end = data.find(b"\n", offset)
        if end < 0:
            raise ValueError(f"{path}: not a PCD file (no DATA line)")
        line = data[offset:end].decode("ascii", errors="replace").strip()
        offset = end + 1
        if not line or line.startswith("#"):
            continue
        key, *values = line.split()
        header[key.upper()] = values
        if key.upper() == "DATA":
            break
    try:
        fields = header["FIELDS"]
        sizes = [int(v) for v in header["SIZE"]]
        types = header["TYPE"]
        counts = [int(v) for v in header.get("COUNT", ["1"] * len(fields))]
        points = int(header["POINTS"][0]) if "POINTS" in header else (
            int(header["WIDTH"][0]) * int(header.get("HEIGHT", ["1"])[0])
        )
        kind = header["DATA"][0]
        columns = [(name, _PCD_TYPES[(t, s)], c)
                   for name, s, t, c in zip(fields, sizes, types, counts, strict=True)]  # fmt: skip
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{path}: bad PCD header ({exc})") from None
    # Padding fields ("_") are kept in the row layout but never read.
    dtype = np.dtype([(f"{name}#{i}", "<" + t, (c,)) for i, (name, t, c) in enumerate(columns)])
    if kind == "ascii":
        text = data[offset:].decode("ascii", errors="replace")
        try:
            flat = np.array(text.split(), dtype=np.float64)
        except ValueError:
            raise ValueError(f"{path}: PCD ascii data is not a table of numbers") from None
        width = sum(counts)
        if flat.size < points * width:
            raise ValueError(f"{path}: truncated: {flat.size // width} of {points} points")
        table = flat[: points * width].reshape(points, width)
        rows = np.empty(points, dtype=dtype)
        col = 0
        for name, (_, _t, c) in zip(dtype.names, columns, strict=True):
            # A packed float rgb is written as that float: float64 -> float32 keeps its bits.
            rows[name] = table[:, col : col + c]
            col += c
    elif kind == "binary":
        need = points * dtype.itemsize
        if offset + need > len(data):
            raise ValueError(f"{path}: truncated: binary data needs {need} bytes")
        rows = np.frombuffer(data, dtype=dtype, count=points, offset=offset)
    elif kind == "binary_compressed":
        if offset + 8 > len(data):
            raise ValueError(f"{path}: truncated compressed PCD")
        packed, size = struct.unpack("<II", data[offset : offset + 8])
        try:
            raw = lzf_decompress(data[offset + 8 : offset + 8 + packed], size)
        except (ValueError, IndexError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        # Stored field by field (all x, then all y, ...), not point by point.
        rows = np.empty(points, dtype=dtype)
        at = 0
        for name, (_, t, c) in zip(dtype.names, columns, strict=True):
            width = np.dtype(t).itemsize * c * points
            rows[name] = np.frombuffer(raw[at : at + width], "<" + t).reshape(points, c)
            at += width
    else:
        raise ValueError(f"{path}: unknown PCD DATA kind {kind!r}")

    def field(name: str) -> np.ndarray | None:
        for full, (field_name, _, _) in zip(dtype.names, columns, strict=True):
            if field_name == name:
                return np.asarray(rows[full])[:, 0]
        return None

    if any(field(a) is None for a in "xyz"):
        raise ValueError(f"{path}: the PCD has no x, y and z fields")
    xyz = np.stack([field(a) for a in "xyz"], axis=1).astype(np.float32)
    colors = None
    packed_rgb = field("rgb") if field("rgb") is not None else field("rgba")
    if packed_rgb is not None:
        value = np.ascontiguousarray(packed_rgb)
        value = value.view(np.uint32) if value.dtype.itemsize == 4 else value.astype(np.uint32)
        colors = np.stack([(value >> 16) & 255, (value >> 8) & 255, value & 255], axis=1)
        colors = colors.astype(np.uint8)
    normals = None
    if all(field(n) is not None for n in _NORMAL_NAMES[1]):
        normals = np.stack([field(n) for n in _NORMAL_NAMES[1]], axis=1).astype(np.float32)
    labels = field("label")
    keep = np.isfinite(xyz).all(axis=1)
    dropped = int((~keep).sum())
    return Cloud(
        xyz[keep],
        None if colors is None else colors[keep],
        None if labels is None else labels.astype(np.int64)[keep],
        None,
        normals=None if normals is None else normals[keep],
        dropped=dropped,
    )


def write_pcd(path: str | Path, cloud: Cloud, data: str = "binary") -> Path:
    """Write ``cloud`` as a PCD v0.7 (``data``: ``ascii``, ``binary`` or
    ``binary_compressed``): ``x y z`` float, ``normal_x ...`` float, ``rgb`` packed in a float
    (PCL's convention) and ``label`` uint32 when present. Atomic."""
    path = Path(path)
    n = len(cloud.points)
    columns = [("x", cloud.points[:, 0]), ("y", cloud.points[:, 1]), ("z", cloud.points[:, 2])]
    if cloud.normals is not None:
        columns += [(name, cloud.normals[:, i]) for i, name in enumerate(_NORMAL_NAMES[1])]
    if cloud.colors is not None:
        c = cloud.colors.astype(np.uint32)
        columns.append(("rgb", ((c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]).view(np.float32)))
    if cloud.labels is not None:
        columns.append(("label", cloud.labels.astype(np.uint32)))
    types = ["U" if v.dtype == np.uint32 else "F" for _, v in columns]
    header = "\n".join([
        "# .PCD v0.7 - Point Cloud Data file format", "VERSION 0.7",
        "FIELDS " + " ".join(name for name, _ in columns), "SIZE " + " ".join("4" for _ in columns),
        "TYPE " + " ".join(types), "COUNT " + " ".join("1" for _ in columns), f"WIDTH {n}",
        "HEIGHT 1", "VIEWPOINT 0 0 0 1 0 0 0", f"POINTS {n}", f"DATA {data}",
    ]) + "\n"  # fmt: skip
    rows = np.empty(n, dtype=[(name, "<u4" if t == "U" else "<f4")
                              for (name, _), t in zip(columns, types, strict=True)])  # fmt: skip
    for name, values in columns:
        rows[name] = values
    if data == "ascii":
        lines = [
            " ".join(repr(float(v)) if rows.dtype[i].kind == "f" else str(int(v))
                     for i, v in enumerate(row))  # fmt: skip
            for row in rows.tolist()
        ]
        body = ("\n".join(lines) + "\n").encode("ascii")
    elif data == "binary":
        body = rows.tobytes()
    elif data == "binary_compressed":
        raw = b"".join(np.ascontiguousarray(rows[name]).tobytes() for name in rows.dtype.names)
        packed = lzf_literals(raw)
        body = struct.pack("<II", len(packed), len(raw)) + packed
    else:
        raise ValueError(f"unknown PCD data kind {data!r}")
    atomic_write_bytes(path, header.encode("ascii") + body)
    return path


# -- arrays and tables --------------------------------------------------------------------------


def _table_cloud(path: Path, table: np.ndarray) -> Cloud:
    if table.ndim != 2 or table.shape[1] < 3:
        raise ValueError(f"{path}: expected an (N, 3+) array of points, got {table.shape}")
    colors = normals = None
    if table.shape[1] >= 6:
        first = table[:, 3:6]
        second = table[:, 6:9] if table.shape[1] >= 9 else None
        if _unit_vectors(first):
            normals = first
            colors = _colors_from_floats(second) if second is not None else None
        else:
            colors = _colors_from_floats(first)
            normals = second if second is not None and _unit_vectors(second) else None
    return Cloud(table[:, :3].astype(np.float32), colors,
                 normals=None if normals is None else normals.astype(np.float32))  # fmt: skip


def _read_npz(path: Path) -> Cloud:
    with np.load(path, allow_pickle=False) as archive:
        names = archive.files

        def first(*keys: str) -> np.ndarray | None:
            key = next((k for k in keys if k in names), None)
            return None if key is None else np.asarray(archive[key])

        points = first("points", "xyz", "coord", "coords", "pos")
        if points is None:
            if len(names) != 1:
                raise ValueError(
                    f"{path}: expected an array named points, xyz or coord (or a single "
                    f"array), found {', '.join(names)}"
                )
            return _table_cloud(path, np.asarray(archive[names[0]]))
        cloud = _table_cloud(path, points)
        colors = first("colors", "colours", "color", "rgb")
        normals = first("normals", "normal")
        labels = first("labels", "label", "segment", "semantic")
    n = len(cloud.points)
    for name, value, width in (("colors", colors, 3), ("normals", normals, 3),
                               ("labels", labels, None)):  # fmt: skip
        if value is not None and (len(value) != n or (width and value.shape[-1] != width)):
            raise ValueError(f"{path}: {name} has shape {value.shape}, the points are ({n}, 3)")
    if colors is not None:
        cloud.colors = _colors_from_floats(colors)
    if normals is not None:
        cloud.normals = normals.astype(np.float32)
    if labels is not None:
        cloud.labels = labels.reshape(-1).astype(np.int64)
    return cloud


def _read_text(path: Path) -> np.ndarray:
    text = path.read_text(errors="replace")
    rows = [r for r in text.splitlines() if r.strip() and not r.lstrip().startswith(("#", "//"))]
    try:
        return np.array([re.split(r"[,\s;]+", r.strip()) for r in rows], dtype=np.float64)
    except ValueError:
        pass
    if rows:  # a header line of column names
        try:
            return np.array([re.split(r"[,\s;]+", r.strip()) for r in rows[1:]], dtype=np.float64)
        except ValueError:
            pass
    raise ValueError(f"{path}: not a table of numbers with the same number of columns per row")


def read_cloud(path: str | Path) -> Cloud:
    """Read a point cloud (the formats are listed in the module docstring).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file and the problem, including
    non-finite coordinates (other than PCD's NaN points, which are dropped).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown point-cloud format; cd2p reads {', '.join(SUFFIXES)}")
    try:
        if suffix == ".ply":
            cloud = _read_ply(path)
        elif suffix == ".pcd":
            cloud = _read_pcd(path)
        elif suffix == ".npz":
            cloud = _read_npz(path)
        elif suffix == ".npy":
            cloud = _table_cloud(path, np.asarray(np.load(path, allow_pickle=False)))
        else:
            cloud = _table_cloud(path, _read_text(path))
    except (struct.error, UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"{path}: cannot read this {suffix} file ({exc})") from None
    except ValueError as exc:
        message = str(exc)
        if not message.startswith(str(path)):
            message = f"{path}: {message}"
        raise ValueError(message) from None
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


def write_cloud(path: str | Path, cloud: Cloud, **options: str | bool) -> Path:
    """Write ``cloud`` in the format of ``path``'s suffix (for tests and conversions):
    ``.ply`` (``binary=True``), ``.pcd`` (``data="binary"``), ``.npy`` (``x y z [r g b]``),
    ``.npz`` (named arrays), ``.txt`` / ``.xyz`` / ``.csv`` (``x y z [nx ny nz] [r g b]``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".ply":
        return write_ply(path, cloud, binary=bool(options.get("binary", True)))
    if suffix == ".pcd":
        return write_pcd(path, cloud, data=str(options.get("data", "binary")))
    columns = [cloud.points.astype(np.float64)]
    if suffix in (".txt", ".xyz", ".csv") and cloud.normals is not None:
        columns.append(cloud.normals.astype(np.float64))
    if cloud.colors is not None:
        columns.append(cloud.colors.astype(np.float64))
    table = np.concatenate(columns, axis=1)
    with atomic_output(path, suffix=suffix) as tmp:
        if suffix == ".npy":
            np.save(tmp, table.astype(np.float32))
        elif suffix == ".npz":
            arrays = {"points": cloud.points}
            for name in ("colors", "normals", "labels"):
                if getattr(cloud, name) is not None:
                    arrays[name] = getattr(cloud, name)
            np.savez(tmp, **arrays)
        elif suffix in (".txt", ".xyz", ".csv"):
            np.savetxt(tmp, table, fmt="%.9g", delimiter="," if suffix == ".csv" else " ")
        else:
            raise ValueError(f"{path}: cd2p writes {', '.join(SUFFIXES)}")
    return path


__all__ = [
    "SUFFIXES",
    "Cloud",
    "lzf_decompress",
    "lzf_literals",
    "read_cloud",
    "pretraining_view",
    "write_cloud",
    "write_pcd",
    "write_ply",
]
