"""ScanNet ``.sens`` RGB-D videos -> RGB/point-cloud pairs (one Hugging Face dataset per scene).

Every ``frame_skip``-th frame of a scene becomes one pair:

* ``image``: the colour JPEG bytes exactly as stored in the ``.sens`` (never re-encoded);
* ``points``: ``(num_points, 3)`` float32, the depth image back-projected with the depth
  intrinsics, moved to world coordinates by the frame's camera-to-world pose, rotated into
  ScanNet's gravity-aligned frame by the scene's ``axisAlignment`` (from ``<scene>.txt``;
  identity when the file or the key is absent), then centred (centroid at the origin);
* ``scene_id``, ``frame_index``, ``pose`` (the camera-to-world pose as stored in the
  ``.sens``), ``intrinsic_color`` and ``intrinsic_depth``.

Point reduction: a depth frame has up to 640x480 = 307 k points, dense near the camera and
sparse far away. We first keep one point per occupied ``voxel_size`` voxel (so a wall 4 m
away weighs as much as a chair 1 m away), then draw exactly ``num_points`` of those at random
(without replacement; with replacement only for the shortfall when fewer voxels are
occupied). The generator is seeded from ``(seed, scene_id, frame_index)``, so the output does
not depend on ``--workers``, ``--shard`` or resuming.

Damaged data never reaches a pair. A considered frame is skipped and counted under a reason
(:data:`SKIP_REASONS`): ``invalid_pose`` (ScanNet's -inf "tracking lost" pose),
``damaged_pose`` (NaN / +inf entries, not a rigid transform, or a translation beyond
:data:`MAX_POSE_TRANSLATION`: a finite but absurd 3e38 would overflow into inf and NaN),
``undecodable_color`` (the colour payload is not a whole JPEG, see
:func:`cd2p.data.sens.check_jpeg`), ``too_few_valid_depth``, and ``non_finite_points`` (the
frame's points came out non-finite all the same). The damaged ones (:data:`DAMAGE_REASONS`)
are also listed one by one, with the ``.sens`` file and the frame index, in the report's
``damaged_frames``. Non-finite intrinsics, or intrinsics so extreme that back-projecting
``max_depth`` overflows, refuse the whole file (a scene error). Before a scene is written
every float column is checked once more (:func:`cd2p.data.common.require_finite`).

Layout of ``OUT`` (see :mod:`cd2p.data.pairs` for reading it)::

    OUT/prepare_config.json                 settings; a resumed run must use the same ones
    OUT/prepare_report.json                 (prepare_report.shard-I-of-N.json for shards)
    OUT/scenes/<scene_id>/                  one ``datasets`` dataset per scene (save_to_disk)
    OUT/scenes/<scene_id>/cd2p_scene.json   per-scene statistics (with ``images_sha256``,
                                            the digest of the scene's JPEGs: images_digest)
    OUT/scenes/.tmp-<scene_id>.<pid>-<random>/   a scene being written (renamed when complete)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import math
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cd2p.data import scene_jobs
from cd2p.data.common import find_non_finite, require_finite
from cd2p.data.scannet_files import axis_alignment, read_scene_meta

FORMAT_VERSION = 1
SKIP_REASONS = ("invalid_pose", "too_few_valid_depth", "damaged_pose", "undecodable_color",
                "non_finite_points")
# Reasons that mean damaged data (not a normal property of a scan): listed frame by frame.
DAMAGE_REASONS = ("damaged_pose", "undecodable_color", "non_finite_points")
TIMING_KEYS = ("read", "color_check", "depth_decode", "backproject", "sampling", "write")
# A camera further than this from the scan's origin (metres) is a damaged pose: ScanNet's
# scenes span tens of metres, and a huge finite value (3e38) would turn every point into the
# same float32 number or overflow into inf.
MAX_POSE_TRANSLATION = 1e4
# How far R R^T may be from the identity for a rigid pose (float32 poses are ~1e-6 away).
_ROTATION_TOLERANCE = 1e-2
JPEG = 2  # .sens colour compression code for JPEG
# Errors that mean "this scene's files are bad", recorded in the report instead of stopping
# a run over 1500 scans; anything else is a bug and stops the run.
SCENE_ERRORS = (ValueError, OSError, EOFError, zlib.error)


@dataclass(frozen=True)
class PrepareSettings:
    """Everything that changes the content of a prepared pair (stored in prepare_config.json)."""

    frame_skip: int = 25
    num_points: int = 4096
    voxel_size: float = 0.02
    max_depth: float = 6.0
    min_valid_points: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.frame_skip < 1:
            raise ValueError(f"frame_skip must be >= 1, got {self.frame_skip}")
        if self.num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {self.num_points}")
        if not self.voxel_size > 0:
            raise ValueError(f"voxel_size must be > 0, got {self.voxel_size}")
        if not self.max_depth > 0:
            raise ValueError(f"max_depth must be > 0, got {self.max_depth}")
        if self.min_valid_points < 1:
            raise ValueError(f"min_valid_points must be >= 1, got {self.min_valid_points}")

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}


def pair_features(num_points: int):
    """The ``datasets.Features`` of a scene dataset (the contract shared with the teacher)."""
    from datasets import Array2D, Features, Image, Value

    return Features(
        {
            "image": Image(),
            "points": Array2D((num_points, 3), "float32"),
            "scene_id": Value("string"),
            "frame_index": Value("int32"),
            "pose": Array2D((4, 4), "float32"),
            "intrinsic_color": Array2D((4, 4), "float32"),
            "intrinsic_depth": Array2D((4, 4), "float32"),
        }
    )


# --------------------------------------------------------------------------- geometry


def backproject_depth(depth: np.ndarray, intrinsic_depth: np.ndarray) -> np.ndarray:
    """Pinhole back-projection of a depth image into the depth camera frame.

    Args:
        depth: ``(H, W)`` depth in metres, 0 where invalid.
        intrinsic_depth: ``(4, 4)`` (or ``(3, 3)``) depth intrinsics: ``fx, fy`` on the
            diagonal, ``cx, cy`` in the last column, in pixels of this depth image.

    Returns:
        ``(H, W, 3)`` float32 camera coordinates ``((u - cx) z / fx, (v - cy) z / fy, z)``
        (x right, y down, z forward); invalid pixels give ``(0, 0, 0)``.
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got shape {depth.shape}")
    k = np.asarray(intrinsic_depth, dtype=np.float64)
    fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    if not (fx > 0 and fy > 0):
        raise ValueError(f"depth intrinsics need positive focal lengths, got fx={fx}, fy={fy}")
    height, width = depth.shape
    ray_x = ((np.arange(width) - cx) / fx).astype(np.float32)
    ray_y = ((np.arange(height) - cy) / fy).astype(np.float32)
    points = np.empty((height, width, 3), dtype=np.float32)
    np.multiply(depth, ray_x[None, :], out=points[..., 0])
    np.multiply(depth, ray_y[:, None], out=points[..., 1])
    points[..., 2] = depth
    return points


def voxel_downsample(
    points: np.ndarray, voxel_size: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """One point per occupied voxel: the first one in (flattened, raster) order.

    Args:
        points: ``(N, 3)`` points, or ``(H, W, 3)`` points laid out as a depth image.
        voxel_size: voxel edge length (same unit as the points).
        mask: optional boolean ``(N,)`` / ``(H, W)``; points where it is False are ignored.

    Returns:
        ``(V,)`` int64 indices into the flattened points, sorted by voxel key.

    The result depends only on the points and their order, not on the layout. The layout is
    a speed-up: a point whose predecessor (or, for an image, whose left or upper neighbour)
    lies in the same voxel is never the first of its voxel, so it is dropped before the sort;
    on depth images that removes most points cheaply.
    """
    points = np.asarray(points, dtype=np.float32)
    if points.shape[-1] != 3 or points.ndim not in (2, 3):
        raise ValueError(f"points must be (N, 3) or (H, W, 3), got shape {points.shape}")
    if mask is None:
        mask = np.ones(points.shape[:-1], dtype=bool)
    elif mask.shape != points.shape[:-1]:
        raise ValueError(f"mask shape {mask.shape} does not match points {points.shape}")
    if not mask.any():
        return np.zeros(0, dtype=np.int64)
    # Work on the whole array (gathering the masked points costs more than the arithmetic),
    # in place where possible: fresh multi-MB temporaries cost page faults on every frame.
    scaled = points * np.float32(1.0 / voxel_size)
    extent = max(float(scaled.max()), -float(scaled.min()))
    if not math.isfinite(extent):  # non-finite values are fine only where masked out
        if not np.isfinite(scaled[mask]).all():
            raise ValueError("points under the mask must be finite")
        scaled = np.where(mask[..., None], scaled, np.float32(0))
        extent = max(float(scaled.max()), -float(scaled.min()))
    bits = math.ceil(math.log2(extent + 2)) + 1  # signed coordinates, shifted to >= 0
    if 3 * bits > 62:
        raise ValueError(f"points reach {extent:.3g} voxels of {voxel_size}: too many for a key")
    np.floor(scaled, out=scaled)
    grid = scaled.astype(np.int32 if 3 * bits <= 31 else np.int64)
    grid += 1 << (bits - 1)
    keys = grid[..., 0] << (2 * bits)
    keys |= grid[..., 1] << bits
    keys |= grid[..., 2]
    keys[~mask] = -1
    maybe_first = mask.copy()
    if keys.ndim == 2:
        maybe_first[:, 1:] &= keys[:, 1:] != keys[:, :-1]
        maybe_first[1:, :] &= keys[1:, :] != keys[:-1, :]
    else:
        maybe_first[1:] &= keys[1:] != keys[:-1]
    candidates = np.flatnonzero(maybe_first)
    cand_keys = keys.reshape(-1)[candidates]
    order = np.argsort(cand_keys, kind="stable")  # stable: ties keep raster order
    sorted_keys = cand_keys[order]
    first = np.ones(len(sorted_keys), dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return candidates[order[first]]


def sample_exact(count: int, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """``(num_points,)`` indices into ``count`` items: without replacement when possible,
    otherwise every item once plus a shortfall drawn with replacement."""
    if count < 1:
        raise ValueError("cannot sample points from an empty set")
    if count >= num_points:
        return rng.choice(count, size=num_points, replace=False)
    extra = rng.choice(count, size=num_points - count, replace=True)
    return np.concatenate([rng.permutation(count), extra])


def reduce_points(
    points: np.ndarray,
    num_points: int,
    voxel_size: float,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Voxel-grid downsample, then sample exactly ``num_points``.

    Args:
        points: ``(N, 3)`` or ``(H, W, 3)`` points (see :func:`voxel_downsample`).
        num_points: ``P``, the exact number of points returned.
        voxel_size: voxel edge; one point per occupied voxel survives the first step.
        rng: the random generator for the sampling step.
        mask: optional validity mask over the points.

    Returns:
        ``(P, 3)`` float32 points.
    """
    flat = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    kept = voxel_downsample(points, voxel_size, mask)
    return flat[kept[sample_exact(len(kept), num_points, rng)]]


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a ``(4, 4)`` rigid transform to ``(N, 3)`` points (float64 maths, float32 out)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    out = np.asarray(points, dtype=np.float64) @ matrix[:3, :3].T + matrix[:3, 3]
    return out.astype(np.float32)


def pose_problem(pose: np.ndarray) -> tuple[str, str] | None:
    """``None`` for a usable camera-to-world pose, else ``(skip reason, what is wrong)``.

    ``invalid_pose``: ScanNet's "tracking lost" marker (non-finite entries, all -inf), a
    normal part of a scan. ``damaged_pose``: NaN or +inf entries, a bottom row other than
    ``(0, 0, 0, 1)``, a rotation block that is not orthonormal, or a translation beyond
    :data:`MAX_POSE_TRANSLATION` (finite but absurd values such as 3e38 overflow into inf and
    NaN once multiplied). Computed in float64, where even 3e38 squared is finite.
    """
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4):
        return "damaged_pose", f"pose of shape {pose.shape}, not (4, 4)"
    finite = np.isfinite(pose)
    if not finite.all():
        if np.isneginf(pose[~finite]).all():
            return "invalid_pose", "tracking lost (-inf pose)"
        return "damaged_pose", f"pose: {find_non_finite(pose)}"
    if not np.allclose(pose[3], (0.0, 0.0, 0.0, 1.0)):
        return "damaged_pose", f"pose bottom row {pose[3].tolist()} is not (0, 0, 0, 1)"
    rotation = pose[:3, :3]
    error = float(np.abs(rotation @ rotation.T - np.eye(3)).max())
    if not error <= _ROTATION_TOLERANCE:
        return "damaged_pose", f"pose rotation is not orthonormal (|R R^T - I| = {error:.3g})"
    distance = float(np.abs(pose[:3, 3]).max())
    if not distance <= MAX_POSE_TRANSLATION:
        return "damaged_pose", (f"pose translation {distance:.3g} m is beyond "
                                f"{MAX_POSE_TRANSLATION:g} m")
    return None


def pose_is_valid(pose: np.ndarray) -> bool:
    """A usable camera-to-world pose (see :func:`pose_problem`)."""
    return pose_problem(pose) is None


def check_intrinsics(header: Any, max_depth: float, where: str) -> None:
    """Refuse a ``.sens`` whose intrinsics would make every frame non-finite: non-finite
    colour or depth intrinsics (both are stored with each pair), or depth intrinsics so
    extreme that back-projecting ``max_depth`` overflows float32. A whole-file problem, so a
    ``ValueError`` naming ``where`` (the scene is reported as failed), not a skip per frame.
    Back-projection is linear in depth: if the deepest valid pixel stays finite, all do."""
    for name in ("intrinsic_color", "intrinsic_depth"):
        problem = find_non_finite(getattr(header, name))
        if problem is not None:
            raise ValueError(f"{where}: {name.replace('_', ' ')}: {problem}")
    deepest = np.full((header.depth_height, header.depth_width), max_depth, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        rays = backproject_depth(deepest, header.intrinsic_depth)
    problem = find_non_finite(rays)
    if problem is not None:
        k = np.asarray(header.intrinsic_depth)[:3, :3].tolist()
        raise ValueError(f"{where}: depth intrinsics {k} back-project {max_depth} m to "
                         f"non-finite points ({problem})")


def images_digest(images: Iterable[bytes]) -> str:
    """sha256 of a scene's JPEGs in row order (each prefixed with its length, so that the
    boundaries count): stored as ``images_sha256`` in ``cd2p_scene.json``, and with the teacher
    targets so that targets computed from other images are never reused."""
    digest = hashlib.sha256()
    for data in images:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def frame_rng(seed: int, scene_id: str, frame_index: int) -> np.random.Generator:
    """The sampling generator of one frame: independent of workers, shards and resuming."""
    return np.random.default_rng([seed, zlib.crc32(scene_id.encode("utf-8")), frame_index])


# --------------------------------------------------------------------------- scene files


def list_scenes(root: str | Path, split: str = "train", scenes_file: str | Path | None = None
                ) -> list[str]:
    """Sorted, de-duplicated scene ids of a ScanNet root for a split or an explicit list.

    ``split`` is ``train``/``val`` (ScanNet's split lists) or ``all`` (every ``scans/*/``
    holding a ``<scene>.sens``); ``scenes_file`` overrides ``split``.
    """
    return scene_jobs.list_scenes(root, split, scenes_file, scene_file="{scene}.sens")


# --------------------------------------------------------------------------- one scene


@dataclass
class SceneStats:
    """What happened to one scene (stored as cd2p_scene.json and in the report)."""

    scene_id: str
    status: str = "done"  # done | resumed | error
    sens_bytes: int = 0
    frames_in_file: int = 0
    frames_considered: int = 0
    frames_read: int = 0
    pairs: int = 0
    payload_bytes_read: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    # The frames skipped for a DAMAGE_REASONS reason: {"frame", "reason", "detail"}.
    damaged_frames: list[dict[str, Any]] = field(default_factory=list)
    images_sha256: str | None = None
    axis_aligned: bool = False
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMING_KEYS, 0.0))
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    file: str | None = None


def sens_path_of(root: Path, scene_id: str) -> Path:
    return root / "scans" / scene_id / f"{scene_id}.sens"


@functools.cache
def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of unmapping it (once per process).

    Every frame makes a dozen multi-MB numpy temporaries; by default glibc maps each with mmap
    and unmaps it when freed, so the next frame page-faults all of it again (a third of the
    CPU time at 640x480). Raising the mmap and trim thresholds to 256 MB keeps the pages in
    the heap. No effect (and no error) where glibc's mallopt is unavailable.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h> parameter numbers
    mallopt(m_trim_threshold, 256 << 20)
    mallopt(m_mmap_threshold, 256 << 20)


def prepare_scene(root: str | Path, scene_id: str, scenes_dir: str | Path,
                  settings: PrepareSettings) -> dict[str, Any]:
    """Turn one scene's ``.sens`` into ``scenes_dir/<scene_id>`` (atomically).

    Returns the :class:`SceneStats` as a dict. Bad scene files (missing, corrupt, unsupported)
    do not raise: the stats come back with ``status="error"`` and the message.
    """
    _keep_freed_memory()
    root, scenes_dir = Path(root), Path(scenes_dir)
    stats = SceneStats(scene_id=scene_id)
    sens_path = sens_path_of(root, scene_id)
    start = time.perf_counter()
    tmp = scene_jobs.fresh_tmp_dir(scenes_dir, scene_id)  # drops a stale, interrupted one
    try:
        columns = _scene_pairs(sens_path, scene_id, settings, stats)
    except SCENE_ERRORS as exc:
        message = str(exc) or type(exc).__name__
        if str(sens_path.parent) not in message:
            message = f"{sens_path}: {message}"
        stats.status, stats.error, stats.file = "error", message, str(sens_path)
        stats.seconds = time.perf_counter() - start
        return asdict(stats)
    # Failing to write the output (disk full, permissions) is not the scene's fault: it
    # propagates and stops the run.
    tic = time.perf_counter()
    stats.seconds = tic - start
    _write_scene(columns, stats, tmp, scenes_dir / scene_id, settings)
    stats.timings["write"] += time.perf_counter() - tic
    stats.seconds = time.perf_counter() - start
    return asdict(stats)


def _scene_pairs(sens_path: Path, scene_id: str, settings: PrepareSettings,
                 stats: SceneStats) -> dict[str, Any]:
    """Read the kept frames of one scene into in-memory columns (a scene is ~100 pairs)."""
    from cd2p.data.sens import SensReader, check_jpeg

    if not sens_path.is_file():
        raise FileNotFoundError(f"{sens_path}: file not found")
    txt_path = sens_path.with_suffix(".txt")
    meta = read_scene_meta(txt_path) if txt_path.is_file() else {}
    # ScanNet's axisAlignment rotates a scan so that z is up and the walls follow x/y; test
    # scenes have none, and then the scan's own world frame is used.
    align = axis_alignment(meta, str(txt_path)) if "axisAlignment" in meta else None
    stats.axis_aligned = align is not None
    stats.sens_bytes = sens_path.stat().st_size
    timings = stats.timings
    images, points, indices, poses = [], [], [], []

    def skip(index: int, reason: str, detail: str) -> None:
        stats.skipped[reason] += 1
        if reason in DAMAGE_REASONS:
            stats.damaged_frames.append({"frame": index, "reason": reason, "detail": detail})

    tic = time.perf_counter()
    with SensReader(sens_path) as reader:
        header = reader.header
        if header.color_compression != JPEG:
            raise ValueError(
                f"{sens_path}: colour compression {header.color_compression} is not JPEG (2); "
                "pairs store the JPEG bytes as they are"
            )
        check_intrinsics(header, settings.max_depth, str(sens_path))
        stats.frames_in_file = len(reader)
        declared = meta.get("numColorFrames")
        if declared is not None and declared.strip() != str(len(reader)):
            stats.warnings.append(
                f"{txt_path.name} says numColorFrames = {declared}, the .sens has {len(reader)}"
            )
        intrinsic_depth = np.asarray(header.intrinsic_depth, dtype=np.float32)
        for index in range(0, len(reader), settings.frame_skip):
            stats.frames_considered += 1
            # The pose alone decides whether a frame is usable: read it before any payload.
            pose = reader.pose(index)
            problem = pose_problem(pose)
            if problem is not None:
                skip(index, *problem)
                continue
            frame = reader.frame(index)
            stats.frames_read += 1
            stats.payload_bytes_read += len(frame.color_bytes) + len(frame.depth_bytes)
            toc = time.perf_counter()
            timings["read"] += toc - tic
            tic = toc

            # The JPEG is stored, not decoded, here; checking it now names the .sens and the
            # frame, where the teacher would only see "row k" of a prepared scene.
            try:
                check_jpeg(frame.color_bytes, header.color_width, header.color_height)
            except ValueError as exc:
                skip(index, "undecodable_color", f"colour payload: {exc}")
                continue
            finally:
                toc = time.perf_counter()
                timings["color_check"] += toc - tic
                tic = toc

            depth = frame.decode_depth(header.depth_shift)
            toc = time.perf_counter()
            timings["depth_decode"] += toc - tic
            tic = toc

            valid = (depth > 0) & (depth <= settings.max_depth)
            if int(np.count_nonzero(valid)) < settings.min_valid_points:
                skip(index, "too_few_valid_depth", "")
                continue
            camera = backproject_depth(depth, intrinsic_depth)
            toc = time.perf_counter()
            timings["backproject"] += toc - tic
            tic = toc

            # Voxelise in the camera frame: the grid's orientation does not matter for evening
            # out the density, and only the kept points then need the world transform.
            rng = frame_rng(settings.seed, scene_id, index)
            chosen = reduce_points(camera, settings.num_points, settings.voxel_size, rng, valid)
            toc = time.perf_counter()
            timings["sampling"] += toc - tic
            tic = toc

            to_world = pose.astype(np.float64) if align is None else align @ pose
            # The pose and the alignment passed their checks, so overflow here means data
            # beyond what they cover: the check below skips the frame (numpy need not warn).
            with np.errstate(over="ignore", invalid="ignore"):
                world = transform_points(chosen, to_world)
                world -= world.mean(axis=0, dtype=np.float64).astype(np.float32)
            problem = find_non_finite(world)
            if problem is not None:
                skip(index, "non_finite_points", f"points: {problem}")
                continue
            images.append({"bytes": frame.color_bytes, "path": None})
            points.append(world)
            indices.append(index)
            poses.append(np.asarray(pose, dtype=np.float32))
            toc = time.perf_counter()
            timings["backproject"] += toc - tic
            tic = toc
        timings["read"] += time.perf_counter() - tic
    count = len(indices)
    stats.pairs = count
    stats.images_sha256 = images_digest(image["bytes"] for image in images)
    p = settings.num_points
    return {
        "image": images,
        "points": np.stack(points) if count else np.zeros((0, p, 3), np.float32),
        "scene_id": [scene_id] * count,
        "frame_index": np.asarray(indices, dtype=np.int32),
        "pose": np.stack(poses) if count else np.zeros((0, 4, 4), np.float32),
        "intrinsic_color": np.tile(np.asarray(header.intrinsic_color, np.float32), (count, 1, 1)),
        "intrinsic_depth": np.tile(intrinsic_depth, (count, 1, 1)),
    }


def _write_scene(columns: dict[str, Any], stats: SceneStats, tmp: Path, final: Path,
                 settings: PrepareSettings) -> None:
    from datasets import Dataset
    from datasets.utils.tqdm import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    # The last guard before writing: every frame was checked where its arrays were made.
    for name in ("points", "pose", "intrinsic_color", "intrinsic_depth"):
        require_finite(columns[name], f"{final} (column {name!r})")
    dataset = Dataset.from_dict(columns, features=pair_features(settings.num_points))
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        # One shard: a scene is tens of MB, and a single shard also stores an empty scene.
        dataset.save_to_disk(str(tmp), num_shards=1)
    finally:
        if not was_disabled:
            enable_progress_bars()
    record = asdict(stats)
    record["settings"] = settings.to_json()
    scene_jobs.commit_scene_dir(tmp, final, record)


# --------------------------------------------------------------------------- whole run


def _summarise(stats: list[dict[str, Any]], settings: PrepareSettings, *, root: Path, out: Path,
               scenes: list[str], split: str, scenes_file: str | Path | None,
               shard: tuple[int, int], workers: int, seconds: float, interrupted: bool
               ) -> dict[str, Any]:
    worked = [s for s in stats if s["status"] == "done"]
    ok = [s for s in stats if s["status"] in ("done", "resumed")]
    new_pairs = sum(s["pairs"] for s in worked)
    new_bytes = sum(s["sens_bytes"] for s in worked)
    return {
        "root": str(root),
        "out": str(out),
        "split": None if scenes_file is not None else split,
        "scenes_file": None if scenes_file is None else str(scenes_file),
        "shard": list(shard),
        "workers": workers,
        "settings": settings.to_json(),
        "interrupted": interrupted,
        "scenes": scene_jobs.scene_counts(stats, len(scenes)),
        "frames_in_files": sum(s["frames_in_file"] for s in ok),
        "frames_considered": sum(s["frames_considered"] for s in ok),
        "frames_read": sum(s["frames_read"] for s in ok),
        "pairs_written": sum(s["pairs"] for s in ok),
        # .get: scenes prepared by an older cd2p (resumed) lack the newer reasons.
        "frames_skipped": {r: sum(s["skipped"].get(r, 0) for s in ok) for r in SKIP_REASONS},
        "damaged_frames": [{"scene": s["scene_id"], "file": str(sens_path_of(root, s["scene_id"])),
                            **frame}
                           for s in sorted(ok, key=lambda s: s["scene_id"])
                           for frame in s.get("damaged_frames", [])],
        "errors": scene_jobs.scene_errors(stats),
        "warnings": scene_jobs.scene_warnings(stats),
        "scenes_without_axis_alignment": sorted(s["scene_id"] for s in ok
                                                if not s["axis_aligned"]),
        "seconds": round(seconds, 3),
        "pairs_this_run": new_pairs,
        "pairs_per_second": round(new_pairs / seconds, 2) if seconds > 0 else None,
        "sens_mb_per_second": round(new_bytes / 1e6 / seconds, 2) if seconds > 0 else None,
        "time_split_seconds": {k: round(sum(s["timings"].get(k, 0.0) for s in worked), 4)
                               for k in TIMING_KEYS},
        "per_scene": {s["scene_id"]: {k: s[k] for k in ("status", "pairs", "frames_in_file",
                                                         "skipped", "seconds", "error")}
                      for s in sorted(stats, key=lambda s: s["scene_id"])},
    }


def prepare_scannet(
    root: str | Path,
    out: str | Path,
    *,
    frame_skip: int = 25,
    num_points: int = 4096,
    split: str = "train",
    scenes_file: str | Path | None = None,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    min_valid_points: int = 1024,
    max_depth: float = 6.0,
    voxel_size: float = 0.02,
    seed: int = 0,
    progress: bool = True,
    on_scene_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Prepare RGB/point pairs for the scenes of a ScanNet v2 root (see the module docstring).

    Args:
        root: ScanNet root holding ``scans/<scene>/<scene>.sens``.
        out: output directory; finished scenes already in it are kept (resume).
        frame_skip: keep frames ``0, frame_skip, 2 * frame_skip, ...``.
        num_points: points per pair.
        split: ``train``, ``val`` or ``all``; ignored when ``scenes_file`` is given.
        scenes_file: text file of scene ids, one per line.
        workers: processes over scenes (1 = in this process).
        shard: ``(I, N)``: prepare only part I of the sorted scene list split N ways.
        min_valid_points: frames with fewer valid depth pixels are skipped.
        max_depth: depth beyond this (metres) is dropped, where the sensor is unreliable.
        voxel_size: voxel edge (metres) of the density-evening step.
        seed: base seed of the per-frame sampling.
        progress: show a rich progress bar.
        on_scene_done: called in this process with each scene's statistics as it finishes.

    Returns:
        The report, also written atomically to ``out/prepare_report[.shard-I-of-N].json``.
        Scenes with bad files are listed under ``errors`` (the run goes on without them).
    """
    settings = PrepareSettings(frame_skip=frame_skip, num_points=num_points,
                               voxel_size=voxel_size, max_depth=max_depth,
                               min_valid_points=min_valid_points, seed=seed)
    scene_jobs.check_workers(workers)
    root, out = Path(root), Path(out)
    scenes = scene_jobs.select_scenes(root, split, scenes_file, shard, scene_file="{scene}.sens")
    task = functools.partial(prepare_scene, root, scenes_dir=out / "scenes", settings=settings)

    def summarise(stats: list[dict[str, Any]], seconds: float, interrupted: bool
                  ) -> dict[str, Any]:
        return _summarise(stats, settings, root=root, out=out, scenes=scenes, split=split,
                          scenes_file=scenes_file, shard=shard, workers=workers,
                          seconds=seconds, interrupted=interrupted)

    return scene_jobs.run_scene_jobs(
        task, scenes, out, config=settings.to_json(), summarise=summarise,
        report_file=scene_jobs.report_name(shard), workers=workers, progress=progress,
        counter="pairs", on_scene_done=on_scene_done,
    )
