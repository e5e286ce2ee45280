"""Teacher targets for prepared pairs (``cd2p prepare teacher``), stored next to the pairs.

The teacher is deterministic per image (no augmentation of the RGB frame), so its targets are
computed once and pre-training reads them instead of running CLIP every epoch. Layout (the
pairs contract)::

    PAIRS/scenes/<scene_id>/                     a prepared scene dataset (N rows)
    PAIRS/targets/<target>/<scene_id>.safetensors
        "targets": float16 (N, T, C) in the scene dataset's row order
                   ((10, 768) for target "prefix", (1, 512) for "clip")
        metadata:  {"teacher": <description>, "random_teacher": "true" | "false",
                    "images_sha256": <digest of the scene's JPEGs the targets come from>}
    PAIRS/targets/<target>/.<scene_id>.safetensors.<random>.tmp   being written (then renamed)

Several targets (``prefix`` and ``clip``) come from one CLIP pass per image
(:meth:`Teacher.compute`); each has its own file, and its metadata names what computes it
(``"clip"`` files name CLIP alone, so the same CLIP with or without the mapper is one teacher).

A scene counts as done when its targets files open, hold ``N`` rows of the right shape, were
written by the same kind of teacher and from the same images: their ``images_sha256`` equals
the scene's (:func:`cd2p.data.scannet_pairs.images_digest` of its JPEGs in row order, read
from the scene's ``cd2p_scene.json`` or, for pairs without it, hashed from the dataset).
Anything else (no file, a stale temporary, a truncated or mis-shaped file, a scene re-prepared
with other frames but the same row count, targets written before the digest existed) is
computed again, so an interrupted run resumes where it stopped; ``TargetsPlan.outdated`` says
which scenes are recomputed because of their images. Targets of a *random* teacher next to
real ones (or of another random seed) are an error unless ``overwrite`` is set: mixing them
in one pre-training set would be silent and wrong. Two real teachers whose descriptions
differ only name their weight files differently (the Hub download vs. a local copy of the
same file), so they are not told apart.
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cd2p._atomic import atomic_output
from cd2p.data.pairs import scene_dirs, target_file
from cd2p.data.scene_jobs import SCENE_STATS_FILE
from cd2p.models.teacher import TARGETS, Teacher, clip_transform, decode_image, target_shape

TARGETS_DIR = "targets"
TENSOR_NAME = "targets"
IMAGES_KEY = "images_sha256"  # in the targets' metadata and the scene's cd2p_scene.json


def targets_metadata(teacher: Teacher, target: str | None = None) -> dict[str, str]:
    """The safetensors metadata of a ``target`` file (default: the teacher's own target)
    written by ``teacher``."""
    return {
        "teacher": teacher.target_description(target or teacher.target),
        "random_teacher": str(teacher.is_random).lower(),
    }


def parse_targets(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"prefix,clip"`` or ``["prefix", "clip"]`` -> ``("prefix", "clip")``, checked."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    if not names or any(name not in TARGETS for name in names):
        raise ValueError(
            f"unknown teacher target(s) {value!r}; choose among {', '.join(TARGETS)}, "
            "comma-separated (e.g. prefix,clip)"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"teacher target named twice in {value!r}")
    return tuple(names)


def read_targets_header(path: str | Path) -> tuple[tuple[int, ...], str, dict[str, str]] | None:
    """``(shape, dtype, metadata)`` of a targets file without reading its data; ``None`` when
    the file is absent or unreadable (a truncated file counts as absent)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if TENSOR_NAME not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                return None
            tensor = f.get_slice(TENSOR_NAME)
            return tuple(tensor.get_shape()), tensor.get_dtype(), dict(f.metadata() or {})
    except Exception:  # missing, truncated or not safetensors at all: not a complete file
        return None


def write_targets(path: str | Path, targets: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write ``targets (N, T, C)`` as float16 to ``path`` atomically (temp name + os.replace)."""
    from safetensors.torch import save_file

    from cd2p.data.common import require_finite

    path = Path(path)
    half = targets.detach().to("cpu", torch.float16).contiguous()
    # fp16 overflows above 65504; a real CLIP/ClipCap target never comes close.
    require_finite(half, f"teacher targets for {path} (float16 overflow or NaN input)")
    with atomic_output(path) as tmp:
        save_file({TENSOR_NAME: half}, str(tmp), metadata=metadata)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries an interrupted run left for this scene (never taken as complete)."""
    for stale in path.parent.glob(f".{path.stem}.*.tmp"):
        stale.unlink(missing_ok=True)


def _other_teacher(found: dict[str, str], wanted: dict[str, str]) -> bool:
    """Whether stored targets must not be mixed with the requested teacher's (see above)."""
    if found.get("random_teacher") != wanted["random_teacher"]:
        return True
    return wanted["random_teacher"] == "true" and found.get("teacher") != wanted["teacher"]


@dataclass(frozen=True)
class SceneJob:
    """One scene dataset and the targets files it needs (one per target, in plan order);
    ``images_sha256`` is the digest of its JPEGs, stored with the targets."""

    scene_dir: Path
    rows: int
    outs: tuple[Path, ...]
    images_sha256: str = ""

    @property
    def scene_id(self) -> str:
        return self.scene_dir.name

    @property
    def out(self) -> Path:
        """The file of the first target."""
        return self.outs[0]


@dataclass
class TargetsPlan:
    """What ``write_teacher_targets`` will do: scenes to compute and scenes already done.

    ``target`` names the targets as given (``"prefix"``, ``"prefix,clip"``); ``targets``
    lists them.
    """

    target: str
    teacher: str
    random_teacher: bool
    to_compute: list[SceneJob] = field(default_factory=list)
    done: list[SceneJob] = field(default_factory=list)
    targets: tuple[str, ...] = ()
    # scene id -> why its complete-looking targets are recomputed: other images (the scene was
    # re-prepared) or no images_sha256 (targets of an older cd2p, recomputed once)
    outdated: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.targets = self.targets or parse_targets(self.target)

    @property
    def images(self) -> int:
        """Images still to run through the teacher."""
        return sum(job.rows for job in self.to_compute)


@dataclass
class TargetsSummary:
    """The outcome of ``write_teacher_targets``."""

    target: str
    teacher: str
    random_teacher: bool
    scenes_done: list[str]
    scenes_skipped: list[str]
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def scene_images(scene_dir: Path) -> tuple[int, str]:
    """``(rows, images_sha256)`` of a prepared scene.

    The digest comes from the scene's ``cd2p_scene.json`` (``prepare scannet`` computes it
    from the bytes it stores, so planning reads no image); scenes without it (pairs written by
    an older cd2p or by other tools) are hashed from the dataset's image column, which reads
    the JPEG bytes once (about the scene's size, tens of MB, undecoded).
    """
    from datasets import load_from_disk

    from cd2p.data.scannet_pairs import images_digest

    data = load_from_disk(str(scene_dir))
    stats_file = scene_dir / SCENE_STATS_FILE
    if stats_file.is_file():
        digest = json.loads(stats_file.read_text(encoding="utf-8")).get(IMAGES_KEY)
        if digest:
            return len(data), digest
    column = data.data.column("image")  # Arrow structs {bytes, path}: nothing is decoded
    images = (value for chunk in column.chunks for value in chunk.field("bytes").to_pylist())
    return len(data), images_digest(images)


def plan_teacher_targets(
    roots: str | Path | Sequence[str | Path],
    teacher: Teacher,
    *,
    overwrite: bool = False,
    shard: tuple[int, int] = (0, 1),
    targets: str | Sequence[str] | None = None,
) -> TargetsPlan:
    """Sort the scenes under the prepared pairs ``roots`` into done and to-do for ``teacher``.

    ``targets``: the targets to write (``"prefix,clip"``: both from one CLIP pass); default
    the teacher's own. ``shard=(i, n)`` keeps every n-th scene starting at the i-th (one
    process per GPU). A scene is done when every one of its targets files is complete.
    Raises ``ValueError`` when a complete targets file of another teacher exists and
    ``overwrite`` is False.
    """
    names = parse_targets(targets if targets is not None else teacher.target)
    for name in names:
        teacher.target_description(name)  # a clip-only teacher cannot give prefixes
    index, count = shard
    plan = TargetsPlan(",".join(names), teacher.description, teacher.is_random, targets=names)
    for scene_dir in scene_dirs(roots)[index::count]:
        outs = tuple(target_file(scene_dir, name) for name in names)
        rows, digest = scene_images(scene_dir)
        job = SceneJob(scene_dir, rows, outs, images_sha256=digest)
        complete = True
        for name, out in zip(names, outs, strict=True):
            header = read_targets_header(out)
            this = header is not None and header[0] == (job.rows, *target_shape(name))
            wanted = targets_metadata(teacher, name)
            if this and not overwrite and _other_teacher(header[2], wanted):
                raise ValueError(
                    f"{out} holds targets of another teacher "
                    f"({header[2].get('teacher', 'unknown')!r}, random_teacher="
                    f"{header[2].get('random_teacher', '?')}) than the one requested "
                    f"({wanted['teacher']!r}, random_teacher={wanted['random_teacher']}); "
                    "one pre-training set must not mix teachers: pass --overwrite to "
                    f"recompute all of {out.parent}, or use another PAIRS copy"
                )
            if this and header[2].get(IMAGES_KEY) != job.images_sha256:
                # Same row count, other (or unknown) images: the rows would be silently wrong.
                plan.outdated[job.scene_id] = (
                    "computed from other images (the scene was prepared again)"
                    if header[2].get(IMAGES_KEY) else
                    "no images_sha256 (targets of an older cd2p, recomputed once)")
                this = False
            complete = complete and this
        (plan.done if complete and not overwrite else plan.to_compute).append(job)
    return plan


class _PairImages(Dataset):
    """The JPEGs of several scenes, in order, preprocessed for CLIP: item -> ``(3, 224, 224)``.

    Scene datasets are opened lazily in each process (DataLoader workers included), image
    column only and undecoded, so the point clouds are never read.
    """

    def __init__(self, jobs: Sequence[SceneJob], image_size: int) -> None:
        self.scenes = [job.scene_dir for job in jobs]
        self.starts = []
        total = 0
        for job in jobs:
            self.starts.append(total)
            total += job.rows
        self.total = total
        self.image_size = image_size
        self._open: dict[int, Any] = {}
        self._transform: Any = None

    def __len__(self) -> int:
        return self.total

    def _scene(self, scene: int) -> Any:
        if scene not in self._open:
            from datasets import Image, load_from_disk

            self._open.clear()  # items come in order: only the current scene stays open
            data = load_from_disk(str(self.scenes[scene])).select_columns(["image"])
            self._open[scene] = data.cast_column("image", Image(decode=False))
        return self._open[scene]

    def __getitem__(self, item: int) -> torch.Tensor:
        if self._transform is None:
            self._transform = clip_transform(self.image_size)
        scene = bisect.bisect_right(self.starts, item) - 1  # empty scenes share a start
        row = item - self.starts[scene]
        jpeg = self._scene(scene)[row]["image"]["bytes"]
        try:
            return self._transform(decode_image(jpeg))
        except OSError as exc:  # PIL's UnidentifiedImageError / truncated JPEG
            raise ValueError(f"{self.scenes[scene]}: row {row}: undecodable image: {exc}") from exc


def write_teacher_targets(
    plan: TargetsPlan,
    teacher: Teacher,
    *,
    batch_size: int = 64,
    workers: int = 0,
    on_images: Callable[[int], None] | None = None,
) -> TargetsSummary:
    """Run ``teacher`` over every image of ``plan.to_compute`` and write one targets file per scene.

    Batches run on the teacher's device and cross scene boundaries (a scene of 3 pairs does
    not waste a batch); each scene's file is written as soon as its last row is computed.
    ``workers`` DataLoader processes decode and preprocess the JPEGs; ``on_images(n)`` is
    called after every batch (progress bars).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if plan.teacher != teacher.description:
        raise ValueError("the plan was made for another teacher")
    start = time.perf_counter()
    names = plan.targets
    metadata = {name: targets_metadata(teacher, name) for name in names}
    images = _PairImages(plan.to_compute, teacher.image_size)
    loader = DataLoader(
        images,
        batch_size=batch_size,
        shuffle=False,  # rows must come back in dataset order
        num_workers=workers,
        pin_memory=teacher.device.type == "cuda",
    )
    pending = list(plan.to_compute)  # scenes in loader order; the head one is being filled
    for job in pending:
        for out in job.outs:
            _remove_stale_temporaries(out)
    filled: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    have = 0

    def flush() -> None:
        """Write every leading scene whose rows are all computed."""
        nonlocal have
        while pending and have >= pending[0].rows:
            job = pending.pop(0)
            for name, out in zip(names, job.outs, strict=True):
                parts = filled[name]
                rows = torch.cat(parts) if parts else torch.empty(0, *target_shape(name))
                write_targets(out, rows[: job.rows],
                              {**metadata[name], IMAGES_KEY: job.images_sha256})
                filled[name] = [rows[job.rows :]]
            have -= job.rows

    flush()  # scenes with no pairs get an empty (0, T, C) file
    for batch in loader:
        computed = teacher.compute(batch.to(teacher.device, non_blocking=True), names)
        for name in names:
            filled[name].append(computed[name].float().cpu())
        count = batch.shape[0]
        have += count
        flush()
        if on_images is not None:
            on_images(count)
    if pending:  # the loader ran dry early: a scene changed on disk while we read it
        raise RuntimeError(f"scene {pending[0].scene_dir} has fewer rows than when planned")
    return TargetsSummary(
        target=plan.target,
        teacher=teacher.description,
        random_teacher=teacher.is_random,
        scenes_done=[job.scene_id for job in plan.to_compute],
        scenes_skipped=[job.scene_id for job in plan.done],
        images=len(images),
        seconds=time.perf_counter() - start,
    )


def prepare_teacher_targets(
    roots: str | Path | Sequence[str | Path],
    teacher: Teacher,
    *,
    batch_size: int = 64,
    workers: int = 0,
    overwrite: bool = False,
    shard: tuple[int, int] = (0, 1),
    on_images: Callable[[int], None] | None = None,
    targets: str | Sequence[str] | None = None,
) -> TargetsSummary:
    """``plan_teacher_targets`` then ``write_teacher_targets``: the library form of
    ``cd2p prepare teacher`` (``targets="prefix,clip"`` writes both from one CLIP pass)."""
    plan = plan_teacher_targets(roots, teacher, overwrite=overwrite, shard=shard, targets=targets)
    return write_teacher_targets(
        plan, teacher, batch_size=batch_size, workers=workers, on_images=on_images
    )
