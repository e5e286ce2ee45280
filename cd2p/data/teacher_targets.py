"""Teacher targets for prepared pairs (``cd2p prepare teacher``), stored next to the pairs.

The teacher is deterministic per image (no augmentation of the RGB frame), so its targets are
computed once and pre-training reads them instead of running CLIP every epoch. Layout (the
pairs contract)::

    PAIRS/scenes/<scene_id>/                     a prepared scene dataset (N rows)
    PAIRS/targets/<target>/<scene_id>.safetensors
        "targets": float16 (N, T, C) in the scene dataset's row order
                   ((10, 768) for target "prefix", (1, 512) for "clip")
        metadata:  {"teacher": <description>, "random_teacher": "true" | "false"}
    PAIRS/targets/<target>/.<scene_id>.safetensors.<random>.tmp   being written (then renamed)

A scene counts as done when its targets file opens, holds ``N`` rows of the right shape and
was written by the same kind of teacher; anything else (no file, a stale temporary, a
truncated or mis-shaped file) is computed again, so an interrupted run resumes where it
stopped. Targets of a *random* teacher next to real ones (or of another random seed) are an
error unless ``overwrite`` is set: mixing them in one pre-training set would be silent and
wrong. Two real teachers whose descriptions differ only name their weight files differently
(the Hub download vs. a local copy of the same file), so they are not told apart.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cd2p._atomic import atomic_output
from cd2p.data.pairs import scene_dirs, target_file
from cd2p.models.teacher import Teacher, clip_transform, decode_image

TARGETS_DIR = "targets"
TENSOR_NAME = "targets"


def targets_metadata(teacher: Teacher) -> dict[str, str]:
    """The safetensors metadata of a targets file written by ``teacher``."""
    return {"teacher": teacher.description, "random_teacher": str(teacher.is_random).lower()}


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

    path = Path(path)
    half = targets.detach().to("cpu", torch.float16).contiguous()
    if not torch.isfinite(half).all():
        # fp16 overflows above 65504; a real CLIP/ClipCap target never comes close.
        raise ValueError(f"non-finite teacher targets for {path} (float16 overflow or NaN input)")
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
    """One scene dataset and the targets file it needs."""

    scene_dir: Path
    rows: int
    out: Path

    @property
    def scene_id(self) -> str:
        return self.scene_dir.name


@dataclass
class TargetsPlan:
    """What ``write_teacher_targets`` will do: scenes to compute and scenes already done."""

    target: str
    teacher: str
    random_teacher: bool
    to_compute: list[SceneJob] = field(default_factory=list)
    done: list[SceneJob] = field(default_factory=list)

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


def _scene_rows(scene_dir: Path) -> int:
    from datasets import load_from_disk

    return len(load_from_disk(str(scene_dir)))


def plan_teacher_targets(
    roots: str | Path | Sequence[str | Path],
    teacher: Teacher,
    *,
    overwrite: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> TargetsPlan:
    """Sort the scenes under the prepared pairs ``roots`` into done and to-do for ``teacher``.

    ``shard=(i, n)`` keeps every n-th scene starting at the i-th (one process per GPU).
    Raises ``ValueError`` when a complete targets file of another teacher exists and
    ``overwrite`` is False.
    """
    index, count = shard
    plan = TargetsPlan(teacher.target, teacher.description, teacher.is_random)
    wanted = targets_metadata(teacher)
    for scene_dir in scene_dirs(roots)[index::count]:
        job = SceneJob(scene_dir, _scene_rows(scene_dir), target_file(scene_dir, teacher.target))
        header = read_targets_header(job.out)
        complete = header is not None and header[0] == (job.rows, *teacher.target_shape)
        if complete and not overwrite and _other_teacher(header[2], wanted):
            raise ValueError(
                f"{job.out} holds targets of another teacher "
                f"({header[2].get('teacher', 'unknown')!r}, random_teacher="
                f"{header[2].get('random_teacher', '?')}) than the one requested "
                f"({wanted['teacher']!r}, random_teacher={wanted['random_teacher']}); "
                "one pre-training set must not mix teachers: pass --overwrite to recompute "
                f"all of {job.out.parent}, or use another PAIRS copy"
            )
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
    if plan.target != teacher.target or plan.teacher != teacher.description:
        raise ValueError("the plan was made for another teacher")
    start = time.perf_counter()
    metadata = targets_metadata(teacher)
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
        _remove_stale_temporaries(job.out)
    filled: list[torch.Tensor] = []
    have = 0

    def flush() -> None:
        """Write every leading scene whose rows are all computed."""
        nonlocal filled, have
        while pending and have >= pending[0].rows:
            job = pending.pop(0)
            rows = torch.cat(filled) if filled else torch.empty(0, *teacher.target_shape)
            write_targets(job.out, rows[: job.rows], metadata)
            filled, have = [rows[job.rows :]], have - job.rows

    flush()  # scenes with no pairs get an empty (0, T, C) file
    for batch in loader:
        out = teacher(batch.to(teacher.device, non_blocking=True)).float().cpu()
        filled.append(out)
        have += out.shape[0]
        flush()
        if on_images is not None:
            on_images(out.shape[0])
    if pending:  # the loader ran dry early: a scene changed on disk while we read it
        raise RuntimeError(f"scene {pending[0].scene_dir} has fewer rows than when planned")
    return TargetsSummary(
        target=teacher.target,
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
) -> TargetsSummary:
    """``plan_teacher_targets`` then ``write_teacher_targets``: the library form of
    ``cd2p prepare teacher``."""
    plan = plan_teacher_targets(roots, teacher, overwrite=overwrite, shard=shard)
    return write_teacher_targets(
        plan, teacher, batch_size=batch_size, workers=workers, on_images=on_images
    )
