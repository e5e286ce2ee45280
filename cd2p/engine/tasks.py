"""What every fine-tuning task driver shares: the task names, prepared splits and their
datasets, few-shot subsets, pre-trained backbones, the run-directory names and the result.

:mod:`cd2p.engine.finetune` (fine-tuning), :mod:`cd2p.engine.evaluation` (``cd2p evaluate``,
voting) and :mod:`cd2p.engine.linear_probe` all build on these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from cd2p.config import Recipe
from cd2p.data.modelnet40 import (
    ClassificationSplit,
    PointClassificationDataset,
    load_classification_cache,
)
from cd2p.data.shapenetpart import PartSegDataset, PartSegSplit, load_partseg_cache
from cd2p.engine.trainer import RunResult
from cd2p.models.backbone import Cd2pBackbone

Task = Literal["classification", "partseg"]
TASKS: tuple[str, ...] = ("classification", "partseg")
MODEL_DIR = "model"
RUN_INFO = "run.json"
FINAL_METRICS = "metrics.json"
PROBE_DIR = "probe"


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


# -- data ------------------------------------------------------------------------------------


def load_task_split(task: str, path: str | Path, split: str) -> ClassificationSplit | PartSegSplit:
    """One split of a prepared dataset of the task's kind."""
    check_task(task)
    if task == "classification":
        return load_classification_cache(path, split)
    return load_partseg_cache(path, split)


def task_dataset(task: str, data: Any, num_points: int, seed: int = 0) -> Dataset:
    """The deterministic dataset of ``num_points`` per item over a loaded split."""
    if task == "classification":
        return PointClassificationDataset(data, num_points)
    return PartSegDataset(data, num_points, seed)


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


# -- pre-trained backbones -------------------------------------------------------------------


def load_backbone(init: str | Path) -> Cd2pBackbone:
    """A pre-trained backbone from a saved directory, a pre-training run (its ``backbone/``)
    or a Hub id."""
    path = Path(init)
    if path.is_dir() and (path / "backbone" / "config.json").is_file():
        path = path / "backbone"
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            kind = json.loads(config.read_text()).get("model_kind", "backbone")
            if kind != "backbone":
                raise ValueError(
                    f"{path} holds a {kind!r} model; --init needs a backbone (a pre-training "
                    "run's backbone/ directory, or a saved Cd2pBackbone)"
                )
        return Cd2pBackbone.from_pretrained(str(path))
    if path.exists() or str(init).count("/") != 1:
        raise FileNotFoundError(f"--init {init}: not a backbone directory nor a Hub id (org/name)")
    return Cd2pBackbone.from_pretrained(str(init))


# -- results ---------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """The outcome of :func:`run_finetune` / :func:`run_linear_probe`."""

    run: RunResult | None
    model_dir: Path | None
    metrics: dict[str, float]
    best: dict[str, Any] | None
    recipe: Recipe
    notes: list[str] = field(default_factory=list)
