"""3D object detection on ScanNet, 3DETR with the cd2p encoder: the ``detection`` task.

Data: the prepared scenes of ``cd2p prepare scannet-scenes`` (every vertex, axis-aligned, and
one axis-aligned box per object of the 18 detection classes).

Training items (3DETR's ScanNet dataset, every draw a pure function of ``(seed, epoch, scene
index)``, so fresh augmentations every epoch still resume exactly): a random cuboid crop that
keeps at least ``crop_min_points`` vertices and the boxes whose centre stays inside (3DETR's
``RandomCuboid``), ``data.num_points`` vertices drawn (with replacement only when fewer), a
mirror in x and in y with probability 0.5 each, a rotation about z within ``+-rotate`` (the
boxes become the axis-aligned hull of the rotated box, 3DETR's ``rotate_aligned_boxes``); the
cloud is then centred on its centroid. Boxes are padded per batch with a presence mask.

Training step: the Hungarian-matched set loss of every decoder layer
(:class:`~cd2p.models.detection.criterion.SetCriterion`), logged as one sum per term.

Evaluation (3DETR's protocol): one deterministic draw per scene, per-class 3D NMS, every kept
box scored once per class, VOC all-point AP at IoU 0.25 and 0.5
(:mod:`cd2p.engine.detection_eval`); under ``torchrun`` the scenes are split over the ranks
and their boxes gathered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cd2p._atomic import atomic_write_json
from cd2p.cards import PaperResult
from cd2p.config import DetectionConfig, Recipe
from cd2p.data.clouds import read_cloud
from cd2p.data.epochs import EpochDataset, EpochIndex
from cd2p.data.scannet_scenes import (
    DET_CLASS_NAMES,
    SEG_CLASS_COLORS,
    SceneSplit,
    load_scene,
    load_scene_split,
)
from cd2p.engine import distributed as D
from cd2p.engine.detection_eval import DetectionAPCalculator, nms_3d, parse_predictions
from cd2p.engine.evaluation import EvalReport, VoteSettings, check_class_names, model_device
from cd2p.engine.metrics_log import save_figure
from cd2p.models.backbone import Cd2pBackbone
from cd2p.models.detection.boxes import boxes_to_minmax
from cd2p.models.detection.criterion import LOSS_NAMES, SetCriterion
from cd2p.models.detection.matcher import HungarianMatcher, class_and_objectness_prob
from cd2p.tasks import MetricLabel, TaskSpec

THRESHOLDS = (0.25, 0.5)
# The colours of the 18 classes in pictures: ScanNet's colours of the same nyu40 classes.
DET_CLASS_COLORS = SEG_CLASS_COLORS[2:]

# -- augmentation (3DETR's ScanNet dataset) ---------------------------------------------------


def rotate_aligned_boxes(
    centers: np.ndarray, sizes: np.ndarray, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate axis-aligned boxes ``(K, 3)`` about z by ``angle``: the centres rotate, and each
    box becomes the axis-aligned hull of its rotated footprint (3DETR's
    ``rotate_aligned_boxes``; heights are kept)."""
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    new_centers = centers @ rotation.T
    half_x, half_y = np.abs(sizes[:, 0]) / 2, np.abs(sizes[:, 1]) / 2
    # The hull of a rotated rectangle: |cos| and |sin| mix the two half sides.
    new_sizes = np.stack(
        [2 * (abs(c) * half_x + abs(s) * half_y), 2 * (abs(s) * half_x + abs(c) * half_y),
         sizes[:, 2]], axis=1,
    )  # fmt: skip
    return new_centers, new_sizes


def random_cuboid(
    points: np.ndarray,
    box_centers: np.ndarray,
    rng: np.random.Generator,
    min_points: int,
    aspect: float = 0.8,
    min_crop: float = 0.5,
    max_crop: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """3DETR's ``RandomCuboid`` (from DepthContrast): up to 100 tries at a cuboid of
    ``min_crop..max_crop`` of the scene's extent per axis (at least one pair of axes with an
    aspect ratio >= ``aspect``) around a random point; it must keep ``min_points`` points and
    at least one box centre (when there are boxes). Returns the masks ``(N,)`` of kept points
    and ``(K,)`` of kept boxes (everything when no try succeeds)."""
    extent = points.max(axis=0) - points.min(axis=0)
    for _ in range(100):
        crop = min_crop + rng.random(3) * (max_crop - min_crop)
        pairs = ((crop[0], crop[1]), (crop[0], crop[2]), (crop[1], crop[2]))  # xy, xz, yz
        if not any(min(a, b) / max(a, b) >= aspect for a, b in pairs):
            continue
        center = points[rng.integers(len(points))]
        half = extent * crop / 2.0
        keep = np.all((points >= center - half) & (points <= center + half), axis=1)
        if keep.sum() < min_points:
            continue
        if len(box_centers):
            lo, hi = points[keep].min(axis=0), points[keep].max(axis=0)
            boxes = np.all((box_centers >= lo) & (box_centers <= hi), axis=1)
            if not boxes.any():
                continue
        else:
            boxes = np.zeros(0, dtype=bool)
        return keep, boxes
    return np.ones(len(points), dtype=bool), np.ones(len(box_centers), dtype=bool)


class SceneDetectionDataset(EpochDataset):
    """Draws of ``num_points`` vertices of the scenes of a :class:`SceneSplit` with their boxes.

    Item ``(epoch, i)``: ``points (P, 3)`` float32 (centred), ``gt_box_centers (K, 3)``,
    ``gt_box_sizes (K, 3)``, ``gt_box_sem_cls_label (K,)`` int64, ``point_cloud_dims_min/max
    (3,)``, ``offset (3,)`` (the centroid that was subtracted) and ``scene_index``. With
    ``augment`` (a :class:`DetectionConfig`) the training augmentations apply; without it a
    draw is only subsampled and centred. ``with_instances`` adds each point's ``instance``
    and each box's ``gt_box_instance`` (for checks; batches do not carry them).
    """

    def __init__(
        self, data: SceneSplit, num_points: int, seed: int = 0,
        augment: DetectionConfig | None = None, with_instances: bool = False,
    ) -> None:  # fmt: skip
        self.data = data
        self.num_points = num_points
        self.seed = seed
        self.augment = augment
        self.with_instances = with_instances

    def __len__(self) -> int:
        return len(self.data)

    def item(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        scene = load_scene(self.data, self.data.scene_ids[index])
        rng = self.rng(epoch, index)
        points = scene["coord"].numpy().astype(np.float64)
        centers = scene["box_center"].numpy().astype(np.float64)
        sizes = scene["box_size"].numpy().astype(np.float64)
        labels = scene["box_class"].numpy()
        instance, box_instance = scene["instance"].numpy(), scene["box_instance"].numpy()
        cfg = self.augment
        if cfg is not None and cfg.crop:
            keep, boxes = random_cuboid(points, centers, rng, cfg.crop_min_points)
            points, instance = points[keep], instance[keep]
            centers, sizes, labels = centers[boxes], sizes[boxes], labels[boxes]
            box_instance = box_instance[boxes]
        choice = rng.choice(len(points), self.num_points, replace=len(points) < self.num_points)
        points, instance = points[choice], instance[choice]
        if cfg is not None:
            flips = rng.random(2) > 0.5
            angle = rng.uniform(-cfg.rotate, cfg.rotate)
            if cfg.flip:
                for axis in (0, 1):
                    if flips[axis]:
                        points[:, axis] *= -1
                        centers[:, axis] *= -1
            c, s = math.cos(angle), math.sin(angle)
            points = points @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).T
            centers, sizes = rotate_aligned_boxes(centers, sizes, angle)
        offset = points.mean(axis=0)
        points, centers = points - offset, centers - offset
        extra = {}
        if self.with_instances:
            extra = {"instance": torch.from_numpy(instance),
                     "gt_box_instance": torch.from_numpy(box_instance)}  # fmt: skip
        return {
            **extra,
            "points": torch.from_numpy(points.astype(np.float32)),
            "gt_box_centers": torch.from_numpy(centers.astype(np.float32)).reshape(-1, 3),
            "gt_box_sizes": torch.from_numpy(sizes.astype(np.float32)).reshape(-1, 3),
            "gt_box_sem_cls_label": torch.from_numpy(labels.astype(np.int64)),
            "point_cloud_dims_min": torch.from_numpy(points.min(axis=0).astype(np.float32)),
            "point_cloud_dims_max": torch.from_numpy(points.max(axis=0).astype(np.float32)),
            "offset": torch.from_numpy(offset.astype(np.float32)),
            "scene_index": torch.tensor(index),
        }


def collate_detection(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the items; boxes are padded to the batch's largest count (at least one) with a
    presence mask ``gt_box_present (B, M)`` (padded labels are 0 and never used)."""
    batch = {k: torch.stack([it[k] for it in items]) for k in
             ("points", "point_cloud_dims_min", "point_cloud_dims_max", "offset",
              "scene_index")}  # fmt: skip
    most = max(1, max(len(it["gt_box_sem_cls_label"]) for it in items))
    size = len(items)
    centers, sizes = torch.zeros(size, most, 3), torch.zeros(size, most, 3)
    labels = torch.zeros(size, most, dtype=torch.int64)
    present = torch.zeros(size, most)
    for b, it in enumerate(items):
        k = len(it["gt_box_sem_cls_label"])
        centers[b, :k], sizes[b, :k] = it["gt_box_centers"], it["gt_box_sizes"]
        labels[b, :k], present[b, :k] = it["gt_box_sem_cls_label"], 1.0
    batch.update(gt_box_centers=centers, gt_box_sizes=sizes, gt_box_sem_cls_label=labels,
                 gt_box_present=present)  # fmt: skip
    return batch


def load_split(path: Path, split: str) -> SceneSplit:
    return load_scene_split(path, split)


def train_dataset(recipe: Recipe, data: SceneSplit) -> SceneDetectionDataset:
    return SceneDetectionDataset(data, recipe.data.num_points, recipe.run.seed, recipe.detection)


def data_source(path: Path) -> str:
    return load_scene_split(path, "all").source


# -- model and step ---------------------------------------------------------------------------


def build_model(recipe: Recipe, data: SceneSplit, backbone: Cd2pBackbone | None):
    """:class:`Cd2pForDetection` with the 18 ScanNet classes; from ``backbone`` if given."""
    from cd2p.models.detection.detector import Cd2pForDetection

    cfg = recipe.detection
    kwargs: dict[str, Any] = dict(
        num_classes=len(data.det_class_names),
        num_queries=cfg.num_queries,
        decoder_depth=cfg.decoder_depth,
        decoder_dim=cfg.decoder_dim,
        decoder_heads=cfg.decoder_heads,
        decoder_ffn_dim=cfg.decoder_ffn_dim,
        decoder_dropout=cfg.decoder_dropout,
        mlp_dropout=cfg.mlp_dropout,
        class_names=list(data.det_class_names),
        num_points=recipe.data.num_points,
    )
    return Cd2pForDetection.build(backbone, recipe.model.backbone_kwargs(), **kwargs)


def build_criterion(num_classes: int, cfg: DetectionConfig) -> SetCriterion:
    matcher = HungarianMatcher(cfg.cost_class, cfg.cost_giou, cfg.cost_center,
                               cfg.cost_objectness)  # fmt: skip
    return SetCriterion(num_classes, matcher, cfg.weight_cls, cfg.weight_giou,
                        cfg.weight_center, cfg.weight_size, cfg.no_object_weight)  # fmt: skip


class DetectionStep(nn.Module):
    """``forward(batch)`` -> the set loss summed over the decoder layers, and one sum per term
    (``loss_cls``, ``loss_giou``, ``loss_center``, ``loss_size``); matching and losses run in
    fp32 even under bf16 autocast."""

    def __init__(self, model: nn.Module, criterion: SetCriterion) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = self.model(
            batch["points"], batch["point_cloud_dims_min"], batch["point_cloud_dims_max"]
        )
        losses = self.criterion(outputs, batch)
        return {"loss": losses["loss"], **{name: losses[name] for name in LOSS_NAMES}}


def training_step(model: nn.Module, recipe: Recipe) -> DetectionStep:
    return DetectionStep(model, build_criterion(model.num_classes, recipe.detection))


# -- evaluation -------------------------------------------------------------------------------


def final_boxes(outputs: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Min/max boxes ``(B, Q, 6)``, class probabilities ``(B, Q, C)`` and objectness ``(B, Q)``
    of the last decoder layer."""
    last = outputs[-1]
    boxes = torch.cat([last["center_unnormalized"], last["size_unnormalized"]], dim=-1)
    cls_prob, objectness = class_and_objectness_prob(last["sem_cls_logits"].float())
    return boxes_to_minmax(boxes.float()), cls_prob, objectness


def _gt_minmax(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return boxes_to_minmax(torch.cat([batch["gt_box_centers"], batch["gt_box_sizes"]], -1))


def evaluate(
    model: nn.Module,
    data: SceneSplit,
    *,
    votes: int,  # noqa: ARG001  (3DETR's protocol: one draw per scene)
    batch_size: int,
    num_points: int | None,
    settings: VoteSettings,
    progress: Callable[[int], None] | None,
    examples: int = 4,
) -> EvalReport:
    """mAP and AR at IoU 0.25 and 0.5 over the scenes (3DETR's protocol, see the module
    docstring), per-class AP and recall, and a few scenes' boxes for the picture."""
    check_class_names(model, list(data.det_class_names), "classes")
    dataset = SceneDetectionDataset(data, num_points or 40_000, settings.seed)
    rank, world = D.rank_and_world()
    device = model_device(model)
    calc = DetectionAPCalculator(class_names=list(data.det_class_names))
    mine = list(range(rank, len(data), world))
    shown: list[dict[str, Any]] = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        batch = collate_detection([dataset[EpochIndex(0, i)] for i in chunk])
        points = batch["points"].to(device)
        outputs = model(points, batch["point_cloud_dims_min"].to(device),
                        batch["point_cloud_dims_max"].to(device))  # fmt: skip
        boxes, cls_prob, objectness = (t.cpu() for t in final_boxes(outputs))
        calc.step(boxes, cls_prob, objectness, _gt_minmax(batch), batch["gt_box_sem_cls_label"],
                  batch["gt_box_present"], point_clouds=batch["points"],
                  scene_ids=[data.scene_ids[i] for i in chunk])  # fmt: skip
        for b, i in enumerate(chunk):
            if rank == 0 and len(shown) < examples:
                shown.append(_example(data.scene_ids[i], batch, b, boxes[b], cls_prob[b],
                                      objectness[b]))  # fmt: skip
        if progress is not None:
            progress(len(chunk))
    calc.gather(device if device.type == "cuda" else None)
    results = calc.compute(THRESHOLDS)
    metrics = {}
    for thr in THRESHOLDS:
        tag = _tag(thr)
        metrics[f"map_{tag}"] = results[thr]["mAP"]
        metrics[f"ar_{tag}"] = results[thr]["AR"]
    counts = np.zeros(len(data.det_class_names), dtype=int)
    for gts in calc._gt.values():
        for cls, _ in gts:
            counts[cls] += 1
    rows = []
    for c, name in enumerate(data.det_class_names):
        row: dict[str, Any] = {"name": name, "boxes": int(counts[c])}
        for thr in THRESHOLDS:
            row[f"ap_{_tag(thr)}"] = results[thr]["per_class_ap"].get(name, float("nan"))
        for thr in THRESHOLDS:
            row[f"recall_{_tag(thr)}"] = results[thr]["per_class_recall"].get(name, float("nan"))
        rows.append(row)
    extra = {"scenes": len(data), "gt_boxes": int(counts.sum()),
             "protocol": "3DETR: per-class 3D NMS 0.25, objectness > 0.05, boxes with < 5 "
                         "points dropped, VOC all-point AP"}  # fmt: skip
    descriptions = {}
    for thr in THRESHOLDS:
        tag = _tag(thr)
        descriptions[f"map_{tag}"] = (
            f"mean over classes of VOC all-point AP at 3D IoU {thr}, one draw per scene"
        )
        descriptions[f"ar_{tag}"] = f"mean over classes of the recall at 3D IoU {thr}"
    return EvalReport("detection", metrics, rows, list(data.det_class_names), None, len(data),
                      1, extra, visuals={"scenes": shown},
                      descriptions=descriptions)  # fmt: skip


def _tag(threshold: float) -> str:
    return f"{threshold:g}".replace(".", "_")


def _example(scene_id: str, batch: dict[str, torch.Tensor], b: int, boxes: torch.Tensor,
             cls_prob: torch.Tensor, objectness: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    """One scene for the picture: a subsample of its points, its boxes and the detections
    (one per query kept by NMS, with its likeliest class) whose objectness is at least 0.3."""
    pts = batch["points"][b].numpy()
    keep = np.random.default_rng(0).choice(len(pts), min(len(pts), 6000), replace=False)
    present = batch["gt_box_present"][b] > 0
    gt = _gt_minmax(batch)[b][present].numpy()
    labels = batch["gt_box_sem_cls_label"][b][present].numpy()
    (found,) = parse_predictions(boxes[None], cls_prob[None], objectness[None],
                                 batch["points"][b : b + 1], per_class_proposal=False)  # fmt: skip
    dets = [(c, box, s) for c, box, s in found if s >= 0.3]
    return {"scene": scene_id, "points": pts[keep], "gt": list(zip(labels.tolist(), gt,
            strict=True)), "pred": dets}  # fmt: skip


def plot_scenes(scenes: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Scenes from above: points in grey, ground-truth boxes in black, detections in their
    class colour (labelled with class and score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    count = max(1, len(scenes))
    cols = min(2, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 6.0 * rows), squeeze=False)
    palette = np.array(DET_CLASS_COLORS, dtype=np.float64) / 255.0
    used: set[int] = set()
    for ax, scene in zip(axes.flat, scenes, strict=False):
        pts = scene["points"]
        ax.scatter(pts[:, 0], pts[:, 1], s=0.5, c="0.75", linewidths=0)
        for cls, box in scene["gt"]:
            ax.add_patch(Rectangle((box[0], box[1]), box[3] - box[0], box[4] - box[1],
                                   fill=False, edgecolor="black", linewidth=1.6))  # fmt: skip
            used.add(int(cls))
        for cls, box, score in scene["pred"]:
            ax.add_patch(Rectangle((box[0], box[1]), box[3] - box[0], box[4] - box[1],
                                   fill=False, edgecolor=palette[cls], linewidth=1.2,
                                   linestyle="--"))  # fmt: skip
            ax.text(box[0], box[4], f"{DET_CLASS_NAMES[cls]} {score:.2f}", fontsize=6,
                    color=palette[cls], va="bottom")  # fmt: skip
            used.add(int(cls))
        ax.set_title(f"{scene['scene']}: {len(scene['gt'])} boxes, {len(scene['pred'])} found")
        ax.set_aspect("equal")
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
    for ax in list(axes.flat)[len(scenes):]:
        ax.axis("off")
    handles = [Patch(facecolor="none", edgecolor="black", label="ground truth")]
    handles += [Patch(color=palette[c], label=DET_CLASS_NAMES[c]) for c in sorted(used)]
    fig.legend(handles=handles, loc="lower center", ncol=min(7, len(handles)), fontsize=8,
               frameon=False)  # fmt: skip
    fig.suptitle(title + "  (dashed: detections, objectness >= 0.3)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, path, dpi=110)


def plots(report: EvalReport, out: Path, title: str) -> list[Path]:
    """A few validation scenes from above with their boxes and the detections."""
    return [plot_scenes(report.visuals.get("scenes", []), out / "detections.png", title)]


# -- a user's own scan ------------------------------------------------------------------------


def predict(
    model: nn.Module,
    scan: Path,
    out: Path,
    *,
    votes: int = 3,
    batch_size: int = 4,
    min_score: float = 0.3,
    seed: int = 0,
) -> dict[str, Any]:
    """Detect the objects of a user's scan (a PLY such as ScanNet's ``_vh_clean_2.ply``, or
    any cloud :func:`~cd2p.data.clouds.read_cloud` reads; metres, z up) and write ``out`` (JSON:
    every box with its class, score, centre and size, in the scan's coordinates) and ``out``
    with ``.png`` (the scan from above with the boxes).

    ``votes`` random draws of the model's ``num_points`` points are made; the boxes of all
    draws are pooled and reduced by per-class 3D NMS (IoU 0.25), so that larger scans are
    covered. A box's score is its objectness (1 - p(no object)), its class the likeliest one;
    boxes scored below ``min_score`` are left out.
    """
    cloud = read_cloud(scan)
    points = cloud.points.astype(np.float64)
    n = getattr(model, "num_points", None) or 40_000
    rng = np.random.default_rng([seed, 0])
    device = model_device(model)
    found: list[tuple[int, np.ndarray, float]] = []
    was_training = model.training
    model.eval()
    try:
        draws = []
        for _ in range(max(1, votes)):
            choice = rng.choice(len(points), n, replace=len(points) < n)
            draw = points[choice]
            offset = draw.mean(axis=0)
            draws.append((draw - offset, offset))
        for start in range(0, len(draws), batch_size):
            chunk = draws[start : start + batch_size]
            pts = torch.from_numpy(np.stack([d for d, _ in chunk]).astype(np.float32))
            with torch.no_grad():
                outputs = model(pts.to(device), pts.amin(1).to(device), pts.amax(1).to(device))
            boxes, cls_prob, objectness = (t.cpu() for t in final_boxes(outputs))
            parsed = parse_predictions(boxes, cls_prob, objectness, pts,
                                       per_class_proposal=False)  # fmt: skip
            for (_, offset), scene in zip(chunk, parsed, strict=True):
                shift = np.concatenate([offset, offset])
                found += [(cls, box + shift, score) for cls, box, score in scene]
    finally:
        model.train(was_training)
    if found:
        boxes = np.stack([b for _, b, _ in found])
        scores = np.array([s for _, _, s in found])
        classes = np.array([c for c, _, _ in found])
        kept = nms_3d(boxes, scores, classes, 0.25)
        found = [found[i] for i in kept]
    found = sorted((f for f in found if f[2] >= min_score), key=lambda f: -f[2])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = [
        {"class": DET_CLASS_NAMES[c], "score": round(s, 4),
         "center": [round(float(v), 4) for v in (box[:3] + box[3:]) / 2],
         "size": [round(float(v), 4) for v in box[3:] - box[:3]]}
        for c, box, s in found
    ]  # fmt: skip
    atomic_write_json(out, {"scan": str(scan), "vertices": len(points), "draws": max(1, votes),
                            "min_score": min_score, "boxes": records})  # fmt: skip
    keep = np.random.default_rng(0).choice(len(points), min(len(points), 20_000), replace=False)
    picture = plot_scenes(
        [{"scene": scan.name, "points": points[keep], "gt": [], "pred": found}],
        out.with_suffix(".png"), f"{scan.name}: {len(found)} boxes",
    )
    counts: dict[str, int] = {}
    for record in records:
        counts[record["class"]] = counts.get(record["class"], 0) + 1
    return {"vertices": len(points), "classes": counts, "boxes": len(records),
            "files": [str(out), str(picture)]}  # fmt: skip


# -- the table entry --------------------------------------------------------------------------

PAPER_RESULTS = (
    PaperResult("ScanNetV2 mAP@0.25 (%)", ("map_0_25", "map25", "map_25", "ap_0_25"),
                61.1, 62.1, 63.4, "scannet"),
    PaperResult("ScanNetV2 mAP@0.5 (%)", ("map_0_5", "map50", "map_50", "ap_0_5"),
                40.2, 41.2, 42.2, "scannet"),
)  # fmt: skip

TASK = TaskSpec(
    name="detection",
    summary="ScanNet 3D object detection (3DETR decoder): mAP@0.25 and mAP@0.5 over 18 classes",
    model="cd2p.models.detection.detector:Cd2pForDetection",
    recipe_section="detection",
    default_recipe="finetune-scannet-det",
    prepare_hint="cd2p prepare scannet-scenes",
    item_name="scenes",
    load_split=load_split,
    data_source=data_source,
    train_dataset=train_dataset,
    collate_fn=collate_detection,
    build_model=build_model,
    training_step=training_step,
    evaluate=evaluate,
    best_metric="map_0_25",
    headline=(
        MetricLabel("map_0_25", "mAP@0.25"),
        MetricLabel("map_0_5", "mAP@0.5"),
        MetricLabel("ar_0_25", "AR@0.25"),
        MetricLabel("ar_0_5", "AR@0.5"),
    ),
    per_class_columns=(("boxes", "boxes"), ("AP@0.25 %", "ap_0_25"), ("AP@0.5 %", "ap_0_5"),
                       ("recall@0.25 %", "recall_0_25"), ("recall@0.5 %", "recall_0_5")),
    plots=plots,
    predict=predict,
    hub_task_type="3d-object-detection",
    hub_task_name="3D object detection",
    tags=("3d-object-detection", "scannet"),
    paper_results=PAPER_RESULTS,
)

__all__ = [
    "TASK",
    "DetectionStep",
    "SceneDetectionDataset",
    "collate_detection",
    "evaluate",
    "predict",
    "random_cuboid",
    "rotate_aligned_boxes",
]
