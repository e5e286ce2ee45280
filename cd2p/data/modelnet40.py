"""ModelNet40 (``modelnet40_normal_resampled``) and the classification cache shared with
ScanObjectNN.

The files users have (PointNet++'s resampled release)::

    ROOT/modelnet40_shape_names.txt     40 class names, one a line (line number = label)
    ROOT/modelnet40_train.txt           9843 shape ids (``airplane_0001``), one a line
    ROOT/modelnet40_test.txt            2468 shape ids
    ROOT/<class>/<shape id>.txt         10 000 lines ``x,y,z,nx,ny,nz`` (comma separated)

A shape id is ``<class>_<4 digits>`` and the class may itself hold underscores
(``night_stand_0001``), so the class is everything before the last underscore.

The **classification cache** (``cd2p prepare modelnet40 ROOT OUT``) parses the text once::

    OUT/meta.json                 format, source, class names, and per split the shape ids
    OUT/<split>.safetensors       points (S, P, 3) float32, labels (S,) int64

Each cloud is reduced by farthest point sampling to ``P`` points and stored **in FPS order**,
so that its first ``k`` points are themselves an FPS sample of ``k`` points: a loader gets the
1024-point FPS view (or Point-MAE's 1200-point pool) by slicing, without running FPS per
epoch. FPS of an FPS prefix is that prefix, so ``P = 2048`` (the default) trains exactly as
Point-MAE's 8192-point files for up to 1706 points per view (1.2 x 1706 = 2048). The cloud is
then centred and scaled into the unit sphere (Point-MAE's ``pc_normalize``). FPS in pure
torch costs about 0.3 s per ModelNet40 shape on a CPU core for 2048 points (an hour for the
dataset): pass ``device="cuda"`` (``--device cuda``) or install torch-cluster to go faster.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from cd2p._atomic import atomic_directory, atomic_write_text
from cd2p.ops import farthest_point_sample

CACHE_FORMAT = "cd2p-classification"
CACHE_VERSION = 1
META_FILE = "meta.json"
SHAPE_NAMES_FILE = "modelnet40_shape_names.txt"
SPLIT_FILE = "modelnet40_{split}.txt"
MODELNET_SPLITS = ("train", "test")
# Written by the synthetic generators next to the files: the cache's source becomes
# "synthetic-<format>", so that no card or report calls synthetic shapes ModelNet40.
SYNTHETIC_MARKER = "cd2p_synthetic.json"


def dataset_source(root: str | Path, name: str) -> str:
    """``name``, or ``synthetic-<name>`` for a folder written by a cd2p synthetic generator."""
    return f"synthetic-{name}" if (Path(root) / SYNTHETIC_MARKER).is_file() else name


# -- small shared helpers (also used by scanobjectnn / shapenetpart) ----------------------------


def progress_bar(enabled: bool = True) -> Progress:
    """The rich progress bar every preparation step shows."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


@contextmanager
def staged_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it to ``out`` when complete.

    Yields the temporary directory. If the block raises, nothing appears at ``out``; an
    existing ``out`` is only replaced (with ``overwrite``) once the new one is complete.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} already exists and is not empty; pass --overwrite to replace it"
        )
    with atomic_directory(out) as tmp:
        yield tmp


def normalize_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Centre ``(N, 3)`` points at their centroid and scale the farthest to radius 1."""
    centred = points - points.mean(0, keepdims=True)
    radius = float(np.sqrt((centred**2).sum(1)).max())
    return (centred / radius if radius > 0 else centred).astype(np.float32)


def fps_order(
    clouds: Sequence[np.ndarray],
    num_points: int,
    device: str = "cpu",
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Farthest-point-sample every ``(N_i, 3)`` cloud to ``min(num_points, N_i)`` points, in FPS
    order. Clouds of equal size are batched together, ``batch_size`` at a time."""
    out: list[np.ndarray | None] = [None] * len(clouds)
    by_size: dict[int, list[int]] = {}
    for i, cloud in enumerate(clouds):
        by_size.setdefault(len(cloud), []).append(i)
    for size, members in by_size.items():
        k = min(num_points, size)
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            pts = torch.from_numpy(np.stack([clouds[i] for i in chunk])).float().to(device)
            idx = farthest_point_sample(pts, k)
            picked = torch.gather(pts, 1, idx.unsqueeze(-1).expand(-1, -1, 3)).cpu().numpy()
            for j, i in enumerate(chunk):
                out[i] = picked[j]
            if on_batch is not None:
                on_batch(len(chunk))
    return out  # type: ignore[return-value]


# -- the ModelNet40 text format -------------------------------------------------------------


def read_shape_txt(path: str | Path, columns: int = 6) -> np.ndarray:
    """One shape file: ``columns`` comma- or space-separated numbers a line -> ``(N, columns)``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: shape file not found") from None
    try:
        values = np.array(text.replace(",", " ").split(), dtype=np.float32)
    except ValueError as exc:
        raise ValueError(f"{path}: not a table of numbers ({exc})") from None
    if values.size == 0 or values.size % columns:
        raise ValueError(
            f"{path}: expected {columns} numbers a line, got {values.size} numbers in all"
        )
    return values.reshape(-1, columns)


def class_of_shape(shape_id: str) -> str:
    """``night_stand_0001`` -> ``night_stand``."""
    if "_" not in shape_id:
        raise ValueError(f"shape id {shape_id!r} does not look like <class>_<number>")
    return shape_id.rsplit("_", 1)[0]


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty stripped lines of a list file, with an error naming the file if it is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_modelnet40_index(
    root: str | Path, split: str
) -> tuple[list[str], list[tuple[str, int, Path]]]:
    """Class names and the ``(shape_id, label, path)`` of every shape of ``split``."""
    root = Path(root)
    if split not in MODELNET_SPLITS:
        raise ValueError(f"ModelNet40 split must be one of {MODELNET_SPLITS}, got {split!r}")
    names = read_lines(root / SHAPE_NAMES_FILE, "is ROOT a modelnet40_normal_resampled folder?")
    label_of = {name: i for i, name in enumerate(names)}
    shapes = []
    list_file = root / SPLIT_FILE.format(split=split)
    for shape_id in read_lines(list_file, f"the {split} list of ModelNet40"):
        cls = class_of_shape(shape_id)
        if cls not in label_of:
            raise ValueError(
                f"{list_file}: shape {shape_id} has class {cls!r}, not in {SHAPE_NAMES_FILE}"
            )
        shapes.append((shape_id, label_of[cls], root / cls / f"{shape_id}.txt"))
    return names, shapes


def write_modelnet40(
    root: str | Path,
    class_names: Sequence[str],
    splits: Mapping[str, Sequence[tuple[str, np.ndarray]]],
) -> Path:
    """Write shapes in the ``modelnet40_normal_resampled`` layout (for tests and synthetic data).

    Args:
        root: output folder.
        class_names: the classes, in label order.
        splits: ``{"train": [(class_name, points (N, 6)), ...], "test": [...]}``; shapes of a
            class are numbered in the order given, across splits, as in the original release.
    """
    root = Path(root)
    counters = dict.fromkeys(class_names, 0)
    atomic_write_text(root / SHAPE_NAMES_FILE, "".join(f"{n}\n" for n in class_names))
    all_ids = []
    for split in MODELNET_SPLITS:
        ids = []
        for cls, points in splits.get(split, ()):
            if cls not in counters:
                raise ValueError(f"class {cls!r} is not in class_names")
            points = np.asarray(points, dtype=np.float32)
            if points.ndim != 2 or points.shape[1] != 6:
                raise ValueError(f"{cls}: points must be (N, 6) xyz + normal, got {points.shape}")
            counters[cls] += 1
            shape_id = f"{cls}_{counters[cls]:04d}"
            rows = "\n".join(",".join(f"{v:.6f}" for v in row) for row in points)
            atomic_write_text(root / cls / f"{shape_id}.txt", rows + "\n")
            ids.append(shape_id)
        atomic_write_text(root / SPLIT_FILE.format(split=split), "".join(f"{i}\n" for i in ids))
        all_ids += ids
    atomic_write_text(
        root / "filelist.txt", "".join(f"{class_of_shape(i)}/{i}.txt\n" for i in all_ids)
    )
    return root


# -- the classification cache ---------------------------------------------------------------


@dataclass
class ClassificationSplit:
    """One split of a classification cache, in memory.

    points: ``(S, P, 3)`` float32, each cloud in FPS order. labels: ``(S,)`` int64.
    """

    points: torch.Tensor
    labels: torch.Tensor
    shape_ids: list[str]
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)


def save_classification_cache(
    out: Path,
    source: str,
    class_names: Sequence[str],
    splits: Mapping[str, tuple[list[str], np.ndarray, np.ndarray]],
    extra: Mapping[str, object] | None = None,
) -> None:
    """Write a cache into the (already staged) directory ``out``.

    ``splits[name] = (shape_ids, points (S, P, 3), labels (S,))``.
    """
    meta: dict[str, object] = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "source": source,
        "class_names": list(class_names),
        "splits": {},
        **(extra or {}),
    }
    for split, (ids, points, labels) in splits.items():
        save_file(
            {
                "points": torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)),
                "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64)),
            },
            str(out / f"{split}.safetensors"),
        )
        meta["splits"][split] = {
            "count": len(ids),
            "points_per_shape": int(points.shape[1]),
            "shape_ids": list(ids),
        }
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1))


def read_cache_meta(path: str | Path, expected_format: str) -> dict:
    """``meta.json`` of a prepared cache, checked to be of ``expected_format``."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found: {path} is not a prepared dataset (run `cd2p prepare ...`)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path} is not valid JSON: {exc}") from None
    if meta.get("format") != expected_format:
        raise ValueError(
            f"{meta_path}: format {meta.get('format')!r}, expected {expected_format!r}"
        )
    return meta


def load_classification_cache(path: str | Path, split: str) -> ClassificationSplit:
    """Load one split (``train``, ``test``) of a prepared classification dataset."""
    path = Path(path)
    meta = read_cache_meta(path, CACHE_FORMAT)
    if split not in meta["splits"]:
        raise ValueError(f"{path} has no split {split!r}; it holds {', '.join(meta['splits'])}")
    tensors = load_file(str(path / f"{split}.safetensors"))
    labels = tensors["labels"]
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(meta["class_names"])):
        raise ValueError(
            f"{path / split}.safetensors: labels outside the {len(meta['class_names'])} classes"
        )
    return ClassificationSplit(
        points=tensors["points"],
        labels=labels,
        shape_ids=meta["splits"][split]["shape_ids"],
        class_names=meta["class_names"],
        source=meta["source"],
    )


def prepare_modelnet40(
    root: str | Path,
    out: str | Path,
    num_points: int = 2048,
    device: str = "cpu",
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Parse ``modelnet40_normal_resampled`` once into a classification cache at ``out``.

    Every shape is reduced to ``num_points`` points by FPS (kept in FPS order) and normalised
    into the unit sphere; normals are dropped (the backbone reads xyz only).
    """
    out = Path(out)
    indices = {split: read_modelnet40_index(root, split) for split in MODELNET_SPLITS}
    names = indices["train"][0]
    with staged_directory(out, overwrite) as tmp, progress_bar(show_progress) as bar:
        splits = {}
        for split, (_, shapes) in indices.items():
            task = bar.add_task(f"read {split}", total=len(shapes))
            clouds = []
            for _, _, file in shapes:
                clouds.append(read_shape_txt(file)[:, :3])
                bar.advance(task)
            task = bar.add_task(f"fps {split}", total=len(shapes))
            sampled = fps_order(
                clouds, num_points, device, on_batch=lambda n, t=task: bar.advance(t, n)
            )
            splits[split] = (
                [s[0] for s in shapes],
                _stack_equal(sampled, f"{root} ({split})"),
                np.array([s[1] for s in shapes], dtype=np.int64),
            )
        source = dataset_source(root, "modelnet40")
        save_classification_cache(tmp, source, names, splits, {"fps_points": num_points})
    return out


def _stack_equal(clouds: Sequence[np.ndarray], where: str) -> np.ndarray:
    # Normalise each cloud, then stack; a cloud with fewer points than the others cannot be
    # batched, so it is padded by repeating its own points (FPS order is kept for the rest).
    target = max(len(c) for c in clouds)
    out = np.empty((len(clouds), target, 3), dtype=np.float32)
    for i, cloud in enumerate(clouds):
        if len(cloud) < 1:
            raise ValueError(f"{where}: shape {i} has no points")
        cloud = normalize_unit_sphere(cloud)
        reps = math.ceil(target / len(cloud))
        out[i] = np.tile(cloud, (reps, 1))[:target]
    return out


# -- the torch dataset ----------------------------------------------------------------------


class PointClassificationDataset(Dataset):
    """Clouds of a :class:`ClassificationSplit`, each cut to its first ``num_points`` FPS points.

    Deterministic: the random part of training (drawing the view's points from this pool,
    Point-MAE's "FPS 1200, keep 1024 at random", and scale/translate) happens per batch in the
    fine-tuning driver, from the step's generator, so a resumed run sees the same views.

    Items: ``{"points": (num_points, 3) float32, "label": () int64}``.
    """

    def __init__(self, data: ClassificationSplit, num_points: int) -> None:
        available = data.points.shape[1]
        if num_points > available:
            raise ValueError(
                f"asked for {num_points} points per shape but the cache holds {available}; "
                "prepare it with more points or lower data.num_points"
            )
        self.data = data
        self.num_points = num_points

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "points": self.data.points[index, : self.num_points].float(),
            "label": self.data.labels[index],
        }


__all__ = [
    "ClassificationSplit",
    "PointClassificationDataset",
    "class_of_shape",
    "dataset_source",
    "load_classification_cache",
    "prepare_modelnet40",
    "read_modelnet40_index",
    "read_shape_txt",
    "save_classification_cache",
    "write_modelnet40",
]
