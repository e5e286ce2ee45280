"""Evaluation metrics: classification accuracy, part-segmentation IoU and scene-segmentation IoU.

Classification: overall accuracy (OA), mean class accuracy (mAcc, the mean over the classes
that occur in the ground truth of per-class recall) and the confusion matrix.

Part segmentation follows the protocol of PointNet / PointNet++ / Point-MAE on ShapeNetPart:
predictions are restricted to the parts of the shape's (known) category; for every shape the
IoU of each of its category's parts is computed, with IoU = 1 when a part is absent from both
the prediction and the ground truth; a shape's IoU is the mean over its category's parts;
*instance mIoU* averages shapes, *class mIoU* averages the per-category means.

Scene segmentation follows ScanNet's benchmark script (``evaluate_semantic_label.py``): one
point confusion matrix over the benchmark classes, vertices whose ground truth is not one of
them excluded; per class IoU = TP / (TP + FP + FN) where FP counts only vertices whose ground
truth is another benchmark class; a class with no ground truth and no prediction has no IoU
(NaN) and is left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cd2p.engine.metrics_log import save_figure


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts ``(num_classes, num_classes)`` int64; row = true class, column = prediction.

    Args:
        pred: ``(S,)`` predicted class indices.
        target: ``(S,)`` true class indices.
    """
    pred = pred.reshape(-1).long().cpu()
    target = target.reshape(-1).long().cpu()
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    for name, values in (("pred", pred), ("target", target)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} holds class ids outside [0, {num_classes})")
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def overall_accuracy(confmat: torch.Tensor) -> float:
    """Fraction of correct predictions (the trace over the total) of a confusion matrix."""
    total = int(confmat.sum())
    return float(confmat.diagonal().sum()) / total if total else 0.0


def per_class_accuracy(confmat: torch.Tensor) -> torch.Tensor:
    """Recall of every class ``(C,)`` float64; NaN for classes absent from the ground truth."""
    support = confmat.sum(1).double()
    acc = confmat.diagonal().double() / support.clamp_min(1)
    return torch.where(support > 0, acc, torch.full_like(acc, float("nan")))


def mean_class_accuracy(confmat: torch.Tensor) -> float:
    """Mean of the per-class accuracies over the classes present in the ground truth."""
    acc = per_class_accuracy(confmat)
    present = ~acc.isnan()
    return float(acc[present].mean()) if bool(present.any()) else 0.0


def classification_metrics(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """``{"oa", "macc"}`` of predictions ``(S,)`` against labels ``(S,)`` (fractions in [0, 1])."""
    confmat = confusion_matrix(pred, target, num_classes)
    return {"oa": overall_accuracy(confmat), "macc": mean_class_accuracy(confmat)}


# -- part segmentation ------------------------------------------------------------------------


def category_part_mask(category_parts: Sequence[Sequence[int]], num_parts: int) -> torch.Tensor:
    """``(num_categories, num_parts)`` bool: which part ids belong to which category."""
    mask = torch.zeros(len(category_parts), num_parts, dtype=torch.bool)
    for c, parts in enumerate(category_parts):
        mask[c, list(parts)] = True
    return mask


def restrict_to_category(
    logits: torch.Tensor, categories: torch.Tensor, part_mask: torch.Tensor
) -> torch.Tensor:
    """Per-point predictions among the parts of each shape's category.

    Args:
        logits: ``(B, N, P)`` part scores.
        categories: ``(B,)`` category index of every shape.
        part_mask: ``(num_categories, P)`` from :func:`category_part_mask`.

    Returns:
        ``(B, N)`` int64 part ids, each one of its shape category's parts.
    """
    allowed = part_mask.to(logits.device)[categories.long()]  # (B, P)
    masked = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    return masked.argmax(-1)


def shape_part_ious(pred: torch.Tensor, target: torch.Tensor, parts: Sequence[int]) -> torch.Tensor:
    """IoU of each of ``parts`` for one shape; ``pred``/``target`` are ``(N,)`` part ids.

    A part absent from both prediction and ground truth scores 1 (the standard protocol),
    so a correct "nothing here" is not punished. Returns ``(len(parts),)`` float64.
    """
    ious = []
    for part in parts:
        p = pred == part
        t = target == part
        union = int((p | t).sum())
        ious.append(1.0 if union == 0 else int((p & t).sum()) / union)
    return torch.tensor(ious, dtype=torch.float64)


@dataclass
class PartSegMeter:
    """Accumulates per-shape IoUs and gives instance / class mIoU over a whole test set.

    Args:
        category_parts: the part ids of every category (index = category id).
        category_names: for the per-category report.
    """

    category_parts: Sequence[Sequence[int]]
    category_names: Sequence[str]
    shape_ious: list[float] = field(default_factory=list)
    shape_categories: list[int] = field(default_factory=list)
    # part id -> that part's IoU in every shape of its category (absent from both: 1)
    part_ious: dict[int, list[float]] = field(default_factory=dict)
    correct_points: int = 0
    total_points: int = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor, categories: torch.Tensor) -> None:
        """Add a batch: ``pred``/``target`` ``(B, N)`` part ids, ``categories`` ``(B,)``."""
        pred, target, categories = pred.cpu(), target.cpu(), categories.cpu()
        self.correct_points += int((pred == target).sum())
        self.total_points += target.numel()
        for b in range(pred.shape[0]):
            c = int(categories[b])
            ious = shape_part_ious(pred[b], target[b], self.category_parts[c])
            self.shape_ious.append(float(ious.mean()))
            for part, iou in zip(self.category_parts[c], ious.tolist(), strict=True):
                self.part_ious.setdefault(int(part), []).append(iou)
            self.shape_categories.append(c)

    def per_category(self) -> dict[str, float]:
        """Mean shape IoU of every category seen (in category order)."""
        ious = torch.tensor(self.shape_ious, dtype=torch.float64)
        cats = torch.tensor(self.shape_categories, dtype=torch.long)
        out = {}
        for c, name in enumerate(self.category_names):
            chosen = ious[cats == c]
            if chosen.numel():
                out[name] = float(chosen.mean())
        return out

    def per_part(self) -> list[dict[str, float | int | str]]:
        """Every part seen: ``category``, ``part`` (its id), ``shapes`` and ``iou``, the mean of
        its IoU over the shapes of its category (a part absent from both counts 1)."""
        rows = []
        for c, name in enumerate(self.category_names):
            for part in self.category_parts[c]:
                values = self.part_ious.get(int(part))
                if values:
                    rows.append({"category": name, "part": int(part), "shapes": len(values),
                                 "iou": sum(values) / len(values)})  # fmt: skip
        return rows

    def compute(self) -> dict[str, float]:
        """``instance_miou``, ``class_miou`` and point ``accuracy`` (fractions in [0, 1])."""
        if not self.shape_ious:
            raise ValueError("no shapes were evaluated")
        per_cat = self.per_category()
        return {
            "instance_miou": sum(self.shape_ious) / len(self.shape_ious),
            "class_miou": sum(per_cat.values()) / len(per_cat),
            "accuracy": self.correct_points / max(self.total_points, 1),
        }


# -- scene segmentation -----------------------------------------------------------------------


def segmentation_ious(confmat: torch.Tensor) -> torch.Tensor:
    """Per-class IoU ``(C,)`` float64 of a point confusion matrix (row = ground truth,
    column = prediction), as ScanNet's ``get_iou``: ``TP / (TP + FP + FN)``, NaN when the class
    is neither in the ground truth nor predicted."""
    counts = confmat.double()
    tp = counts.diagonal()
    fn = counts.sum(1) - tp
    fp = counts.sum(0) - tp
    denom = tp + fp + fn
    return torch.where(denom > 0, tp / denom.clamp_min(1), torch.full_like(tp, float("nan")))


def segmentation_metrics(confmat: torch.Tensor) -> dict[str, float]:
    """``miou`` (mean over classes with a defined IoU), ``oa`` (point accuracy) and ``macc``
    (mean per-class recall over classes present in the ground truth) of a confusion matrix."""
    ious = segmentation_ious(confmat)
    defined = ~ious.isnan()
    return {
        "miou": float(ious[defined].mean()) if bool(defined.any()) else 0.0,
        "oa": overall_accuracy(confmat),
        "macc": mean_class_accuracy(confmat),
    }


def plot_confusion_matrix(
    confmat: torch.Tensor, class_names: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Write a PNG of a confusion matrix, rows normalised to per-class recall (in %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    counts = confmat.double()
    recall = (counts / counts.sum(1, keepdim=True).clamp_min(1)).numpy() * 100
    n = len(class_names)
    size = max(5.0, 0.28 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(recall, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7 if n > 20 else 9)
    ax.set_yticks(range(n), class_names, fontsize=7 if n > 20 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:  # numbers stay legible only for small matrices
        for i in range(n):
            for j in range(n):
                if counts[i, j] > 0:
                    ax.text(
                        j,
                        i,
                        f"{recall[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if recall[i, j] > 50 else "black",
                    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


__all__ = [
    "PartSegMeter",
    "category_part_mask",
    "classification_metrics",
    "confusion_matrix",
    "mean_class_accuracy",
    "overall_accuracy",
    "per_class_accuracy",
    "plot_confusion_matrix",
    "restrict_to_category",
    "segmentation_ious",
    "segmentation_metrics",
    "shape_part_ious",
]
