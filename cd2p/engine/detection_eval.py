"""3D detection evaluation as 3DETR/VoteNet compute it: NMS, post-processing, VOC-style AP.

Mirrors, for axis-aligned boxes, 3DETR's ``utils/nms.py`` (``nms_3d_faster_samecls``),
``utils/ap_calculator.py`` (``parse_predictions``, ``APCalculator.compute_metrics``) and
``utils/eval_det.py`` (``voc_ap``, ``eval_det_cls``, ``eval_det_multiprocessing``), so that
numbers are comparable with the published ScanNet mAP@0.25 / mAP@0.5.

Boxes here are numpy min/max boxes ``(xmin, ymin, zmin, xmax, ymax, zmax)`` (see
``cd2p.models.detection.boxes.boxes_to_minmax``); IoU is the exact axis-aligned 3D IoU in
float64, which equals 3DETR's ``box3d_iou`` (polygon clipping on the corners) for axis-aligned
boxes up to floating-point rounding (only an IoU within an ulp of the threshold could differ).

Known behaviours of 3DETR's evaluation reproduced here (see each function):

* A detection is a true positive iff its best-IoU ground truth box (first one on ties) of the
  same class and scene has ``IoU > threshold`` (strict) and is not matched yet; a detection
  whose best box is already matched is a false positive (no fall-back to the second best).
* ``eval_det`` (3DETR's ``eval_det_multiprocessing``, the one ``APCalculator`` calls) adds every
  class that has a prediction to the ground-truth dict, so a class with predictions but no
  ground truth is evaluated: 3DETR's ``eval_det_cls`` sets recall to 0 when there are no
  positives (``if npos == 0``), so its AP is **0** (VoteNet's version, without that guard,
  gives NaN); either way it counts as 0 in the mAP. A class with ground truth but no prediction
  gets AP 0 and recall 0. A class with neither is absent from the mean.
* 3DETR's ``eval_det_multiprocessing`` reads its per-class results as ``ret_values[i]`` with
  ``i`` counting *all* classes, while ``ret_values`` only holds classes with predictions; this
  never misaligns because classes with predictions are inserted first into the (insertion-
  ordered) ground-truth dict. Results here are keyed by class, so there is nothing to misalign.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

PredBox = tuple[int, np.ndarray, float]
"""One detection: (class id, min/max box ``(6,)``, score)."""
GtBox = tuple[int, np.ndarray]
"""One ground-truth box: (class id, min/max box ``(6,)``)."""


def _numpy(x: Any, dtype: Any = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def aabb_iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one min/max box ``(6,)`` with ``(K, 6)`` boxes -> ``(K,)`` float64.

    0 where the union is empty (3DETR's ``box3d_iou`` would give 0/0 = NaN there, which its
    ``iou > ovmax`` test skips -- the same outcome, a false positive).
    """
    box = np.asarray(box, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    lo = np.maximum(box[:3], boxes[:, :3])
    hi = np.minimum(box[3:], boxes[:, 3:])
    inter = np.prod(np.clip(hi - lo, 0.0, None), axis=1)
    vol = np.prod(np.clip(box[3:] - box[:3], 0.0, None))
    vols = np.prod(np.clip(boxes[:, 3:] - boxes[:, :3], 0.0, None), axis=1)
    union = vol + vols - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return iou


# ---------------------------------------------------------------------------------------------
# NMS and post-processing
# ---------------------------------------------------------------------------------------------


def nms_3d(
    boxes_minmax: Any,
    scores: Any,
    classes: Any | None = None,
    iou_threshold: float = 0.25,
) -> np.ndarray:
    """Greedy 3D NMS; indices of the kept boxes, highest score first.

    As 3DETR's ``nms_3d_faster_samecls`` (``classes`` given: a box only suppresses boxes of its
    own class) or ``nms_3d_faster`` (``classes=None``), ``old_type=False``:

    * order from ``np.argsort(scores)`` (numpy's default sort, so ties break as theirs), the
      last (highest) remaining box is kept each round;
    * overlap ``o = inter / (vol_i + vol_j - inter)`` with volumes ``(x2-x1)*(y2-y1)*(z2-z1)``
      (no ``+1``, no clamp) and ``inter`` from sides ``max(0, min(hi) - max(lo))``;
    * a box is suppressed when ``o > iou_threshold`` (strict: IoU exactly at the threshold
      survives); for other classes ``o`` is multiplied by 0. A 0/0 overlap (two zero-volume
      boxes) is NaN and never suppresses, as in theirs.

    Args:
        boxes_minmax: ``(K, 6)``; scores: ``(K,)``; classes: ``(K,)`` int or None.
    Returns:
        ``(k,)`` int64 indices into the inputs.
    """
    boxes = _numpy(boxes_minmax, np.float64).reshape(-1, 6)
    # float64 like 3DETR's (K, 8) box+score array, so that np.argsort breaks ties as theirs
    scores = _numpy(scores, np.float64).reshape(-1)
    if boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {scores.shape[0]} scores")
    cls = None if classes is None else _numpy(classes).reshape(-1)
    lo, hi = boxes[:, :3], boxes[:, 3:]
    vols = np.prod(hi - lo, axis=1)
    remaining = np.argsort(scores)
    keep: list[int] = []
    with np.errstate(divide="ignore", invalid="ignore"):
        while remaining.size:
            i = remaining[-1]
            keep.append(int(i))
            rest = remaining[:-1]
            sides = np.maximum(0.0, np.minimum(hi[i], hi[rest]) - np.maximum(lo[i], lo[rest]))
            inter = np.prod(sides, axis=1)
            overlap = inter / (vols[i] + vols[rest] - inter)
            if cls is not None:
                overlap = overlap * (cls[i] == cls[rest])
            remaining = rest[~(overlap > iou_threshold)]
    return np.asarray(keep, dtype=np.int64)


def points_in_boxes_count(points: Any, boxes_minmax: Any) -> np.ndarray:
    """How many of ``points (N, 3+)`` lie in each of ``boxes_minmax (K, 6)`` (bounds inclusive,
    as 3DETR's ``extract_pc_in_box3d``: ``Delaunay.find_simplex >= 0`` counts the boundary)."""
    pts = _numpy(points, np.float64)[:, :3]
    boxes = _numpy(boxes_minmax, np.float64).reshape(-1, 6)
    counts = np.zeros(boxes.shape[0], dtype=np.int64)
    chunk = max(1, 4_000_000 // max(1, pts.shape[0]))
    for start in range(0, boxes.shape[0], chunk):
        b = boxes[start:start + chunk]
        inside = np.all(
            (pts[None, :, :] >= b[:, None, :3]) & (pts[None, :, :] <= b[:, None, 3:]), axis=-1
        )
        counts[start:start + chunk] = inside.sum(axis=1)
    return counts


def parse_predictions(
    boxes_minmax: Any,
    sem_cls_prob: Any,
    objectness_prob: Any,
    point_clouds: Any | None = None,
    *,
    nms_iou: float = 0.25,
    conf_thresh: float = 0.05,
    per_class_proposal: bool = True,
    cls_nms: bool = True,
    remove_empty_box: bool = True,
    min_points_in_box: int = 5,
) -> list[list[PredBox]]:
    """Post-process a batch of raw queries into scored detections, per scene.

    As 3DETR's ``parse_predictions`` with ``get_ap_config_dict`` defaults (``use_3d_nms=True``,
    ``use_old_type_nms=False``, ``use_cls_confidence_only=False``, ``no_nms=False``), axis-
    aligned:

    1. ``remove_empty_box`` (3DETR's ``exact_eval=True``, what ``engine.evaluate`` uses for the
       reported numbers; its training-time calculator sets it False): a query whose box holds
       fewer than ``min_points_in_box`` (5) points of the input cloud is dropped; if that drops
       all of a scene's queries, the one with the highest objectness is kept.
    2. 3D NMS at ``nms_iou`` among the remaining queries, scored by objectness, between queries
       of the same argmax class (``cls_nms=True``, :func:`nms_3d`; class-agnostic otherwise).
    3. Every kept query with ``objectness > conf_thresh`` (strict) is emitted, with
       ``per_class_proposal=True`` once **per class** ``c`` (all C of them, class-major order)
       with score ``p(c) * objectness``; otherwise once, with its argmax class and the
       objectness as score.

    Args:
        boxes_minmax: ``(B, Q, 6)`` predicted min/max boxes.
        sem_cls_prob: ``(B, Q, C)`` class probabilities (the first C entries of the softmax
            over C+1, see ``cd2p.models.detection.matcher.class_and_objectness_prob``).
        objectness_prob: ``(B, Q)`` ``1 - p(no object)``.
        point_clouds: ``(B, N, 3+)`` the network's input points; required when
            ``remove_empty_box``.
    Returns:
        Per scene, a list of ``(class, box_minmax (6,) float64, score float)``.
    """
    boxes = _numpy(boxes_minmax)
    cls_prob = _numpy(sem_cls_prob)
    obj_prob = _numpy(objectness_prob)
    if boxes.ndim != 3 or boxes.shape[-1] != 6:
        raise ValueError(f"boxes_minmax must be (B, Q, 6); got {boxes.shape}")
    bsize, nq = boxes.shape[:2]
    pred_cls = np.argmax(cls_prob, -1)
    nonempty = np.ones((bsize, nq), dtype=bool)
    if remove_empty_box:
        if point_clouds is None:
            raise ValueError("remove_empty_box needs the point clouds")
        clouds = _numpy(point_clouds)
        for i in range(bsize):
            nonempty[i] = points_in_boxes_count(clouds[i], boxes[i]) >= min_points_in_box
            if not nonempty[i].any():
                nonempty[i, obj_prob[i].argmax()] = True
    results: list[list[PredBox]] = []
    for i in range(bsize):
        candidates = np.nonzero(nonempty[i])[0]
        picked = nms_3d(
            boxes[i, candidates], obj_prob[i, candidates],
            pred_cls[i, candidates] if cls_nms else None, nms_iou,
        )
        kept = np.zeros(nq, dtype=bool)
        kept[candidates[picked]] = True
        emit = np.nonzero(kept & (obj_prob[i] > conf_thresh))[0]
        scene: list[PredBox] = []
        if per_class_proposal:
            for c in range(cls_prob.shape[-1]):
                scene.extend(
                    (c, boxes[i, j].astype(np.float64), float(cls_prob[i, j, c] * obj_prob[i, j]))
                    for j in emit
                )
        else:
            scene.extend(
                (int(pred_cls[i, j]), boxes[i, j].astype(np.float64), float(obj_prob[i, j]))
                for j in emit
            )
        results.append(scene)
    return results


# ---------------------------------------------------------------------------------------------
# Average precision
# ---------------------------------------------------------------------------------------------


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = False) -> float:
    """VOC average precision from a precision/recall curve (3DETR's ``voc_ap``).

    ``use_07_metric=False`` (3DETR's setting): all-point interpolation -- sentinels
    ``rec = [0, ..., 1]``, ``prec = [0, ..., 0]``, precision made monotone from the right,
    area summed where recall changes. ``True``: the 11-point VOC07 metric.
    """
    rec = np.asarray(rec, dtype=np.float64)
    prec = np.asarray(prec, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0.0 if np.sum(rec >= t) == 0 else float(np.max(prec[rec >= t]))
            ap += p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    change = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[change + 1] - mrec[change]) * mpre[change + 1]))


def eval_det_cls(
    pred: Mapping[Any, Sequence[tuple[np.ndarray, float]]],
    gt: Mapping[Any, Sequence[np.ndarray]],
    ovthresh: float = 0.25,
    use_07_metric: bool = False,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Precision/recall/AP of one class (3DETR's ``eval_det_cls``).

    Args:
        pred: ``{scene: [(box_minmax (6,), score), ...]}``.
        gt: ``{scene: [box_minmax (6,), ...]}``.
        ovthresh: a detection needs ``IoU > ovthresh`` (strict).
    Returns:
        ``rec``, ``prec``: ``(nd,)`` over the detections sorted by decreasing score
        (``np.argsort(-score)``, numpy's default sort, as theirs); ``ap``. With no ground truth
        (``npos == 0``) recall is all zeros and AP 0.
    """
    gt_boxes: dict[Any, np.ndarray] = {}
    used: dict[Any, np.ndarray] = {}
    npos = 0
    for scene, boxes in gt.items():
        arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
        gt_boxes[scene] = arr
        used[scene] = np.zeros(arr.shape[0], dtype=bool)
        npos += arr.shape[0]
    scenes: list[Any] = []
    confidence: list[float] = []
    dets: list[np.ndarray] = []
    for scene, items in pred.items():
        for box, score in items:
            scenes.append(scene)
            confidence.append(score)
            dets.append(np.asarray(box, dtype=np.float64))
    conf = np.asarray(confidence)
    order = np.argsort(-conf)
    nd = len(order)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d, k in enumerate(order):
        scene = scenes[k]
        candidates = gt_boxes.get(scene)
        ovmax = -np.inf
        jmax = -1
        if candidates is not None and candidates.shape[0] > 0:
            ious = aabb_iou_one_to_many(dets[k], candidates)
            jmax = int(np.argmax(ious))  # first maximum, as their strict `iou > ovmax` loop
            ovmax = ious[jmax]
        if ovmax > ovthresh and not used[scene][jmax]:
            tp[d] = 1.0
            used[scene][jmax] = True
        else:
            fp[d] = 1.0
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = np.zeros_like(tp) if npos == 0 else tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return rec, prec, voc_ap(rec, prec, use_07_metric)


def eval_det(
    pred_all: Mapping[Any, Sequence[PredBox]],
    gt_all: Mapping[Any, Sequence[GtBox]],
    ovthresh: float = 0.25,
    use_07_metric: bool = False,
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict[int, float]]:
    """Per-class precision/recall/AP over scenes (3DETR's ``eval_det_multiprocessing``).

    Args:
        pred_all: ``{scene: [(class, box_minmax, score), ...]}``.
        gt_all: ``{scene: [(class, box_minmax), ...]}``.
    Returns:
        ``rec``, ``prec``, ``ap`` keyed by class, for every class with a prediction or a ground
        truth box. Classes with ground truth but no prediction: empty ``rec``/``prec`` (3DETR
        stores the scalar 0) and AP 0.
    """
    pred: dict[Any, dict[Any, list]] = {}
    gt: dict[Any, dict[Any, list]] = {}
    for scene, items in pred_all.items():
        for classname, box, score in items:
            pred.setdefault(classname, {}).setdefault(scene, []).append((box, score))
            gt.setdefault(classname, {}).setdefault(scene, [])
    for scene, items in gt_all.items():
        for classname, box in items:
            gt.setdefault(classname, {}).setdefault(scene, []).append(box)
    rec: dict[Any, np.ndarray] = {}
    prec: dict[Any, np.ndarray] = {}
    ap: dict[Any, float] = {}
    for classname in gt:
        if classname in pred:
            rec[classname], prec[classname], ap[classname] = eval_det_cls(
                pred[classname], gt[classname], ovthresh, use_07_metric
            )
        else:
            rec[classname], prec[classname], ap[classname] = np.zeros(0), np.zeros(0), 0.0
    return rec, prec, ap


# ---------------------------------------------------------------------------------------------
# Accumulation over scenes and ranks
# ---------------------------------------------------------------------------------------------


def _default_rank() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class DetectionAPCalculator:
    """Accumulate detections and ground truth per scene; mAP/AR as 3DETR's ``APCalculator``.

    Usage::

        calc = DetectionAPCalculator(class_names=SCANNET_CLASSES)
        for batch in loader:                      # each rank its own shard of scenes
            calc.step(boxes_minmax, sem_cls_prob, objectness_prob, gt_boxes_minmax,
                      gt_labels, gt_present, point_clouds=points, scene_ids=names)
        calc.gather()                             # every rank now holds every scene
        metrics = calc.compute()                  # {0.25: {...}, 0.5: {...}}

    Scenes are keyed by id (strings); :meth:`compute` walks them in sorted id order so that the
    result does not depend on how scenes were sharded and merged (the order only matters for
    detections of exactly equal score, where 3DETR uses its loader order). Merging skips a
    scene id it already holds (``DistributedSampler`` pads shards by repeating scenes).

    Args:
        class_names: names of the C classes (index = class id) or ``{id: name}``; per-class
            keys are ``str(id)`` without it.
        iou_thresholds: default thresholds of :meth:`compute` (3DETR: 0.25, 0.5).
        parse_kwargs: keyword arguments of :func:`parse_predictions` used by :meth:`step`
            (3DETR's evaluation defaults otherwise).
    """

    def __init__(
        self,
        class_names: Sequence[str] | Mapping[int, str] | None = None,
        iou_thresholds: Iterable[float] = (0.25, 0.5),
        parse_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if class_names is None:
            self.class_names: dict[int, str] | None = None
        elif isinstance(class_names, Mapping):
            self.class_names = {int(k): str(v) for k, v in class_names.items()}
        else:
            self.class_names = {i: str(n) for i, n in enumerate(class_names)}
        self.iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self.parse_kwargs = dict(parse_kwargs or {})
        self.reset()

    def reset(self) -> None:
        self._pred: dict[str, list[PredBox]] = {}
        self._gt: dict[str, list[GtBox]] = {}
        self._auto = 0

    def __len__(self) -> int:
        return len(self._gt)

    def _name(self, cls: int) -> str:
        if self.class_names is None:
            return str(cls)
        return self.class_names.get(cls, str(cls))

    def add_scene(
        self,
        scene_id: str,
        predictions: Iterable[tuple[int, Any, float]],
        ground_truth: Iterable[tuple[int, Any]],
    ) -> None:
        """Record one scene: ``predictions`` ``[(class, box_minmax (6,), score)]`` (already
        post-processed) and ``ground_truth`` ``[(class, box_minmax (6,))]``."""
        scene_id = str(scene_id)
        if scene_id in self._gt:
            raise ValueError(f"scene {scene_id!r} was already added")
        self._pred[scene_id] = [
            (int(c), _numpy(b, np.float64).reshape(6), float(s)) for c, b, s in predictions
        ]
        self._gt[scene_id] = [(int(c), _numpy(b, np.float64).reshape(6)) for c, b in ground_truth]

    def step(
        self,
        boxes_minmax: Any,
        sem_cls_prob: Any,
        objectness_prob: Any,
        gt_boxes_minmax: Any,
        gt_labels: Any,
        gt_present: Any,
        point_clouds: Any | None = None,
        scene_ids: Sequence[str] | None = None,
    ) -> None:
        """Post-process a batch (:func:`parse_predictions`) and record its scenes.

        Args:
            boxes_minmax: ``(B, Q, 6)``; sem_cls_prob: ``(B, Q, C)``; objectness_prob:
                ``(B, Q)``; gt_boxes_minmax: ``(B, M, 6)``; gt_labels: ``(B, M)``;
                gt_present: ``(B, M)``; point_clouds: ``(B, N, 3+)`` (for
                ``remove_empty_box``); scene_ids: ``B`` unique ids (default
                ``"r{rank}-{n}"``, unique across ranks).
        """
        preds = parse_predictions(
            boxes_minmax, sem_cls_prob, objectness_prob, point_clouds, **self.parse_kwargs
        )
        gt_boxes = _numpy(gt_boxes_minmax, np.float64)
        labels = _numpy(gt_labels)
        present = _numpy(gt_present)
        if scene_ids is None:
            rank = _default_rank()
            scene_ids = [f"r{rank}-{self._auto + i:08d}" for i in range(len(preds))]
            self._auto += len(preds)
        if len(scene_ids) != len(preds):
            raise ValueError(f"{len(scene_ids)} scene ids for a batch of {len(preds)}")
        for b, scene_id in enumerate(scene_ids):
            gts = [(int(labels[b, j]), gt_boxes[b, j]) for j in range(labels.shape[1])
                   if present[b, j] == 1]
            self.add_scene(scene_id, preds[b], gts)

    # -- merging ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything accumulated, as plain JSON-serialisable lists (floats round-trip
        exactly through JSON)."""
        return {
            "scenes": [
                {
                    "id": scene,
                    "pred": [[c, [float(v) for v in b], s] for c, b, s in self._pred[scene]],
                    "gt": [[c, [float(v) for v in b]] for c, b in self._gt[scene]],
                }
                for scene in self._gt
            ]
        }

    def merge(self, state: Mapping[str, Any] | DetectionAPCalculator) -> None:
        """Add the scenes of another calculator (or of its :meth:`state_dict`), skipping scene
        ids already held."""
        if isinstance(state, DetectionAPCalculator):
            state = state.state_dict()
        for scene in state["scenes"]:
            if str(scene["id"]) in self._gt:
                continue
            self.add_scene(scene["id"], scene["pred"], scene["gt"])

    def gather(self, device: torch.device | None = None) -> None:
        """All-gather every rank's scenes so that each rank holds all of them (no-op without a
        process group). ``device``: this rank's GPU under NCCL, the CPU under gloo."""
        from cd2p.engine.distributed import all_gather_json, is_distributed

        if not is_distributed():
            return
        states = all_gather_json(self.state_dict(), device=device)
        self.reset()
        for state in states:
            self.merge(state)

    # -- metrics ----------------------------------------------------------------------------

    def compute(self, iou_thresholds: Iterable[float] | None = None) -> dict[float, dict[str, Any]]:
        """mAP and AR per IoU threshold, as 3DETR's ``APCalculator.compute_metrics``.

        Returns:
            ``{threshold: {"mAP": float, "AR": float, "per_class_ap": {name: ap},
            "per_class_recall": {name: recall}}}`` where the classes are those with a
            prediction or a ground-truth box (sorted by id), ``mAP`` is the mean of their APs
            (NaN -> 0; computed in float32 as 3DETR does), the recall of a class is its recall
            after the last detection (0 without detections) and ``AR`` their mean.
        """
        thresholds = self.iou_thresholds if iou_thresholds is None else tuple(iou_thresholds)
        scenes = sorted(self._gt)
        pred_all = {s: self._pred[s] for s in scenes}
        gt_all = {s: self._gt[s] for s in scenes}
        out: dict[float, dict[str, Any]] = {}
        for thr in thresholds:
            rec, _, ap = eval_det(pred_all, gt_all, ovthresh=thr)
            classes = sorted(ap)
            ap_vals = np.array([ap[c] for c in classes], dtype=np.float32)
            ap_vals[np.isnan(ap_vals)] = 0
            recalls = [float(rec[c][-1]) if len(rec[c]) else 0.0 for c in classes]
            out[float(thr)] = {
                "mAP": float(ap_vals.mean()) if classes else 0.0,
                "AR": float(np.mean(recalls)) if classes else 0.0,
                "per_class_ap": {self._name(c): float(ap[c]) for c in classes},
                "per_class_recall": {self._name(c): r for c, r in zip(classes, recalls,
                                                                      strict=True)},
            }
        return out

    @staticmethod
    def flatten(metrics: Mapping[float, Mapping[str, Any]]) -> dict[str, float]:
        """``compute()``'s result as flat scalars: ``mAP@0.25``, ``AR@0.25``,
        ``AP@0.25/<class>``, ``recall@0.25/<class>`` (fractions, not percent)."""
        flat: dict[str, float] = {}
        for thr, m in metrics.items():
            flat[f"mAP@{thr:g}"] = float(m["mAP"])
            flat[f"AR@{thr:g}"] = float(m["AR"])
            for name, v in m["per_class_ap"].items():
                flat[f"AP@{thr:g}/{name}"] = float(v)
            for name, v in m["per_class_recall"].items():
                flat[f"recall@{thr:g}/{name}"] = float(v)
        return flat
