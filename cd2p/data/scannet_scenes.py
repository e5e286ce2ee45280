"""ScanNet v2 scene meshes -> prepared scenes for semantic/instance segmentation and detection.

Per scene, from ``ROOT/scans/<scene>/``: the mesh ``<scene>_vh_clean_2.ply`` (vertices and
RGB colours), its over-segmentation ``<scene>_vh_clean_2.0.010000.segs.json``, the objects
``<scene>.aggregation.json`` (groups of segments with a raw category) and ``<scene>.txt``
(``axisAlignment``). As ScanNet's benchmark scripts and VoteNet's ``load_scannet_data.py``:

* every object's raw category goes through the label table (``raw_category`` -> ``nyu40id``
  of ``scannetv2-labels.combined.tsv``); its vertices get that nyu40 id and the instance id
  ``objectId + 1`` (0 = no object). A category missing from the table leaves its vertices
  unannotated and is counted as a warning;
* the semantic label is the index of the nyu40 id in :data:`SEG_CLASS_IDS` (ScanNet's 20
  benchmark classes), :data:`IGNORE_LABEL` (-1) for everything else (0 = unannotated, the
  other nyu40 ids);
* the vertices are moved by ``axisAlignment`` (4x4, raw scan -> gravity/axis-aligned); a scene
  without it (no key, or no ``.txt``) keeps its own frame and is listed in the report under
  ``scenes_without_axis_alignment``;
* every instance of one of the 18 detection classes (:data:`DET_CLASS_IDS`: the 20 without
  wall and floor) gets an axis-aligned box over its aligned vertices: center
  ``(min + max) / 2``, size ``max - min``, class = index in :data:`DET_CLASS_IDS`.

Bad scene files (missing, a segs.json whose vertex count differs from the mesh's, an
aggregation naming segments that do not exist, one objectId with two labels, a segment claimed
by two objects) are reported per scene; the run goes on without the scene.

Layout of ``OUT`` (read it with :func:`load_scene_split` and :func:`load_scene`)::

    OUT/prepare_config.json            {"format": "cd2p-scannet-scenes", "format_version": 1,
                                        "label_table_sha256": ..., "seg_class_ids": [...],
                                        "det_class_ids": [...]}; a resumed run needs the same
    OUT/prepare_report.json            (prepare_report.shard-I-of-N.json with a shard)
    OUT/scenes/<scene_id>/scene.safetensors
        coord        (N, 3) float32  aligned vertex coordinates (metres)
        color        (N, 3) uint8    RGB
        semantic     (N,)   int16    0..19 (SEG_CLASS_NAMES), -1 ignore
        instance     (N,)   int32    objectId + 1, 0 none
        box_center   (K, 3) float32  one box per detection-class instance, by instance id
        box_size     (K, 3) float32
        box_class    (K,)   int64    0..17 (DET_CLASS_NAMES)
        box_instance (K,)   int32    the box's instance id
    OUT/scenes/<scene_id>/cd2p_scene.json   statistics: scene_id, split ("train", "val" or
        null), status, vertices, labelled_vertices (semantic >= 0), instances, boxes,
        boxes_per_class, axis_aligned, seconds, warnings, error, file
    OUT/scenes/.tmp-<scene_id>/        a scene being written (renamed when complete)

Re-running the same command resumes (finished scenes are kept). The scene list, sharding,
resume, worker processes and the report are :mod:`cd2p.data.scene_jobs`'s, shared with
``cd2p prepare scannet``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cd2p._reading import reading
from cd2p.data import scene_jobs
from cd2p.data.common import dataset_source, find_non_finite, require_finite
from cd2p.data.scannet_files import (
    SegGroup,
    axis_alignment,
    read_aggregation,
    read_label_table,
    read_mesh_ply,
    read_scene_meta,
    read_segs,
    scene_files,
    vertex_labels,
)

if TYPE_CHECKING:
    import torch

FORMAT = "cd2p-scannet-scenes"
FORMAT_VERSION = 1
SCENE_FILE = "scene.safetensors"
MESH_FILE = "{scene}_vh_clean_2.ply"
DEFAULT_LABEL_TABLE = "scannetv2-labels.combined.tsv"

#: ScanNet's 20 benchmark classes (nyu40 ids) and their names; semantic label = index.
SEG_CLASS_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
SEG_CLASS_NAMES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door",
                   "window", "bookshelf", "picture", "counter", "desk", "curtain",
                   "refrigerator", "shower curtain", "toilet", "sink", "bathtub",
                   "otherfurniture")  # fmt: skip
#: VoteNet's / 3DETR's 18 detection classes: the 20 without wall and floor (their names).
DET_CLASS_IDS = SEG_CLASS_IDS[2:]
DET_CLASS_NAMES = ("cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
                   "picture", "counter", "desk", "curtain", "refrigerator", "showercurtrain",
                   "toilet", "sink", "bathtub", "garbagebin")  # fmt: skip
IGNORE_LABEL = -1
# ScanNet's nyu40 colour palette (its util.create_color_palette), for the 20 classes in order.
NYU40_PALETTE = (
    (0, 0, 0), (174, 199, 232), (152, 223, 138), (31, 119, 180), (255, 187, 120),
    (188, 189, 34), (140, 86, 75), (255, 152, 150), (214, 39, 40), (197, 176, 213),
    (148, 103, 189), (196, 156, 148), (23, 190, 207), (178, 76, 76), (247, 182, 210),
    (66, 188, 102), (219, 219, 141), (140, 57, 197), (202, 185, 52), (51, 176, 203),
    (200, 54, 131), (92, 193, 61), (78, 71, 183), (172, 114, 82), (255, 127, 14),
    (91, 163, 138), (153, 98, 156), (140, 153, 101), (158, 218, 229), (100, 125, 154),
    (178, 127, 135), (120, 185, 128), (146, 111, 194), (44, 160, 44), (112, 128, 144),
    (96, 207, 209), (227, 119, 194), (213, 92, 176), (94, 106, 211), (82, 84, 163),
    (100, 85, 144),
)  # fmt: skip
SEG_CLASS_COLORS = tuple(NYU40_PALETTE[i] for i in SEG_CLASS_IDS)
SPLITS = ("train", "val", "all", "trainval")

# Errors that mean "this scene's files are bad", recorded in the report instead of stopping
# the run; anything else is a bug and stops it.
SCENE_ERRORS = (ValueError, OSError, EOFError)

_NYU40_MAX = 40


def _lookup(class_ids: Sequence[int]) -> np.ndarray:
    table = np.full(_NYU40_MAX + 1, IGNORE_LABEL, dtype=np.int64)
    table[list(class_ids)] = np.arange(len(class_ids))
    return table


_SEG_TABLE = _lookup(SEG_CLASS_IDS)
_DET_TABLE = _lookup(DET_CLASS_IDS)


def _map_nyu40(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"nyu40 ids must be integers, got dtype {ids.dtype}")
    out = np.full(ids.shape, IGNORE_LABEL, dtype=np.int64)
    known = (ids >= 0) & (ids <= _NYU40_MAX)
    out[known] = table[ids[known]]
    return out


def nyu40_to_seg(ids: np.ndarray) -> np.ndarray:
    """nyu40 ids (any integer shape) -> semantic labels ``0..19`` (index in
    :data:`SEG_CLASS_IDS`), ``-1`` for 0 (unannotated) and every other id; ``int64``."""
    return _map_nyu40(ids, _SEG_TABLE)


def nyu40_to_det(ids: np.ndarray) -> np.ndarray:
    """nyu40 ids -> detection classes ``0..17`` (index in :data:`DET_CLASS_IDS`), ``-1`` when
    not a detection class; ``int64``, same shape."""
    return _map_nyu40(ids, _DET_TABLE)


# --------------------------------------------------------------------------- label table


def load_label_table(path: str | Path) -> tuple[dict[str, int], str]:
    """``(raw_category -> nyu40 id, sha256 of the file)`` of ``scannetv2-labels.combined.tsv``.

    Raises FileNotFoundError / ValueError naming the file when it is missing, lacks the
    ``raw_category`` or ``nyu40id`` column, or holds a nyu40 id that is not an integer.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label table not found")
    try:
        rows = read_label_table(path)
    except ValueError as exc:
        raise ValueError(
            f"{exc}; expected ScanNet's tab-separated scannetv2-labels.combined.tsv with a "
            "header row naming at least raw_category and nyu40id"
        ) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text label table ({exc})") from None
    table: dict[str, int] = {}
    for number, row in enumerate(rows, 2):  # line 1 is the header
        value = (row.get("nyu40id") or "").strip()
        if not value:
            continue
        try:
            table[row["raw_category"]] = int(value)
        except ValueError:
            raise ValueError(
                f"{path}:{number}: nyu40id {value!r} of {row['raw_category']!r} is not an integer"
            ) from None
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return table, sha256


def scene_splits(root: str | Path) -> dict[str, str]:
    """``scene_id -> "train" | "val"`` from ScanNet's split lists where they exist (found as
    :func:`cd2p.data.scene_jobs.find_split_file` does); scenes in neither are absent."""
    splits: dict[str, str] = {}
    for name in ("val", "train"):  # train wins if a list names a scene twice
        try:
            path = scene_jobs.find_split_file(Path(root), name)
        except FileNotFoundError:
            continue
        splits.update(dict.fromkeys(scene_jobs.read_scene_list(path), name))
    return splits


# --------------------------------------------------------------------------- one scene


@dataclass
class SceneMeshStats:
    """What happened to one scene (stored as cd2p_scene.json and in the report)."""

    scene_id: str
    split: str | None = None
    status: str = "done"  # done | resumed | error
    vertices: int = 0
    labelled_vertices: int = 0  # semantic label in 0..19
    instances: int = 0
    boxes: int = 0
    boxes_per_class: dict[str, int] = field(default_factory=dict)
    axis_aligned: bool = False
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    file: str | None = None


@contextmanager
def _blame(path: Path) -> Iterator[None]:
    """Tag an error raised while reading ``path`` with the file to fix (``scene_file``)."""
    try:
        yield
    except SCENE_ERRORS as exc:
        if getattr(exc, "scene_file", None) is None:
            exc.scene_file = str(path)
        raise


def _scene_error(path: Path, problem: str) -> ValueError:
    exc = ValueError(f"{path}: {problem}")
    exc.scene_file = str(path)
    return exc


def _check_groups(groups: Sequence[SegGroup], seg_indices: np.ndarray, aggregation: Path,
                  segs: Path) -> list[str]:
    """The aggregation must agree with itself and with the segments: known segment ids and one
    label per objectId. A segment claimed by two objects (some real ScanNet scenes list objects
    twice) is not an error: the later object keeps it, as ScanNet's own export scripts do, and
    the returned warnings say so."""
    known = set(np.unique(seg_indices).tolist())
    labels: dict[int, str] = {}
    owner: dict[int, int] = {}
    shared: dict[tuple[int, int], int] = {}
    for group in groups:
        oid = group.object_id
        if labels.setdefault(oid, group.label) != group.label:
            raise _scene_error(aggregation, f"objectId {oid} appears twice with different "
                                            f"labels ({labels[oid]!r} and {group.label!r})")
        unknown = sorted(set(group.segments) - known)
        if unknown:
            shown = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
            raise _scene_error(
                aggregation, f"object {oid} ({group.label!r}) references segment id(s) {shown} "
                             f"that {segs.name} does not contain")
        for segment in group.segments:
            previous = owner.setdefault(segment, oid)
            if previous != oid:
                shared[(previous, oid)] = shared.get((previous, oid), 0) + 1
                owner[segment] = oid
    return [f"{aggregation.name}: {count} segment(s) of objectId {first} are also claimed by "
            f"objectId {second}, which keeps them (as ScanNet's export scripts do)"
            for (first, second), count in sorted(shared.items())]


def prepare_scene_mesh(
    root: str | Path,
    scene_id: str,
    raw_to_nyu40: Mapping[str, int],
    *,
    stats: SceneMeshStats | None = None,
) -> dict[str, np.ndarray]:
    """Read one scene's mesh, segments, objects and alignment into the arrays of
    ``scene.safetensors`` (see the module docstring for names, shapes and dtypes).

    Args:
        root: ScanNet root holding ``scans/<scene_id>/``.
        scene_id: the scene.
        raw_to_nyu40: ``raw_category -> nyu40 id`` (see :func:`load_label_table`).
        stats: filled in with ``axis_aligned`` and ``warnings`` when given.

    Raises:
        FileNotFoundError / ValueError naming the file and the problem; the exception's
        ``scene_file`` attribute is that file.
    """
    stats = stats if stats is not None else SceneMeshStats(scene_id)
    files = scene_files(Path(root) / "scans", scene_id)
    for key in ("mesh", "segs", "aggregation"):
        if not files[key].is_file():
            exc = FileNotFoundError(f"{files[key]}: file not found")
            exc.scene_file = str(files[key])
            raise exc
    mesh_path, segs_path, agg_path = files["mesh"], files["segs"], files["aggregation"]
    with _blame(mesh_path):
        mesh = read_mesh_ply(mesh_path)
    if mesh.colors is None:
        raise _scene_error(mesh_path, "no red/green/blue vertex properties (colours)")
    num_vertices = len(mesh.vertices)
    with _blame(segs_path):
        seg_indices = read_segs(segs_path)
    if len(seg_indices) != num_vertices:
        raise _scene_error(segs_path, f"{len(seg_indices)} segment ids, but {mesh_path.name} "
                                      f"has {num_vertices} vertices")
    with _blame(agg_path):
        groups = read_aggregation(agg_path)
    stats.warnings.extend(_check_groups(groups, seg_indices, agg_path, segs_path))

    missing: dict[str, list[int]] = {}
    for group in groups:
        if group.label not in raw_to_nyu40:
            missing.setdefault(group.label, []).append(group.object_id)
    for label, object_ids in sorted(missing.items()):
        stats.warnings.append(f"raw category {label!r} (objectId {', '.join(map(str, object_ids))})"
                              " is not in the label table: its vertices are left unannotated")
    nyu40, instance = vertex_labels(seg_indices, groups, raw_to_nyu40)

    align = np.eye(4)
    stats.axis_aligned = False
    meta_path = files["meta"]
    if meta_path.is_file():
        with _blame(meta_path):
            meta = read_scene_meta(meta_path)
            if "axisAlignment" in meta:
                align = axis_alignment(meta, str(meta_path))  # refuses non-finite values
                stats.axis_aligned = True
    vertices = mesh.vertices.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # found by the check below
        coord = (vertices @ align[:3, :3].T + align[:3, 3]).astype(np.float32)
    # Vertices index the segments: one cannot be skipped, so a non-finite (or, once aligned,
    # overflowing) vertex refuses the scene, naming the mesh.
    problem = find_non_finite(coord)
    if problem is not None:
        where = "vertices after axisAlignment" if stats.axis_aligned else "vertices"
        raise _scene_error(mesh_path, f"{where}: {problem}")

    # One box per detection-class instance over its aligned vertices (VoteNet's
    # load_scannet_data.py), ordered by instance id.
    object_nyu40 = {g.object_id: raw_to_nyu40.get(g.label, 0) for g in groups}
    boxes = []
    for object_id in sorted(object_nyu40):
        det = int(nyu40_to_det(np.array([object_nyu40[object_id]]))[0])
        if det < 0:
            continue
        points = coord[instance == object_id + 1].astype(np.float64)
        if len(points) == 0:
            stats.warnings.append(f"objectId {object_id} has no vertices: no box")
            continue
        lo, hi = points.min(axis=0), points.max(axis=0)
        boxes.append(((lo + hi) / 2, hi - lo, det, object_id + 1))
    return {
        "coord": np.ascontiguousarray(coord),
        "color": np.ascontiguousarray(mesh.colors[:, :3], dtype=np.uint8),
        "semantic": nyu40_to_seg(nyu40).astype(np.int16),
        "instance": instance.astype(np.int32),
        "box_center": np.array([b[0] for b in boxes], np.float32).reshape(-1, 3),
        "box_size": np.array([b[1] for b in boxes], np.float32).reshape(-1, 3),
        "box_class": np.array([b[2] for b in boxes], np.int64),
        "box_instance": np.array([b[3] for b in boxes], np.int32),
    }


def prepare_scene(root: str | Path, scene_id: str, scenes_dir: str | Path,
                  raw_to_nyu40: Mapping[str, int], split_of: Mapping[str, str],
                  config: Mapping[str, Any]) -> dict[str, Any]:
    """Turn one scene into ``scenes_dir/<scene_id>/`` (atomically).

    Returns the :class:`SceneMeshStats` as a dict. Bad scene files do not raise: the stats
    come back with ``status="error"``, the message and the file to fix.
    """
    from safetensors.numpy import save_file

    scenes_dir = Path(scenes_dir)
    stats = SceneMeshStats(scene_id=scene_id, split=split_of.get(scene_id))
    start = time.perf_counter()
    tmp = scene_jobs.fresh_tmp_dir(scenes_dir, scene_id)  # drops a stale, interrupted one
    try:
        arrays = prepare_scene_mesh(root, scene_id, raw_to_nyu40, stats=stats)
    except SCENE_ERRORS as exc:
        scene_dir = Path(root) / "scans" / scene_id
        file = getattr(exc, "scene_file", None) or str(scene_dir)
        message = str(exc) or type(exc).__name__
        if str(scene_dir) not in message:
            message = f"{file}: {message}"
        stats.status, stats.error, stats.file = "error", message, file
        stats.seconds = time.perf_counter() - start
        return asdict(stats)
    semantic, instance = arrays["semantic"], arrays["instance"]
    stats.vertices = len(semantic)
    stats.labelled_vertices = int(np.count_nonzero(semantic >= 0))
    stats.instances = len(np.unique(instance[instance > 0]))
    stats.boxes = len(arrays["box_class"])
    counts = Counter(DET_CLASS_NAMES[c] for c in arrays["box_class"].tolist())
    stats.boxes_per_class = {name: counts[name] for name in DET_CLASS_NAMES if counts[name]}
    # The last guard before writing (the vertices were checked where they were made).
    for key in ("coord", "box_center", "box_size"):
        require_finite(arrays[key], f"{scenes_dir / scene_id / SCENE_FILE} ({key})")
    # Failing to write (disk full, permissions) is not the scene's fault: it stops the run.
    tmp.mkdir(parents=True)
    # One metadata key only: safetensors writes several in a random order (not reproducible).
    save_file(arrays, str(tmp / SCENE_FILE), metadata={"format": FORMAT})
    stats.seconds = time.perf_counter() - start
    record = asdict(stats)
    record["settings"] = dict(config)
    scene_jobs.commit_scene_dir(tmp, scenes_dir / scene_id, record)
    return asdict(stats)


# --------------------------------------------------------------------------- whole run


def scenes_config(label_table_sha256: str, source: str = "scannet") -> dict[str, Any]:
    """The content of ``prepare_config.json`` (what a resumed run must match); ``source`` is
    ``scannet``, or ``synthetic-scannet`` for a root written by ``cd2p synthetic scannet``."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "label_table_sha256": label_table_sha256,
        "seg_class_ids": list(SEG_CLASS_IDS),
        "det_class_ids": list(DET_CLASS_IDS),
    }


def _summarise(stats: list[dict[str, Any]], config: dict[str, Any], *, root: Path, out: Path,
               labels: Path, scenes: list[str], split: str, scenes_file: str | Path | None,
               shard: tuple[int, int], workers: int, seconds: float, interrupted: bool
               ) -> dict[str, Any]:
    worked = [s for s in stats if s["status"] == "done"]
    ok = [s for s in stats if s["status"] in ("done", "resumed")]
    vertices = sum(s["vertices"] for s in ok)
    labelled = sum(s["labelled_vertices"] for s in ok)
    new_vertices = sum(s["vertices"] for s in worked)
    boxes = Counter()
    for s in ok:
        boxes.update(s["boxes_per_class"])
    return {
        "root": str(root),
        "out": str(out),
        "labels": str(labels),
        "split": None if scenes_file is not None else split,
        "scenes_file": None if scenes_file is None else str(scenes_file),
        "shard": list(shard),
        "workers": workers,
        "settings": config,
        "interrupted": interrupted,
        "scenes": scene_jobs.scene_counts(stats, len(scenes)),
        "scene_splits": dict(sorted(Counter(str(s["split"]) for s in ok).items())),
        "vertices": vertices,
        "labelled_vertices": labelled,
        "labelled_fraction": round(labelled / vertices, 4) if vertices else None,
        "instances": sum(s["instances"] for s in ok),
        "boxes": sum(s["boxes"] for s in ok),
        "boxes_per_class": {name: boxes[name] for name in DET_CLASS_NAMES},
        "errors": scene_jobs.scene_errors(stats),
        "warnings": scene_jobs.scene_warnings(stats),
        "scenes_without_axis_alignment": sorted(s["scene_id"] for s in ok
                                                if not s["axis_aligned"]),
        "seconds": round(seconds, 3),
        "vertices_this_run": new_vertices,
        "vertices_per_second": round(new_vertices / seconds, 1) if seconds > 0 else None,
        "per_scene": {s["scene_id"]: {k: s[k] for k in ("status", "split", "vertices", "boxes",
                                                         "seconds", "error")}
                      for s in sorted(stats, key=lambda s: s["scene_id"])},
    }


def prepare_scannet_scenes(
    root: str | Path,
    out: str | Path,
    *,
    labels: str | Path,
    split: str = "all",
    scenes_file: str | Path | None = None,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    on_scene_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Prepare the scene meshes of a ScanNet v2 root (see the module docstring).

    Args:
        root: ScanNet root holding ``scans/<scene>/<scene>_vh_clean_2.ply`` and its files.
        out: output directory; finished scenes already in it are kept (resume).
        labels: ``scannetv2-labels.combined.tsv`` (raw category -> nyu40 id).
        split: ``train``, ``val`` (ScanNet's split lists) or ``all`` (every scene with a
            mesh); ignored when ``scenes_file`` is given.
        scenes_file: text file of scene ids, one per line.
        workers: processes over scenes (1 = in this process).
        shard: ``(I, N)``: prepare only part I of the sorted scene list split N ways.
        progress: show a rich progress bar.
        on_scene_done: called in this process with each scene's statistics as it finishes.

    Returns:
        The report, also written atomically to ``out/prepare_report[.shard-I-of-N].json``
        (also when interrupted). Scenes with bad files are listed under ``errors``.
    """
    scene_jobs.check_workers(workers)
    root, out, labels = Path(root), Path(out), Path(labels)
    raw_to_nyu40, sha256 = load_label_table(labels)
    scenes = scene_jobs.select_scenes(root, split, scenes_file, shard, scene_file=MESH_FILE)
    splits = scene_splits(root)
    split_of = {s: splits[s] for s in scenes if s in splits}
    config = scenes_config(sha256, dataset_source(root, "scannet"))
    task = functools.partial(prepare_scene, root, scenes_dir=out / "scenes",
                             raw_to_nyu40=raw_to_nyu40, split_of=split_of, config=config)

    def summarise(stats: list[dict[str, Any]], seconds: float, interrupted: bool
                  ) -> dict[str, Any]:
        return _summarise(stats, config, root=root, out=out, labels=labels, scenes=scenes,
                          split=split, scenes_file=scenes_file, shard=shard, workers=workers,
                          seconds=seconds, interrupted=interrupted)

    return scene_jobs.run_scene_jobs(
        task, scenes, out, config=config, summarise=summarise,
        report_file=scene_jobs.report_name(shard), workers=workers, progress=progress,
        counter="vertices", on_scene_done=on_scene_done,
    )


# --------------------------------------------------------------------------- reading


@dataclass
class SceneSplit:
    """The prepared scenes of one split of an ``OUT`` directory (see :func:`load_scene_split`).

    ``root`` is ``OUT``; ``scene_ids`` are sorted; load one with :func:`load_scene`.
    """

    root: Path
    scene_ids: list[str]
    split: str
    source: str = "scannet"

    def __len__(self) -> int:
        return len(self.scene_ids)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the semantic labels 0..19."""
        return SEG_CLASS_NAMES

    @property
    def det_class_names(self) -> tuple[str, ...]:
        """Names of the box classes 0..17."""
        return DET_CLASS_NAMES


def _check_scenes_dir(out: Path) -> dict[str, Any]:
    path = out / scene_jobs.CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{out} is not a prepared scenes directory: no {path.name} "
                         "(write one with `cd2p prepare scannet-scenes ROOT OUT`)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    found = config.get("format") if isinstance(config, dict) else None
    if found != FORMAT:
        raise ValueError(f"{path}: format {found!r}, expected {FORMAT!r}: {out} is not an "
                         "output of `cd2p prepare scannet-scenes`")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r}; this cd2p reads version "
                         f"{FORMAT_VERSION} (prepare the scenes again)")
    return config


def load_scene_split(out: str | Path, split: str) -> SceneSplit:
    """The prepared scenes of ``split`` (``train``, ``val``, ``all`` or ``trainval``) in
    ``out``, found from every ``out/scenes/*/cd2p_scene.json`` (scenes being written,
    ``.tmp-*``, are skipped).

    Raises ValueError when ``out`` is not a ``prepare scannet-scenes`` output or when the split
    has no prepared scene (the message names the splits that have some).
    """
    out = Path(out)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    config = _check_scenes_dir(out)
    split_of: dict[str, str | None] = {}
    scenes_dir = out / "scenes"
    if scenes_dir.is_dir():
        for path in scenes_dir.iterdir():
            if path.name.startswith(".") or not (path / scene_jobs.SCENE_STATS_FILE).is_file():
                continue
            split_of[path.name] = scene_jobs.load_scene_stats(path).get("split")
    wanted = {"train": ("train",), "val": ("val",), "trainval": ("train", "val")}.get(split)
    scene_ids = sorted(s for s, found in split_of.items() if wanted is None or found in wanted)
    if not scene_ids:
        if not split_of:
            raise ValueError(f"{out}: no prepared scenes yet")
        counts = Counter("no split" if s is None else s for s in split_of.values())
        have = ", ".join(f"{name}: {n} scene(s)" for name, n in sorted(counts.items()))
        raise ValueError(f"{out}: no prepared scene in split {split!r} (prepared: {have})")
    return SceneSplit(root=out, scene_ids=scene_ids, split=split,
                      source=str(config.get("source", "scannet")))


_INT64_KEYS = ("semantic", "instance", "box_class", "box_instance")
_SCENE_KEYS = ("coord", "color", "semantic", "instance", "box_center", "box_size", "box_class",
               "box_instance")


def load_scene(out: str | Path | SceneSplit, scene_id: str) -> dict[str, torch.Tensor]:
    """One prepared scene as tensors: ``coord`` (N, 3) float32, ``color`` (N, 3) uint8,
    ``semantic`` (N,) int64 (0..19, -1 ignore), ``instance`` (N,) int64 (0 none),
    ``box_center``/``box_size`` (K, 3) float32, ``box_class`` (K,) int64 (0..17),
    ``box_instance`` (K,) int64.

    ``out`` is the ``OUT`` directory (or a :class:`SceneSplit` of it).
    """
    from safetensors.torch import load_file

    root = out.root if isinstance(out, SceneSplit) else Path(out)
    path = root / "scenes" / scene_id / SCENE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: scene {scene_id!r} is not prepared in {root}")
    with reading(path, "prepare the scene again"):
        tensors = load_file(str(path))
    missing = [k for k in _SCENE_KEYS if k not in tensors]
    if missing:
        raise ValueError(f"{path}: lacks tensor(s) {missing}; prepare the scene again")
    for key in _INT64_KEYS:
        tensors[key] = tensors[key].long()
    return tensors
