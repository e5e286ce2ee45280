"""Part segmentation (ShapeNetPart): the ``partseg`` task.

Data: the part-segmentation cache of ``cd2p prepare shapenetpart``. Training views: a fixed
per-shape draw of ``resample_ratio * num_points`` points, of which each step keeps
``num_points`` at random, then scale-and-translate (the step's generator). Model:
:class:`~cd2p.models.partseg.Cd2pForPartSegmentation`. Evaluation: instance and class mIoU
(the ShapeNetPart protocol of PointNet++ / Point-MAE), with optional voting. Settings: the
recipe's ``finetune`` section.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cd2p.cards import PaperResult
from cd2p.config import Recipe
from cd2p.data.common import read_cache_meta
from cd2p.data.shapenetpart import CACHE_FORMAT, PartSegDataset, PartSegSplit, load_partseg_cache
from cd2p.engine.augment import PrepareViews, scale_and_translate, step_generator
from cd2p.engine.evaluation import EvalReport, VoteSettings, check_class_names, model_device
from cd2p.engine.metrics import PartSegMeter, category_part_mask, restrict_to_category
from cd2p.models.backbone import Cd2pBackbone
from cd2p.tasks import MetricLabel, TaskSpec


def data_source(path: Path) -> str:
    """The dataset a part-segmentation cache was prepared from (``shapenetpart``, ...)."""
    return str(read_cache_meta(path, CACHE_FORMAT).get("source", Path(path).name))


def train_dataset(recipe: Recipe, data: PartSegSplit) -> PartSegDataset:
    """A fixed draw of ``resample_ratio * num_points`` points per shape (the views' pool)."""
    n = recipe.data.num_points
    return PartSegDataset(data, max(round(recipe.finetune.resample_ratio * n), n), recipe.run.seed)


def check_recipe(recipe: Recipe) -> None:
    if recipe.finetune.few_shot is not None or recipe.finetune.few_shot_way is not None:
        raise ValueError("--few-shot is for classification (finetune.few_shot: K shapes per class)")
    if recipe.finetune.linear_probe:
        raise ValueError(
            "a linear probe is a classification benchmark (recipe task: classification)"
        )


def build_model(recipe: Recipe, data: PartSegSplit, backbone: Cd2pBackbone | None):
    """:class:`Cd2pForPartSegmentation` sized for ``data``; from ``backbone``'s weights if given."""
    from cd2p.models.partseg import Cd2pForPartSegmentation

    cfg = recipe.finetune
    kwargs: dict[str, Any] = dict(
        num_parts=data.num_parts,
        num_categories=data.num_categories,
        feature_blocks=list(cfg.feature_blocks) if cfg.feature_blocks else None,
        label_channels=cfg.label_channels,
        propagation_channels=list(cfg.propagation_channels),
        head_channels=list(cfg.seg_head_channels),
        head_dropout=cfg.head_dropout,
        category_names=data.category_names,
        category_parts=data.category_parts,
        num_points=recipe.data.num_points,
    )
    return Cd2pForPartSegmentation.build(backbone, recipe.model.backbone_kwargs(), **kwargs)


class PartSegStep(nn.Module):
    """``forward(batch)`` -> per-point cross-entropy on ``batch["part_labels"]``."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["points"], batch["category"])
        loss = F.cross_entropy(
            logits.float().flatten(0, 1),
            batch["part_labels"].flatten(),
            label_smoothing=self.label_smoothing,
        )
        return {"loss": loss}


# -- evaluation -------------------------------------------------------------------------------


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
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]]:
    """Yields per batch ``(logits (B, N, P), voted logits or None, labels (B, N), categories
    (B,))`` on ``num_points`` points of every shape (the same points for the votes, which only
    scale and translate them)."""
    device = model_device(model)
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
    model: nn.Module,
    data: PartSegSplit,
    *,
    votes: int,
    batch_size: int,
    num_points: int | None,
    settings: VoteSettings,
    progress: Callable[[int], None] | None,
) -> EvalReport:
    """Instance / class mIoU and point accuracy on a fixed draw of ``num_points`` per shape;
    with ``votes > 1`` also the ``*_vote`` metrics over scaled and translated views."""
    check_class_names(model, data.category_names, "categories")
    votes = votes if votes > 1 else 0
    n = num_points or 2048
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
    per_part = plain.per_part()
    if votes:
        metrics.update({f"{k}_vote": v for k, v in voted.compute().items()})
        per_vote = voted.per_category()
        for row in rows:
            row["miou_vote"] = per_vote.get(row["name"], float("nan"))
        for row, vrow in zip(per_part, voted.per_part(), strict=True):
            row["iou_vote"] = vrow["iou"]
    single = f"one draw of {n} points per shape"
    voted_text = f"part scores averaged over {votes} scaled and shifted views of that draw"
    descriptions = {
        "instance_miou": f"mean over shapes of the mean IoU of their category's parts, {single}",
        "class_miou": f"mean over categories of their shapes' mean IoU, {single}",
        "accuracy": f"point accuracy, {single}",
        "instance_miou_vote": f"instance mIoU, {voted_text}",
        "class_miou_vote": f"class mIoU, {voted_text}",
        "accuracy_vote": f"point accuracy, {voted_text}",
    }
    return EvalReport(
        "partseg", metrics, rows, list(data.category_names), None, len(data), max(votes, 1),
        extra={"per_part": per_part}, descriptions=descriptions,
    )


PAPER_RESULTS = (
    PaperResult("ShapeNetPart instance mIoU (%)",
                ("instance_miou", "ins_miou", "miou_instance", "instance_mean_iou"),
                85.1, 85.9, 85.9, "shapenetpart"),
)  # fmt: skip

TASK = TaskSpec(
    name="partseg",
    summary="part segmentation (ShapeNetPart): instance and class mIoU",
    model="cd2p.models.partseg:Cd2pForPartSegmentation",
    recipe_section="finetune",
    default_recipe="finetune-shapenetpart",
    prepare_hint="cd2p prepare shapenetpart",
    item_name="shapes",
    load_split=load_partseg_cache,
    data_source=data_source,
    train_dataset=train_dataset,
    check_recipe=check_recipe,
    build_model=build_model,
    training_step=lambda model, recipe: PartSegStep(model, recipe.finetune.label_smoothing),
    prepare_batch=lambda recipe: PrepareViews(recipe, ("points", "part_labels")),
    evaluate=evaluate,
    best_metric="instance_miou",
    headline=(
        MetricLabel("instance_miou", "instance mIoU"),
        MetricLabel("class_miou", "class mIoU"),
        MetricLabel("instance_miou_vote", "instance mIoU (voting)"),
        MetricLabel("class_miou_vote", "class mIoU (voting)"),
    ),
    per_class_columns=(("shapes", "shapes"), ("mIoU %", "miou")),
    run_facts=lambda recipe: {"few_shot": recipe.finetune.few_shot},
    hub_task_type="point-cloud-part-segmentation",
    hub_task_name="3D part segmentation",
    tags=("part-segmentation",),
    paper_results=PAPER_RESULTS,
)

__all__ = ["TASK", "PartSegStep", "build_model", "evaluate", "partseg_logits", "train_dataset"]
