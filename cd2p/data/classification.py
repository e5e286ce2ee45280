"""The classification cache shared by ModelNet40 and ScanObjectNN (``cd2p prepare modelnet40 |
scanobjectnn``), its torch dataset, few-shot subsets of it (K shapes per class) and Point-BERT's
N-way K-shot episodes.

Layout::

    OUT/meta.json                 format, source, class names, per split the shape ids, and
                                  ``skipped``: the shapes left out (file, reason), e.g. for
                                  NaN / inf coordinates
    OUT/<split>.safetensors       points (S, P, 3) float32 (all finite), labels (S,) int64

Every cloud is stored in farthest-point-sampling order, so that its first ``k`` points are
themselves an FPS sample of ``k`` points (see :mod:`cd2p.data.modelnet40`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from cd2p._atomic import atomic_write_text
from cd2p._reading import reading
from cd2p.data.common import (
    META_FILE,
    normalize_unit_sphere,
    read_cache_meta,
    require_finite,
    require_items,
)

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
    skipped: Sequence[Mapping[str, object]] = (),
) -> None:
    """Write a cache into the (already staged) directory ``out``.

    ``splits[name] = (shape_ids, points (S, P, 3), labels (S,))``; ``skipped`` lists the
    shapes the preparer left out (``{"split", "id", "file", "reason"}``), stored in
    ``meta.json``. An empty split or a non-finite point is refused (nothing is written).
    """
    meta: dict[str, object] = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "source": source,
        "class_names": list(class_names),
        "splits": {},
        "skipped": [dict(item) for item in skipped],
        **(extra or {}),
    }
    for split, (ids, points, labels) in splits.items():
        file = out / f"{split}.safetensors"
        require_items(len(ids), f"{file.name} ({source}, split {split!r})", "shapes")
        # The last guard: the preparers skip shapes with non-finite values where they read
        # them; nothing that slipped past may reach the cache.
        require_finite(points, f"{file.name} ({source}, split {split!r})")
        save_file(
            {
                "points": torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)),
                "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64)),
            },
            str(file),
        )
        meta["splits"][split] = {
            "count": len(ids),
            "points_per_shape": int(points.shape[1]),
            "shape_ids": list(ids),
        }
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1))


def load_classification_cache(path: str | Path, split: str) -> ClassificationSplit:
    """Load one split (``train``, ``test``) of a prepared classification dataset.

    A split with no shapes is an error naming its file (training or evaluating on it would
    fail later, or report numbers over nothing).
    """
    path = Path(path)
    meta = read_cache_meta(path, CACHE_FORMAT)
    if split not in meta["splits"]:
        raise ValueError(f"{path} has no split {split!r}; it holds {', '.join(meta['splits'])}")
    with reading(path / f"{split}.safetensors", "prepare the data again"):
        tensors = load_file(str(path / f"{split}.safetensors"))
    labels = tensors["labels"]
    require_items(len(labels), f"{path / split}.safetensors (split {split!r})", "shapes")
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
    require_items(len(clouds), where, "shapes")
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


# -- Point-BERT's N-way K-shot episodes -------------------------------------------------------


@dataclass(frozen=True)
class Episode:
    """One fold of Point-BERT's few-shot benchmark: ``way`` classes, ``shot`` training shapes
    and ``queries`` test shapes of each, fold ``fold`` of the folds drawn with ``seed``."""

    way: int
    shot: int
    fold: int
    seed: int = 0
    queries: int = 20

    def __post_init__(self) -> None:
        if min(self.way, self.shot, self.queries) < 1 or self.fold < 0:
            raise ValueError(f"an episode needs way, shot, queries >= 1 and fold >= 0: {self}")

    @property
    def name(self) -> str:
        return f"{self.way}-way {self.shot}-shot, fold {self.fold}"


def _episode_generator(episode: Episode, *parts: object) -> torch.Generator:
    # A generator per (seed, way, shot, fold, part): each draw is a pure function of these,
    # whatever else is drawn, and the training and test draws can be made separately.
    key = ":".join(str(p) for p in ("few-shot", episode.seed, episode.way, episode.shot,
                                    episode.fold, *parts))  # fmt: skip
    return torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))


def episode_classes(num_classes: int, episode: Episode) -> list[int]:
    """The episode's classes in episode-label order: a random permutation of the classes, of
    which the first ``way`` are kept (Point-BERT's ``random.shuffle(keys)``, ``keys[:way]``)."""
    if episode.way > num_classes:
        raise ValueError(f"a {episode.way}-way episode needs {episode.way} classes; the data "
                         f"has {num_classes}")  # fmt: skip
    order = torch.randperm(num_classes, generator=_episode_generator(episode, "classes"))
    return order[: episode.way].tolist()


def episode_split(
    data: ClassificationSplit,
    episode: Episode,
    part: Literal["train", "test"],
    where: str = "the data",
) -> ClassificationSplit:
    """The episode's ``train`` shapes (``shot`` per class, from the training split) or ``test``
    shapes (``queries`` per class, from the test split), as Point-BERT's
    ``generate_few_shot_data.py`` draws them: for each chosen class, its shapes in a random
    order, the first ``shot`` (``queries``) kept. Labels become the episode labels
    ``0..way-1`` (the class's position in :func:`episode_classes`); ``class_names`` are the
    chosen classes' names in that order. Every draw is a pure function of the episode.
    """
    count = episode.shot if part == "train" else episode.queries
    classes = episode_classes(data.num_classes, episode)
    keep, labels = [], []
    for label, c in enumerate(classes):
        members = (data.labels == c).nonzero().flatten()
        if len(members) < count:
            what = "shots" if part == "train" else "test shapes (few_shot_queries)"
            raise ValueError(
                f"{where}: class {data.class_names[c]!r} has {len(members)} shapes, fewer than "
                f"the {count} {what} of a {episode.name} episode"
            )
        order = torch.randperm(len(members), generator=_episode_generator(episode, part, c))
        keep.append(members[order[:count]])
        labels.append(torch.full((count,), label, dtype=torch.long))
    index = torch.cat(keep)
    return ClassificationSplit(
        points=data.points[index],
        labels=torch.cat(labels),
        shape_ids=[data.shape_ids[i] for i in index.tolist()],
        class_names=[data.class_names[c] for c in classes],
        source=data.source,
    )


def episode_record(
    train: ClassificationSplit, test: ClassificationSplit, episode: Episode
) -> dict[str, Any]:
    """What a fold is, for the run's records: its classes and the ids of its shapes (the data
    split arguments are the episode's, from :func:`episode_split`)."""
    return {
        "way": episode.way,
        "shot": episode.shot,
        "fold": episode.fold,
        "seed": episode.seed,
        "queries": episode.queries,
        "classes": list(train.class_names),
        "train": list(train.shape_ids),
        "test": list(test.shape_ids),
    }


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
    "Episode",
    "PointClassificationDataset",
    "episode_classes",
    "episode_record",
    "episode_split",
    "few_shot_subset",
    "load_classification_cache",
    "save_classification_cache",
    "stack_normalized",
]
