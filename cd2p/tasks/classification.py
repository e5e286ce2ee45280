"""Object classification (ModelNet40, ScanObjectNN): the ``classification`` task.

Data: the classification cache of ``cd2p prepare modelnet40|scanobjectnn`` (every cloud in FPS
order). Training views: Point-MAE's "FPS 1200, keep 1024 at random" (``finetune.resample_ratio``)
then scale-and-translate, drawn per step from the step's generator. Model:
:class:`~cd2p.models.classification.Cd2pForClassification`. Evaluation: overall and mean class
accuracy, with and without voting (Point-MAE's test-time views). Settings: the recipe's
``finetune`` section; with ``finetune.linear_probe`` the job is a linear probe instead
(:mod:`cd2p.engine.linear_probe`), with ``finetune.few_shot: K`` it trains on K shapes per
class, and with ``finetune.few_shot_way: N`` on an N-way K-shot episode of Point-BERT's
few-shot protocol (selected and evaluated on the episode's test shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cd2p.cards import PaperResult
from cd2p.config import Recipe
from cd2p.data.classification import (
    CACHE_FORMAT,
    ClassificationSplit,
    Episode,
    PointClassificationDataset,
    episode_split,
    few_shot_subset,
    load_classification_cache,
)
from cd2p.data.common import read_cache_meta
from cd2p.engine.augment import PrepareViews, scale_and_translate, step_generator
from cd2p.engine.evaluation import EvalReport, VoteSettings, check_class_names, model_device
from cd2p.engine.metrics import (
    confusion_matrix,
    mean_class_accuracy,
    overall_accuracy,
    per_class_accuracy,
    plot_confusion_matrix,
)
from cd2p.models.backbone import Cd2pBackbone
from cd2p.tasks import MetricLabel, TaskSpec

# -- data -------------------------------------------------------------------------------------


def data_source(path: Path) -> str:
    """The dataset a classification cache was prepared from (``modelnet40``, ...)."""
    return str(read_cache_meta(path, CACHE_FORMAT).get("source", Path(path).name))


def train_dataset(recipe: Recipe, data: ClassificationSplit) -> PointClassificationDataset:
    """Each cloud's first ``resample_ratio * num_points`` FPS points (the pool of its views)."""
    n = recipe.data.num_points
    pool = min(round(recipe.finetune.resample_ratio * n), data.points.shape[1])
    return PointClassificationDataset(data, max(pool, n))


def recipe_episode(recipe: Recipe) -> Episode | None:
    """The N-way K-shot episode a recipe trains on (``finetune.few_shot_way``), or ``None``."""
    cfg = recipe.finetune
    if cfg.few_shot_way is None or cfg.few_shot is None:
        return None
    return Episode(cfg.few_shot_way, cfg.few_shot, cfg.few_shot_fold, recipe.run.seed,
                   cfg.few_shot_queries)  # fmt: skip


def subset_train(recipe: Recipe, data: ClassificationSplit, where: str) -> ClassificationSplit:
    """Few-shot: the episode's training shapes (N-way K-shot), or ``finetune.few_shot`` shapes
    of every class; drawn with ``run.seed``."""
    episode = recipe_episode(recipe)
    if episode is not None:
        return episode_split(data, episode, "train", where)
    shots = recipe.finetune.few_shot
    return data if shots is None else few_shot_subset(data, shots, recipe.run.seed, where)


def subset_val(recipe: Recipe, data: ClassificationSplit, where: str) -> ClassificationSplit:
    """N-way K-shot: the episode's query shapes (``few_shot_queries`` per class)."""
    episode = recipe_episode(recipe)
    return data if episode is None else episode_split(data, episode, "test", where)


def check_recipe(recipe: Recipe) -> None:
    """An N-way episode needs its K (``finetune.few_shot``)."""
    cfg = recipe.finetune
    if cfg.few_shot_way is not None and cfg.few_shot is None:
        raise ValueError(
            "finetune.few_shot_way (N-way episodes) needs finetune.few_shot, the K shots"
        )


def run_facts(recipe: Recipe) -> dict[str, Any]:
    """Few-shot settings for ``run.json``, ``metrics.json`` and the card."""
    facts: dict[str, Any] = {"few_shot": recipe.finetune.few_shot}
    episode = recipe_episode(recipe)
    if episode is not None:
        facts.update(few_shot_way=episode.way, few_shot_fold=episode.fold,
                     few_shot_queries=episode.queries)  # fmt: skip
    return facts


# -- model and step ---------------------------------------------------------------------------


def build_model(recipe: Recipe, data: ClassificationSplit, backbone: Cd2pBackbone | None):
    """:class:`Cd2pForClassification` sized for ``data``; from ``backbone``'s weights if given."""
    from cd2p.models.classification import Cd2pForClassification

    cfg = recipe.finetune
    kwargs: dict[str, Any] = dict(
        num_classes=data.num_classes,
        head_channels=list(cfg.head_channels),
        head_dropout=cfg.head_dropout,
        class_names=data.class_names,
        num_points=recipe.data.num_points,
    )
    return Cd2pForClassification.build(backbone, recipe.model.backbone_kwargs(), **kwargs)


class ClassificationStep(nn.Module):
    """``forward(batch)`` -> cross-entropy of ``model(batch["points"])`` on ``batch["label"]``."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["points"])
        loss = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.label_smoothing)
        return {"loss": loss}


# -- evaluation -------------------------------------------------------------------------------


def vote_view(
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
    device = model_device(model)
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
                        vote_view(pts[i], start + i, v, num_points, settings)[1]
                        for i in range(len(pts))
                    ]
                )
                total = total + model(views).float().cpu()
            voted.append(total / votes)
        start += len(pts)
        if progress is not None:
            progress(len(pts))
    return torch.cat(plain), (torch.cat(voted) if votes else None)


def evaluate(
    model: nn.Module,
    data: ClassificationSplit,
    *,
    votes: int,
    batch_size: int,
    num_points: int | None,
    settings: VoteSettings,
    progress: Callable[[int], None] | None,
) -> EvalReport:
    """OA and mAcc on the first ``num_points`` FPS points of every cloud; with ``votes > 1``
    also ``oa_vote`` / ``macc_vote`` from logits averaged over that many augmented views."""
    check_class_names(model, data.class_names, "classes")
    if getattr(model, "num_classes", data.num_classes) != data.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes, the data {data.num_classes}")
    votes = votes if votes > 1 else 0
    n = num_points or 1024
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
    single = f"one view per shape (its first {n} FPS points)"
    voted = f"logits averaged over {votes} augmented views per shape (re-sampled, scaled, shifted)"
    descriptions = {
        "oa": f"overall accuracy, {single}",
        "macc": f"mean of the per-class accuracies, {single}",
        "oa_vote": f"overall accuracy, {voted}",
        "macc_vote": f"mean of the per-class accuracies, {voted}",
    }
    return EvalReport(
        "classification", metrics, rows, list(data.class_names), conf, len(data), max(votes, 1),
        descriptions=descriptions,
        confusion_of=f"the voted predictions ({votes} views)" if votes else f"the predictions, "
        f"{single}",
    )


def plots(report: EvalReport, out: Path, title: str) -> list[Path]:
    """The confusion matrix (of the voted predictions when voting) as a PNG."""
    assert report.confusion is not None
    path = out / "confusion_matrix.png"
    return [plot_confusion_matrix(report.confusion, report.class_names, path, title)]


def _linear_probe_runner(recipe: Recipe) -> Callable | None:
    if not recipe.finetune.linear_probe:
        return None
    from cd2p.engine.linear_probe import run_linear_probe

    return run_linear_probe


# -- the table entry --------------------------------------------------------------------------

PAPER_RESULTS = (
    PaperResult("ModelNet40 OA, voting (%)",
                ("oa_vote", "oa_voting", "overall_accuracy_vote", "overall_accuracy_voting",
                 "accuracy_vote", "vote_oa", "vote_overall_accuracy"),
                92.1, 92.5, 93.0, "modelnet40"),
    PaperResult("ModelNet40 OA, no voting (%)",
                ("oa", "overall_accuracy", "accuracy", "acc"), 92.38, 92.42, 92.71, "modelnet40"),
)  # fmt: skip

TASK = TaskSpec(
    name="classification",
    summary="object classification (ModelNet40, ScanObjectNN): OA and mAcc, with voting",
    model="cd2p.models.classification:Cd2pForClassification",
    recipe_section="finetune",
    default_recipe="finetune-modelnet40",
    prepare_hint="cd2p prepare modelnet40|scanobjectnn",
    item_name="shapes",
    load_split=load_classification_cache,
    data_source=data_source,
    train_dataset=train_dataset,
    subset_train=subset_train,
    subset_val=subset_val,
    check_recipe=check_recipe,
    build_model=build_model,
    training_step=lambda model, recipe: ClassificationStep(model, recipe.finetune.label_smoothing),
    prepare_batch=lambda recipe: PrepareViews(recipe, ("points",)),
    evaluate=evaluate,
    best_metric="oa",
    headline=(
        MetricLabel("oa", "OA"),
        MetricLabel("macc", "mAcc"),
        MetricLabel("oa_vote", "OA (voting)"),
        MetricLabel("macc_vote", "mAcc (voting)"),
    ),
    per_class_columns=(("shapes", "support"), ("acc %", "acc")),
    plots=plots,
    runner=_linear_probe_runner,
    run_facts=run_facts,
    hub_task_type="point-cloud-classification",
    hub_task_name="3D object classification",
    tags=("point-cloud-classification",),
    paper_results=PAPER_RESULTS,
)

__all__ = [
    "TASK",
    "ClassificationStep",
    "build_model",
    "classification_logits",
    "evaluate",
    "recipe_episode",
    "run_facts",
    "subset_train",
    "subset_val",
    "train_dataset",
    "vote_view",
]
