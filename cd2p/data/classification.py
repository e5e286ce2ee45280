"""The classification cache shared by ModelNet40 and ScanObjectNN (``cd2p prepare modelnet40 |
scanobjectnn``), its torch dataset, and few-shot subsets of it.

Layout::

    OUT/meta.json                 format, source, class names, and per split the shape ids
    OUT/<split>.safetensors       points (S, P, 3) float32, labels (S,) int64

Every cloud is stored in farthest-point-sampling order, so that its first ``k`` points are
themselves an FPS sample of ``k`` points (see :mod:`cd2p.data.modelnet40`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from cd2p._atomic import atomic_write_text
from cd2p.data.common import META_FILE, normalize_unit_sphere, read_cache_meta

CACHE_FORMAT = "cd2p-classification"
CACHE_VERSION = 1


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


def stack_normalized(clouds: Sequence[np.ndarray], where: str) -> np.ndarray:
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


def few_shot_subset(
    data: ClassificationSplit, shots: int, seed: int = 0, where: str = "the training split"
) -> ClassificationSplit:
    """``shots`` shapes of every class of ``data`` (``K * C`` shapes), drawn without replacement.

    The draw is a pure function of ``seed``: one random order of each class's shapes, of which
    the first ``shots`` are kept, so a run and its resumption train on the same shapes and the
    ``K``-shot subset is contained in the ``K + 1``-shot one. Shapes keep their order in
    ``data``. A class with fewer than ``shots`` shapes is an error naming it (``where`` says
    which data it is).
    """
    if shots < 1:
        raise ValueError(f"few-shot needs at least 1 shape per class, got {shots}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c, name in enumerate(data.class_names):
        members = (data.labels == c).nonzero().flatten()
        if len(members) < shots:
            raise ValueError(
                f"{where}: class {name!r} has {len(members)} shapes, fewer than the {shots} "
                "per class asked for by few-shot"
            )
        keep.append(members[torch.randperm(len(members), generator=g)[:shots]])
    index = torch.cat(keep).sort().values
    return ClassificationSplit(
        points=data.points[index],
        labels=data.labels[index],
        shape_ids=[data.shape_ids[i] for i in index.tolist()],
        class_names=list(data.class_names),
        source=data.source,
    )


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
    "CACHE_FORMAT",
    "ClassificationSplit",
    "PointClassificationDataset",
    "few_shot_subset",
    "load_classification_cache",
    "save_classification_cache",
    "stack_normalized",
]
