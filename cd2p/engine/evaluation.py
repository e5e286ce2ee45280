"""Evaluation of task models on prepared datasets (what ``cd2p evaluate`` and fine-tuning's
model selection run), through the task table: each task's module holds its own evaluation.

Voting views and scene draws come from generators seeded by ``(seed, item index, vote)``, so
the numbers of an evaluation do not depend on the batch size or on how items are batched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cd2p.tasks import get_task


@dataclass(frozen=True)
class VoteSettings:
    """How voting views are made: Point-MAE's test-time views (a random ``num_points`` of the
    first ``resample_ratio * num_points`` FPS points, then scale and translate). ``seed`` also
    seeds the scene draws of scene tasks."""

    resample_ratio: float = 1.2
    scale_low: float = 2.0 / 3.0
    scale_high: float = 1.5
    translate: float = 0.2
    seed: int = 0


@dataclass
class EvalReport:
    """What an evaluation measured; metrics are fractions in [0, 1].

    classification: ``oa``, ``macc`` (and ``oa_vote``, ``macc_vote`` with votes),
    ``per_class`` rows (name, support, acc[, acc_vote]) and ``confusion`` ``(C, C)`` (of the
    voted predictions when voting). partseg: ``instance_miou``, ``class_miou``, ``accuracy``
    (and ``*_vote``), ``per_class`` rows (name, shapes, miou[, miou_vote]). segmentation:
    ``miou``, ``oa``, ``macc``, ``per_class`` rows (name, points, iou, acc) and the point
    confusion matrix. detection: ``map_0_25``, ``map_0_5``, ``ar_0_25``, ``ar_0_5``,
    ``per_class`` rows (name, boxes, ap_0_25, ap_0_5, recall_0_25, recall_0_5).
    """

    task: str
    metrics: dict[str, float]
    per_class: list[dict[str, Any]]
    class_names: list[str]
    confusion: torch.Tensor | None = None
    num_samples: int = 0
    votes: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    # What the task's pictures need beyond the numbers (e.g. a few scenes and their boxes);
    # not written to metrics.json.
    visuals: dict[str, Any] = field(default_factory=dict, repr=False)
    # What each metric is, in words (single view or voted, over what), and which predictions
    # the confusion matrix counts: written to metrics.json so that a number is never ambiguous.
    descriptions: dict[str, str] = field(default_factory=dict)
    confusion_of: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "task": self.task,
            "samples": self.num_samples,
            "votes": self.votes,
            **self.metrics,
            "per_class": self.per_class,
            **self.extra,
        }
        if self.descriptions:
            out["metric_descriptions"] = {
                k: v for k, v in self.descriptions.items() if k in self.metrics
            }
        out["units"] = "metrics are fractions in [0, 1] (x 100 for percent)"
        if self.confusion is not None:
            out["confusion_matrix"] = self.confusion.tolist()
            if self.confusion_of:
                out["confusion_matrix_of"] = self.confusion_of
        return out


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters."""
    return next(model.parameters()).device


def check_class_names(model: nn.Module, names: list[str], what: str) -> None:
    """The model and the data must name the same classes in the same order."""
    own = getattr(model, "class_names", None) or getattr(model, "category_names", None)
    if own is not None and list(own) != list(names):
        raise ValueError(
            f"the model was trained on {what} {own[:5]}... but the data has {names[:5]}...: "
            "they must be the same, in the same order"
        )


def evaluate(
    task: str,
    model: nn.Module,
    data: Any,
    votes: int = 1,
    *,
    split: str | None = None,
    num_points: int | None = None,
    batch_size: int = 32,
    settings: VoteSettings = VoteSettings(),
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Evaluate a task model on a prepared dataset (a path and ``split``, or a loaded split).

    ``votes`` is the task's: for the object tasks ``<= 1`` is one deterministic view and
    ``> 1`` also reports the ``*_vote`` metrics averaged over that many augmented views; for
    scene segmentation it is the number of times every vertex is scored. ``num_points``
    defaults to the model's own ``num_points`` (what it was trained on); ``split`` to the
    task's validation split. ``progress(n)`` is called as ``n`` more items are done.
    """
    spec = get_task(task)
    if isinstance(data, str | Path):
        data = spec.load_split(Path(data), split or default_split(task))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return spec.evaluate(
                model,
                data,
                votes=votes,
                batch_size=batch_size,
                num_points=num_points or getattr(model, "num_points", None),
                settings=settings,
                progress=progress,
            )
    finally:
        model.train(was_training)


def default_split(task: str) -> str:
    """The split a task evaluates on unless told otherwise (its recipe's ``val_split``)."""
    from cd2p.config import Recipe

    return get_task(task).section(Recipe(task=task)).val_split


__all__ = [
    "EvalReport",
    "VoteSettings",
    "check_class_names",
    "default_split",
    "evaluate",
    "model_device",
]
