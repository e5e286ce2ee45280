"""Evaluation of task models on prepared datasets, with or without voting (what
``cd2p evaluate`` and fine-tuning's model selection run).

Voting views come from generators seeded by ``(seed, shape index, vote)``, so the numbers of
an evaluation do not depend on the batch size or on the device order of the batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from cd2p.data.modelnet40 import ClassificationSplit, PointClassificationDataset
from cd2p.data.shapenetpart import PartSegDataset, PartSegSplit
from cd2p.engine.augment import scale_and_translate, step_generator
from cd2p.engine.metrics import (
    PartSegMeter,
    category_part_mask,
    confusion_matrix,
    mean_class_accuracy,
    overall_accuracy,
    per_class_accuracy,
    restrict_to_category,
)
from cd2p.engine.tasks import check_task, load_task_split


@dataclass(frozen=True)
class VoteSettings:
    """How voting views are made: Point-MAE's test-time views (a random ``num_points`` of the
    first ``resample_ratio * num_points`` FPS points, then scale and translate)."""

    resample_ratio: float = 1.2
    scale_low: float = 2.0 / 3.0
    scale_high: float = 1.5
    translate: float = 0.2
    seed: int = 0


@dataclass
class EvalReport:
    """What :func:`evaluate` measured; metrics are fractions in [0, 1].

    classification: ``oa``, ``macc`` (and ``oa_vote``, ``macc_vote`` with votes),
    ``per_class`` rows (name, support, acc[, acc_vote]) and ``confusion`` ``(C, C)`` (of the
    voted predictions when voting). partseg: ``instance_miou``, ``class_miou``, ``accuracy``
    (and ``*_vote``), ``per_class`` rows (name, shapes, miou[, miou_vote]).
    """

    task: str
    metrics: dict[str, float]
    per_class: list[dict[str, Any]]
    class_names: list[str]
    confusion: torch.Tensor | None = None
    num_samples: int = 0
    votes: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {
            "task": self.task,
            "samples": self.num_samples,
            "votes": self.votes,
            **self.metrics,
            "per_class": self.per_class,
            **self.extra,
        }
        if self.confusion is not None:
            out["confusion_matrix"] = self.confusion.tolist()
        return out


def _vote_view(
    points: torch.Tensor, index: int, vote: int, num_points: int, settings: VoteSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """One voting view of a cloud ``points (P, 3)``: indices of its ``num_points`` points and
    the augmented coordinates ``(num_points, 3)``, from a generator of ``(seed, index, vote)``."""
    g = step_generator(settings.seed, index, vote, stream="vote")
    idx = torch.rand(points.shape[0], generator=g).argsort()[:num_points].to(points.device)
    view = scale_and_translate(
        points[idx].unsqueeze(0), g, settings.scale_low, settings.scale_high, settings.translate
    )
    return idx, view[0]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def classification_logits(
    model: nn.Module,
    data: ClassificationSplit,
    num_points: int,
    votes: int = 0,
    batch_size: int = 32,
    settings: VoteSettings = VoteSettings(),
    progress: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits ``(S, C)`` on the first ``num_points`` FPS points of every cloud, and the mean
    logits over ``votes`` augmented views (``None`` without votes)."""
    device = _model_device(model)
    pool = min(data.points.shape[1], max(num_points, round(settings.resample_ratio * num_points)))
    loader = DataLoader(PointClassificationDataset(data, pool), batch_size=batch_size)
    plain, voted = [], []
    start = 0
    for batch in loader:
        pts = batch["points"].to(device)
        plain.append(model(pts[:, :num_points]).float().cpu())
        if votes:
            total = 0.0
            for v in range(votes):
                views = torch.stack(
                    [
                        _vote_view(pts[i], start + i, v, num_points, settings)[1]
                        for i in range(len(pts))
                    ]
                )
                total = total + model(views).float().cpu()
            voted.append(total / votes)
        start += len(pts)
        if progress is not None:
            progress(len(pts))
    return torch.cat(plain), (torch.cat(voted) if votes else None)


@torch.no_grad()
def partseg_logits(
    model: nn.Module,
    data: PartSegSplit,
    num_points: int,
    votes: int = 0,
    batch_size: int = 16,
    settings: VoteSettings = VoteSettings(),
    progress: Callable | None = None,
    seed: int = 0,
):
    """Yields per batch ``(logits (B, N, P), voted logits or None, labels (B, N), categories
    (B,))`` on ``num_points`` points of every shape (the same points for the votes, which only
    scale and translate them)."""
    device = _model_device(model)
    loader = DataLoader(PartSegDataset(data, num_points, seed), batch_size=batch_size)
    start = 0
    for batch in loader:
        pts, cats = batch["points"].to(device), batch["category"].to(device)
        logits = model(pts, cats).float().cpu()
        voted = None
        if votes:
            total = 0.0
            for v in range(votes):
                views = []
                for i in range(len(pts)):
                    g = step_generator(settings.seed, start + i, v, stream="vote")
                    views.append(
                        scale_and_translate(
                            pts[i : i + 1],
                            g,
                            settings.scale_low,
                            settings.scale_high,
                            settings.translate,
                        )
                    )
                total = total + model(torch.cat(views), cats).float().cpu()
            voted = total / votes
        start += len(pts)
        if progress is not None:
            progress(len(pts))
        yield logits, voted, batch["part_labels"], batch["category"]


def evaluate(
    task: str,
    model: nn.Module,
    data: str | Path | ClassificationSplit | PartSegSplit,
    votes: int = 1,
    *,
    split: str = "test",
    num_points: int | None = None,
    batch_size: int = 32,
    settings: VoteSettings = VoteSettings(),
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Evaluate a task model on a prepared dataset (a path and ``split``, or a loaded split).

    ``votes <= 1``: one deterministic view (the first ``num_points`` FPS points for
    classification, a fixed sample of each shape for part segmentation). ``votes > 1`` also
    reports the ``*_vote`` metrics, from logits averaged over that many augmented views.
    ``num_points`` defaults to the model's own ``num_points`` (what it was trained on).
    """
    check_task(task)
    if isinstance(data, str | Path):
        data = load_task_split(task, data, split)
    n = (
        num_points
        or getattr(model, "num_points", None)
        or (1024 if task == "classification" else 2048)
    )
    votes = votes if votes > 1 else 0
    was_training = model.training
    model.eval()
    try:
        if task == "classification":
            return _evaluate_classification(model, data, n, votes, batch_size, settings, progress)
        return _evaluate_partseg(model, data, n, votes, batch_size, settings, progress)
    finally:
        model.train(was_training)


def _check_classes(model: nn.Module, names: list[str], what: str) -> None:
    own = getattr(model, "class_names", None) or getattr(model, "category_names", None)
    if own is not None and list(own) != list(names):
        raise ValueError(
            f"the model was trained on {what} {own[:5]}... but the data has {names[:5]}...: "
            "they must be the same, in the same order"
        )


def _evaluate_classification(model, data, n, votes, batch_size, settings, progress) -> EvalReport:
    _check_classes(model, data.class_names, "classes")
    if getattr(model, "num_classes", data.num_classes) != data.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes, the data {data.num_classes}")
    plain, voted = classification_logits(model, data, n, votes, batch_size, settings, progress)
    c = data.num_classes
    conf = confusion_matrix(plain.argmax(-1), data.labels, c)
    metrics = {"oa": overall_accuracy(conf), "macc": mean_class_accuracy(conf)}
    acc = per_class_accuracy(conf)
    support = conf.sum(1)
    rows = [
        {"name": name, "support": int(support[i]), "acc": float(acc[i])}
        for i, name in enumerate(data.class_names)
    ]
    if voted is not None:
        conf = confusion_matrix(voted.argmax(-1), data.labels, c)
        metrics.update(oa_vote=overall_accuracy(conf), macc_vote=mean_class_accuracy(conf))
        for row, a in zip(rows, per_class_accuracy(conf).tolist(), strict=True):
            row["acc_vote"] = a
    return EvalReport(
        "classification", metrics, rows, list(data.class_names), conf, len(data), max(votes, 1)
    )


def _evaluate_partseg(model, data, n, votes, batch_size, settings, progress) -> EvalReport:
    _check_classes(model, data.category_names, "categories")
    mask = category_part_mask(data.category_parts, max(data.num_parts, model.num_parts))
    mask = mask[:, : model.num_parts]
    plain = PartSegMeter(data.category_parts, data.category_names)
    voted = PartSegMeter(data.category_parts, data.category_names)
    for logits, vlogits, labels, cats in partseg_logits(
        model, data, n, votes, batch_size, settings, progress
    ):
        plain.update(restrict_to_category(logits, cats, mask), labels, cats)
        if vlogits is not None:
            voted.update(restrict_to_category(vlogits, cats, mask), labels, cats)
    metrics = plain.compute()
    per_cat = plain.per_category()
    counts = torch.bincount(data.categories, minlength=data.num_categories)
    rows = [
        {"name": name, "shapes": int(counts[i]), "miou": per_cat.get(name, float("nan"))}
        for i, name in enumerate(data.category_names)
    ]
    if votes:
        metrics.update({f"{k}_vote": v for k, v in voted.compute().items()})
        per_vote = voted.per_category()
        for row in rows:
            row["miou_vote"] = per_vote.get(row["name"], float("nan"))
    return EvalReport(
        "partseg", metrics, rows, list(data.category_names), None, len(data), max(votes, 1)
    )


__all__ = ["EvalReport", "VoteSettings", "classification_logits", "evaluate", "partseg_logits"]
