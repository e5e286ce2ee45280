"""ScanNet scene semantic segmentation: the ``segmentation`` task.

Data: the prepared scenes of ``cd2p prepare scannet-scenes`` (every vertex of the
``_vh_clean_2`` meshes, axis-aligned, with ScanNet's 20 benchmark labels; -1 = ignore).

Training: every epoch draws, for every scene, a fresh random ``data.num_points`` (8192)
vertices (without replacement; every vertex plus repeats for smaller scenes), rotates them
about z, scales and mirrors them, and centres them; the draw is a pure function of
``(seed, epoch, scene index)`` (:class:`~cd2p.data.epochs.EpochDataset`), so an interrupted run
resumes to identical weights. Loss: cross-entropy over the labelled points.

Evaluation covers *every vertex* of every scene: a round splits a random permutation of the
scene's vertices into disjoint draws of ``num_points`` (the last one filled up with other
vertices, whose scores are not counted), so that every vertex is scored exactly once per
round; ``votes`` rounds are summed (softmax probabilities, as Pointcept's whole-scene test).
The mIoU is ScanNet's benchmark one (:func:`~cd2p.engine.metrics.segmentation_ious`). Under
``torchrun`` the scenes are split across ranks and the confusion matrices summed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cd2p.cards import PaperResult
from cd2p.config import Recipe, SegmentationConfig
from cd2p.data.clouds import read_cloud
from cd2p.data.epochs import EpochDataset
from cd2p.data.scannet_files import write_mesh_ply
from cd2p.data.scannet_pairs import sample_exact
from cd2p.data.scannet_scenes import (
    IGNORE_LABEL,
    SEG_CLASS_COLORS,
    SEG_CLASS_IDS,
    SEG_CLASS_NAMES,
    SceneSplit,
    load_scene,
    load_scene_split,
    nyu40_to_seg,
)
from cd2p.engine import distributed as D
from cd2p.engine.evaluation import EvalReport, VoteSettings, check_class_names, model_device
from cd2p.engine.metrics import (
    confusion_matrix,
    per_class_accuracy,
    plot_confusion_matrix,
    segmentation_ious,
    segmentation_metrics,
)
from cd2p.engine.metrics_log import save_figure
from cd2p.models.backbone import Cd2pBackbone
from cd2p.tasks import MetricLabel, TaskSpec

# -- data -------------------------------------------------------------------------------------


def colors_to_unit(colors: np.ndarray | torch.Tensor) -> torch.Tensor:
    """RGB ``(..., 3)`` uint8 -> float32 in [-1, 1] (what the model's colour input expects)."""
    return torch.as_tensor(np.asarray(colors), dtype=torch.float32) / 127.5 - 1.0


def augment_draw(points: np.ndarray, rng: np.random.Generator, cfg: SegmentationConfig
                 ) -> np.ndarray:
    """Rotation about z, isotropic scaling and x / y mirroring of centred ``points (P, 3)``,
    drawn from ``rng`` (in that order, always the same number of draws)."""
    angle = rng.uniform(-cfg.rotate, cfg.rotate)
    scale = rng.uniform(cfg.scale_low, cfg.scale_high)
    flips = rng.random(2) < 0.5
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    out = points @ rotation.T * scale
    if cfg.flip:
        out[:, 0] *= -1.0 if flips[0] else 1.0
        out[:, 1] *= -1.0 if flips[1] else 1.0
    return out


class SceneSegmentationDataset(EpochDataset):
    """Random draws of ``num_points`` vertices of the scenes of a :class:`SceneSplit`.

    Item ``(epoch, i)``: ``{"points": (P, 3) float32 centred, "labels": (P,) int64 (-1 ignore)``
    and, with ``use_color``, ``"colors": (P, 3) float32 in [-1, 1]}``; a pure function of
    ``(seed, epoch, i)``. ``augment`` (a :class:`SegmentationConfig`) turns on the training
    augmentations; without it a draw is only centred.
    """

    def __init__(
        self,
        data: SceneSplit,
        num_points: int,
        seed: int = 0,
        augment: SegmentationConfig | None = None,
        use_color: bool = False,
    ) -> None:
        self.data = data
        self.num_points = num_points
        self.seed = seed
        self.augment = augment
        self.use_color = use_color

    def __len__(self) -> int:
        return len(self.data)

    def item(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        scene = load_scene(self.data, self.data.scene_ids[index])
        rng = self.rng(epoch, index)
        idx = sample_exact(len(scene["coord"]), self.num_points, rng)
        points = scene["coord"].numpy()[idx].astype(np.float64)
        points -= points.mean(axis=0)
        if self.augment is not None:
            points = augment_draw(points, rng, self.augment)
        item = {
            "points": torch.from_numpy(points.astype(np.float32)),
            "labels": scene["semantic"][torch.from_numpy(idx)],
        }
        if self.use_color:
            item["colors"] = colors_to_unit(scene["color"].numpy()[idx])
        return item


def load_split(path: Path, split: str) -> SceneSplit:
    return load_scene_split(path, split)


def train_dataset(recipe: Recipe, data: SceneSplit) -> SceneSegmentationDataset:
    cfg = recipe.segmentation
    return SceneSegmentationDataset(
        data, recipe.data.num_points, recipe.run.seed, augment=cfg, use_color=cfg.use_color
    )


def data_source(path: Path) -> str:
    """``scannet`` or ``synthetic-scannet`` (what ``prepare scannet-scenes`` recorded)."""
    return load_scene_split(path, "all").source


# -- model and step ---------------------------------------------------------------------------


def build_model(recipe: Recipe, data: SceneSplit, backbone: Cd2pBackbone | None):
    """:class:`Cd2pForSemanticSegmentation` with ScanNet's 20 classes; from ``backbone``'s
    weights if given."""
    from cd2p.models.segmentation import Cd2pForSemanticSegmentation

    cfg = recipe.segmentation
    kwargs: dict[str, Any] = dict(
        num_classes=len(data.class_names),
        head_channels=list(cfg.head_channels),
        head_dropout=cfg.head_dropout,
        use_color=cfg.use_color,
        class_names=list(data.class_names),
        num_points=recipe.data.num_points,
    )
    return Cd2pForSemanticSegmentation.build(backbone, recipe.model.backbone_kwargs(), **kwargs)


class SegmentationStep(nn.Module):
    """``forward(batch)`` -> mean cross-entropy over the labelled points of the batch (points
    labelled -1 are ignored; a batch without any labelled point gives a zero loss)."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["points"], batch.get("colors"))
        labels = batch["labels"].flatten()
        valid = labels != IGNORE_LABEL
        per_point = F.cross_entropy(
            logits.float().flatten(0, 1),
            labels.clamp_min(0),
            reduction="none",
            label_smoothing=self.label_smoothing,
        )
        # A mean over the labelled points without a host sync (no boolean indexing).
        loss = (per_point * valid).sum() / valid.sum().clamp_min(1)
        return {"loss": loss}


# -- whole-scene evaluation -------------------------------------------------------------------


def coverage_draws(
    num_vertices: int, num_points: int, rounds: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, int]]:
    """The draws that score every vertex of a scene exactly ``rounds`` times.

    Yields ``(indices (num_points,), own)``: the first ``own`` indices are the vertices this
    draw scores; the rest fill the draw up to ``num_points`` with other vertices of the scene
    (context only, not counted). Each round is a fresh random permutation of the vertices cut
    into ``ceil(num_vertices / num_points)`` disjoint draws.
    """
    for _ in range(rounds):
        order = rng.permutation(num_vertices)
        for start in range(0, num_vertices, num_points):
            own = order[start : start + num_points]
            if len(own) < num_points:
                others = np.setdiff1d(np.arange(num_vertices), own, assume_unique=True)
                fill = num_points - len(own)
                if len(others) >= fill:
                    extra = rng.choice(others, size=fill, replace=False)
                else:  # the scene is smaller than one draw: repeat its vertices
                    extra = rng.choice(num_vertices, size=fill, replace=True)
                yield np.concatenate([own, extra]), len(own)
            else:
                yield own, len(own)


@torch.no_grad()
def scene_scores(
    model: nn.Module,
    coord: torch.Tensor,
    colors: torch.Tensor | None,
    num_points: int,
    rounds: int,
    rng: np.random.Generator,
    batch_size: int = 8,
) -> torch.Tensor:
    """Summed class probabilities ``(N, C)`` of every vertex of one scene over ``rounds``
    rounds of :func:`coverage_draws`; each draw is centred on its own centroid."""
    device = model_device(model)
    n = len(coord)
    total = torch.zeros(n, model.num_classes, dtype=torch.float64)
    pending: list[tuple[np.ndarray, int]] = []

    def flush() -> None:
        idx = torch.from_numpy(np.stack([p[0] for p in pending]))  # (B, P)
        pts = coord[idx].to(device, torch.float32)
        pts = pts - pts.mean(dim=1, keepdim=True)
        cols = colors[idx].to(device) if colors is not None else None
        probs = model(pts, cols).float().softmax(-1).double().cpu()  # (B, P, C)
        for row, (indices, own) in enumerate(pending):
            total.index_add_(0, torch.from_numpy(indices[:own]), probs[row, :own])
        pending.clear()

    for draw in coverage_draws(n, num_points, rounds, rng):
        pending.append(draw)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return total.float()


def evaluate(
    model: nn.Module,
    data: SceneSplit,
    *,
    votes: int,
    batch_size: int,
    num_points: int | None,
    settings: VoteSettings,
    progress: Callable[[int], None] | None,
) -> EvalReport:
    """mIoU (ScanNet's), point accuracy and mean class accuracy over every labelled vertex of
    the scenes, each vertex scored ``max(votes, 1)`` times (see the module docstring)."""
    check_class_names(model, list(data.class_names), "classes")
    rounds = max(1, votes)
    n = num_points or 8192
    classes = len(data.class_names)
    rank, world = D.rank_and_world()
    conf = torch.zeros(classes, classes, dtype=torch.int64)
    vertices = 0
    for index in range(rank, len(data), world):
        scene = load_scene(data, data.scene_ids[index])
        colors = colors_to_unit(scene["color"]) if getattr(model, "use_color", False) else None
        rng = np.random.default_rng([settings.seed, index])
        scores = scene_scores(model, scene["coord"], colors, n, rounds, rng, batch_size)
        labels = scene["semantic"]
        labelled = labels != IGNORE_LABEL
        conf += confusion_matrix(scores.argmax(-1)[labelled], labels[labelled], classes)
        vertices += len(labels)
        if progress is not None:
            progress(1)
    if world > 1:
        device = model_device(model) if model_device(model).type == "cuda" else None
        summed = D.all_reduce_sum(torch.cat([conf.flatten(), torch.tensor([vertices])]).to(
            device or "cpu"))
        conf, vertices = summed[:-1].cpu().view(classes, classes), int(summed[-1])
    metrics = segmentation_metrics(conf)
    ious, acc = segmentation_ious(conf), per_class_accuracy(conf)
    rows = [
        {"name": name, "points": int(conf[i].sum()), "iou": float(ious[i]), "acc": float(acc[i])}
        for i, name in enumerate(data.class_names)
    ]
    extra = {"scenes": len(data), "vertices": vertices, "labelled_points": int(conf.sum())}
    scored = f"every vertex of every scene scored {rounds} time(s), class scores summed"
    descriptions = {
        "miou": f"mean IoU over the classes with a defined IoU (ScanNet's protocol), {scored}",
        "oa": f"point accuracy over the labelled vertices, {scored}",
        "macc": f"mean of the per-class point accuracies, {scored}",
    }
    return EvalReport(
        "segmentation", metrics, rows, list(data.class_names), conf, len(data), rounds, extra,
        descriptions=descriptions, confusion_of=f"labelled vertices, {scored}",
    )


def plots(report: EvalReport, out: Path, title: str) -> list[Path]:
    """The point confusion matrix (rows: ground truth) as a PNG."""
    assert report.confusion is not None
    path = out / "confusion_matrix.png"
    return [plot_confusion_matrix(report.confusion, report.class_names, path, title)]


# -- a user's own scan ------------------------------------------------------------------------


def plot_top_down(
    coord: np.ndarray,
    panels: list[tuple[str, np.ndarray]],
    path: Path,
    title: str,
    max_points: int = 120_000,
) -> Path:
    """A top-down view (x right, y up) of a scan per panel ``(title, labels (N,) in 0..19 or
    -1)``, coloured with ScanNet's class colours, with a legend of the classes shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    keep = np.arange(len(coord))
    if len(keep) > max_points:  # an even subsample keeps the picture and the file small
        keep = np.random.default_rng(0).choice(len(coord), max_points, replace=False)
    keep = keep[np.argsort(coord[keep, 2])]  # higher points drawn last, on top
    palette = np.array([*SEG_CLASS_COLORS, (200, 200, 200)], dtype=np.float64) / 255.0
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6.5), squeeze=False)
    shown: set[int] = set()
    for ax, (name, labels) in zip(axes[0], panels, strict=True):
        values = np.where(labels[keep] < 0, len(SEG_CLASS_COLORS), labels[keep])
        size = float(np.clip(30_000 / len(keep), 0.3, 6.0))  # sparse scans get larger dots
        ax.scatter(coord[keep, 0], coord[keep, 1], c=palette[values], s=size, linewidths=0)
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
        shown |= set(np.unique(labels[labels >= 0]).tolist())
    handles = [Patch(color=palette[c], label=SEG_CLASS_NAMES[c]) for c in sorted(shown)]
    fig.legend(handles=handles, loc="lower center", ncol=min(7, max(1, len(handles))),
               fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save_figure(fig, path, dpi=110)


def predict(
    model: nn.Module,
    scan: Path,
    out: Path,
    *,
    votes: int = 3,
    batch_size: int = 8,
    labels: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Segment a user's scan (a PLY such as ScanNet's ``_vh_clean_2.ply``, or any cloud
    :func:`~cd2p.data.clouds.read_cloud` reads) and write ``out`` (a PLY: the vertices coloured
    by predicted class, a ``label`` property with the predicted nyu40 id, the faces of a mesh)
    and ``out`` with ``.png``: a top-down picture, beside the ground truth when the scan (or
    ``labels``, e.g. ``_vh_clean_2.labels.ply``) carries nyu40 ``label`` values.

    Returns a summary: vertices, points per predicted class, the written files and, with
    ground truth, the scan's mIoU.
    """
    cloud = read_cloud(scan)
    colors = None
    if getattr(model, "use_color", False):
        if cloud.colors is None:
            raise ValueError(f"{scan}: the model reads colours but the scan has none")
        colors = colors_to_unit(cloud.colors)
    coord = torch.from_numpy(np.ascontiguousarray(cloud.points, dtype=np.float32))
    n = getattr(model, "num_points", None) or 8192
    rng = np.random.default_rng([seed, 0])
    was_training = model.training
    model.eval()
    try:
        scores = scene_scores(model, coord, colors, n, max(1, votes), rng, batch_size)
    finally:
        model.train(was_training)
    pred = scores.argmax(-1).numpy()
    truth = None
    if labels is not None:
        truth = read_cloud(labels).labels
        if truth is None:
            raise ValueError(f"{labels}: no per-vertex 'label' property")
        if len(truth) != len(pred):
            raise ValueError(f"{labels}: {len(truth)} labels for {len(pred)} vertices of {scan}")
    elif cloud.labels is not None:
        truth = cloud.labels
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    palette = np.array(SEG_CLASS_COLORS, dtype=np.uint8)
    faces = cloud.faces if cloud.faces is not None else np.zeros((0, 3), np.int64)
    nyu40 = np.array(SEG_CLASS_IDS, dtype=np.int64)[pred]
    write_mesh_ply(out, cloud.points, palette[pred], faces, labels=nyu40)
    panels = [("prediction", pred)]
    summary: dict[str, Any] = {"vertices": len(pred)}
    if truth is not None:
        gt = nyu40_to_seg(np.asarray(truth))
        panels.append(("ground truth", gt))
        labelled = gt >= 0
        conf = confusion_matrix(torch.from_numpy(pred[labelled]),
                                torch.from_numpy(gt[labelled]), len(SEG_CLASS_NAMES))
        summary["miou"] = segmentation_metrics(conf)["miou"]
    picture = plot_top_down(cloud.points, panels, out.with_suffix(".png"),
                            f"{scan.name}: {len(pred)} vertices, {max(1, votes)} votes")
    counts = np.bincount(pred, minlength=len(SEG_CLASS_NAMES))
    summary["classes"] = {SEG_CLASS_NAMES[c]: int(counts[c]) for c in np.argsort(-counts)
                          if counts[c] > 0}
    summary["files"] = [str(out), str(picture)]
    return summary


# -- the table entry --------------------------------------------------------------------------

PAPER_RESULTS = (
    PaperResult("ScanNetV2 mIoU (%)", ("miou", "mean_iou"), 37.0, 45.4, 46.4, "scannet"),
)

TASK = TaskSpec(
    name="segmentation",
    summary="ScanNet scene semantic segmentation: mIoU over 20 classes on every vertex",
    model="cd2p.models.segmentation:Cd2pForSemanticSegmentation",
    recipe_section="segmentation",
    default_recipe="finetune-scannet-seg",
    prepare_hint="cd2p prepare scannet-scenes",
    item_name="scenes",
    load_split=load_split,
    data_source=data_source,
    train_dataset=train_dataset,
    build_model=build_model,
    training_step=lambda model, recipe: SegmentationStep(
        model, recipe.segmentation.label_smoothing
    ),
    evaluate=evaluate,
    best_metric="miou",
    headline=(MetricLabel("miou", "mIoU"), MetricLabel("oa", "OA"), MetricLabel("macc", "mAcc")),
    per_class_columns=(("points", "points"), ("IoU %", "iou"), ("acc %", "acc")),
    plots=plots,
    predict=predict,
    hub_task_type="point-cloud-segmentation",
    hub_task_name="3D semantic segmentation",
    tags=("semantic-segmentation", "scannet"),
    paper_results=PAPER_RESULTS,
)

__all__ = [
    "TASK",
    "SceneSegmentationDataset",
    "SegmentationStep",
    "augment_draw",
    "build_model",
    "coverage_draws",
    "evaluate",
    "predict",
    "scene_scores",
]
