"""Building blocks of 3DETR-style detection: boxes, matcher, set loss, NMS and AP."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cd2p.engine.detection_eval import (
    DetectionAPCalculator,
    eval_det,
    eval_det_cls,
    nms_3d,
    parse_predictions,
    voc_ap,
)
from cd2p.models.detection.boxes import (
    BoxCoder,
    box_corners,
    box_iou,
    boxes_to_minmax,
    generalized_box_iou,
    minmax_to_boxes,
    normalize_points,
    unnormalize_points,
    unnormalize_sizes,
)
from cd2p.models.detection.criterion import SetCriterion
from cd2p.models.detection.matcher import HungarianMatcher


def _box(cx, cy, cz, dx=1.0, dy=1.0, dz=1.0) -> list[float]:
    return [cx, cy, cz, dx, dy, dz]


# ---------------------------------------------------------------------------------------------
# boxes
# ---------------------------------------------------------------------------------------------


def test_box_iou_and_giou_hand_cases() -> None:
    a = torch.tensor([[_box(0, 0, 0)]])  # (1, 1, 6)
    b = torch.tensor([[
        _box(0, 0, 0),            # identical
        _box(0.5, 0, 0),          # half overlap along x: 0.5 / 1.5
        _box(0.5, 0.5, 0.5),      # 0.125 / 1.875, hull 1.5 ** 3
        _box(3, 0, 0),            # disjoint, hull 4 x 1 x 1
        _box(0, 0, 0, 2, 2, 2),   # contains a: 1 / 8, hull = b
    ]])
    iou = box_iou(a, b)[0, 0]
    giou = generalized_box_iou(a, b)[0, 0]
    assert iou.shape == giou.shape == (5,)
    torch.testing.assert_close(iou, torch.tensor([1.0, 1 / 3, 1 / 15, 0.0, 1 / 8]))
    # giou = iou - (hull - union) / hull
    torch.testing.assert_close(
        giou, torch.tensor([1.0, 1 / 3, 1 / 15 - (3.375 - 1.875) / 3.375, -(4 - 2) / 4, 1 / 8])
    )
    assert giou[3] < 0


def test_box_iou_batched_shapes_and_padding_mask() -> None:
    a = torch.rand(2, 4, 6) + 0.1
    b = torch.rand(2, 3, 6) + 0.1
    assert box_iou(a, b).shape == (2, 4, 3)
    present = torch.tensor([[1, 1, 0], [1, 0, 0]])
    giou = generalized_box_iou(a, b, present)
    assert giou.shape == (2, 4, 3)
    assert torch.all(giou[0, :, 2] == 0) and torch.all(giou[1, :, 1:] == 0)
    # unbatched inputs broadcast too
    assert box_iou(a[0], b[0]).shape == (4, 3)


def test_zero_size_boxes_are_finite_with_finite_gradients() -> None:
    a = torch.tensor([[_box(0, 0, 0, 0, 0, 0), _box(0, 0, 0), _box(1, 1, 1, 0, 1, 1)]],
                     requires_grad=True)
    b = torch.tensor([[_box(0, 0, 0, 0, 0, 0), _box(0.2, 0, 0)]])
    iou = box_iou(a, b)
    giou = generalized_box_iou(a, b)
    assert torch.isfinite(iou).all() and torch.isfinite(giou).all()
    assert iou[0, 0, 0] == 0 and giou[0, 0, 0] == 0  # two empty boxes: 0, not NaN
    assert (giou >= -1).all() and (giou <= 1).all()
    giou.sum().backward()
    assert torch.isfinite(a.grad).all()


def test_corners_and_minmax() -> None:
    boxes = torch.tensor([_box(1.0, 2.0, 3.0, 2.0, 4.0, 6.0)])
    mm = boxes_to_minmax(boxes)
    torch.testing.assert_close(mm, torch.tensor([[0.0, 0.0, 0.0, 2.0, 4.0, 6.0]]))
    torch.testing.assert_close(minmax_to_boxes(mm), boxes)
    corners = box_corners(boxes[:, :3], boxes[:, 3:])
    assert corners.shape == (1, 8, 3)
    torch.testing.assert_close(corners.amin(dim=1), mm[:, :3])
    torch.testing.assert_close(corners.amax(dim=1), mm[:, 3:])
    with pytest.raises(NotImplementedError):
        boxes_to_minmax(torch.zeros(1, 7))


def test_box_coder_round_trip_and_decoding() -> None:
    dims_min = torch.tensor([[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0]])
    dims_max = torch.tensor([[3.0, 2.0, 2.5], [5.0, 6.0, 3.0]])
    extent = dims_max - dims_min
    centers = dims_min[:, None] + torch.rand(2, 5, 3) * extent[:, None]
    sizes = torch.rand(2, 5, 3) * extent[:, None] * 0.5
    present = torch.ones(2, 5)
    present[1, 3:] = 0
    coder = BoxCoder()
    enc = coder.encode_targets(centers, sizes, dims_min, dims_max, present)
    assert torch.all(enc["gt_box_centers_normalized"][1, 3:] == 0)  # padded centres zeroed
    back_c = unnormalize_points(enc["gt_box_centers_normalized"], dims_min, dims_max)
    back_s = unnormalize_sizes(enc["gt_box_sizes_normalized"], dims_min, dims_max)
    torch.testing.assert_close(back_c[0], centers[0])
    torch.testing.assert_close(back_c[1, :3], centers[1, :3])
    torch.testing.assert_close(back_s, sizes)
    boxes = coder.unnormalize(enc["gt_box_centers_normalized"], enc["gt_box_sizes_normalized"],
                              dims_min, dims_max)
    torch.testing.assert_close(boxes[0], torch.cat([centers[0], sizes[0]], -1))

    # decoding: zero logits put the centre on the query point (3DETR: metric offset in
    # (-0.5, 0.5)) and the size at half the scene extent
    query = centers
    out = coder.decode(torch.zeros(2, 5, 3), torch.zeros(2, 5, 3), query, dims_min, dims_max)
    torch.testing.assert_close(out["center_unnormalized"], query)
    torch.testing.assert_close(out["center_normalized"],
                               normalize_points(query, dims_min, dims_max))
    torch.testing.assert_close(out["size_unnormalized"], 0.5 * extent[:, None].expand(2, 5, 3))
    big = coder.decode(torch.full((2, 5, 3), 50.0), torch.zeros(2, 5, 3), query, dims_min,
                       dims_max)
    torch.testing.assert_close(big["center_unnormalized"], query + 0.5)  # metric offset
    norm = BoxCoder(center_offset_space="normalized").decode(
        torch.full((2, 5, 3), 50.0), torch.zeros(2, 5, 3), query, dims_min, dims_max)
    torch.testing.assert_close(norm["center_normalized"],
                               normalize_points(query, dims_min, dims_max) + 0.5)
    # a degenerate (flat) scene: sizes use the 0.1 floor of the extent, as 3DETR
    flat_min, flat_max = torch.zeros(1, 3), torch.tensor([[2.0, 2.0, 0.0]])
    s = unnormalize_sizes(torch.ones(1, 1, 3), flat_min, flat_max)
    torch.testing.assert_close(s, torch.tensor([[[2.0, 2.0, 0.1]]]))


# ---------------------------------------------------------------------------------------------
# matcher
# ---------------------------------------------------------------------------------------------


def test_matcher_optimal_not_greedy_with_padding_and_empty_sample() -> None:
    # cost = -p(class of target). Greedy takes q0->t0 (0.9) then q1->t1 (0.1): 1.0 in total;
    # the optimum is q0->t1 (0.8) + q1->t0 (0.7) = 1.5.
    prob = torch.zeros(3, 3, 3)  # (B, Q, C)
    prob[0, 0] = torch.tensor([0.9, 0.8, 0.0])
    prob[0, 1] = torch.tensor([0.7, 0.1, 0.0])
    prob[0, 2] = torch.tensor([0.0, 0.0, 0.05])
    prob[1] = prob[0]
    prob[2] = prob[0]
    labels = torch.tensor([
        [0, 1, 2],  # third target padded: its class would attract q2 if it were present
        [2, 0, 1],  # present targets need not come first: padded slot 0
        [0, 0, 0],  # empty sample
    ])
    present = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]])
    matcher = HungarianMatcher(cost_class=1.0, cost_giou=0.0)
    result = matcher(
        {"sem_cls_prob": prob, "objectness_prob": torch.ones(3, 3)},
        {"gt_box_sem_cls_label": labels, "gt_box_present": present},
    )
    q0, t0 = result.indices[0]
    assert dict(zip(q0.tolist(), t0.tolist(), strict=True)) == {0: 1, 1: 0}
    q1, t1 = result.indices[1]
    assert dict(zip(q1.tolist(), t1.tolist(), strict=True)) == {0: 2, 1: 1}
    assert result.indices[2][0].numel() == 0 and result.indices[2][1].numel() == 0
    assert result.per_prop_gt_inds.tolist() == [[1, 0, 0], [2, 1, 0], [0, 0, 0]]
    assert result.proposal_matched_mask.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
    assert result.per_prop_gt_inds.dtype == torch.int64
    assert result.proposal_matched_mask.dtype == torch.float32


def test_matcher_default_costs_recover_permuted_boxes() -> None:
    gt = torch.tensor([[_box(0, 0, 0), _box(3, 0, 0), _box(0, 3, 0)]])
    perm = [2, 0, 1]
    pred = torch.cat([gt[:, perm], torch.tensor([[_box(10, 10, 10)]])], dim=1)  # (1, 4, 6)
    logits = torch.zeros(1, 4, 3)  # C = 2, uniform classes: GIoU decides
    result = HungarianMatcher()(
        {"sem_cls_logits": logits, "center_unnormalized": pred[..., :3],
         "size_unnormalized": pred[..., 3:]},
        {"gt_box_sem_cls_label": torch.zeros(1, 3, dtype=torch.long),
         "gt_box_present": torch.ones(1, 3), "gt_box_centers": gt[..., :3],
         "gt_box_sizes": gt[..., 3:]},
    )
    assert result.per_prop_gt_inds[0, :3].tolist() == perm
    assert result.proposal_matched_mask[0].tolist() == [1, 1, 1, 0]


# ---------------------------------------------------------------------------------------------
# criterion
# ---------------------------------------------------------------------------------------------

DIMS_MIN = torch.tensor([[0.0, 0.0, 0.0]])
DIMS_MAX = torch.tensor([[4.0, 4.0, 2.0]])


def _targets(centers, sizes, labels, present, dims_min=DIMS_MIN, dims_max=DIMS_MAX):
    centers, sizes = torch.as_tensor(centers), torch.as_tensor(sizes)
    present = torch.as_tensor(present, dtype=torch.float32)
    enc = BoxCoder().encode_targets(centers, sizes, dims_min, dims_max, present)
    return {"gt_box_centers": centers, "gt_box_sizes": sizes,
            "gt_box_sem_cls_label": torch.as_tensor(labels), "gt_box_present": present,
            "point_cloud_dims_min": dims_min, "point_cloud_dims_max": dims_max, **enc}


def _layer(logits, centers, sizes, dims_min=DIMS_MIN, dims_max=DIMS_MAX):
    centers, sizes = torch.as_tensor(centers), torch.as_tensor(sizes)
    return {"sem_cls_logits": logits, "center_unnormalized": centers,
            "size_unnormalized": sizes,
            "center_normalized": normalize_points(centers, dims_min, dims_max),
            "size_normalized": sizes / (dims_max - dims_min)[:, None]}


def test_criterion_perfect_predictions_have_zero_box_losses() -> None:
    gt_c = torch.tensor([[[1.0, 1.0, 0.5], [3.0, 2.0, 1.0]]])
    gt_s = torch.tensor([[[0.5, 0.8, 1.0], [1.0, 0.6, 0.4]]])
    targets = _targets(gt_c, gt_s, [[1, 0]], [[1, 1]])
    pred_c = torch.cat([gt_c.flip(1), torch.tensor([[[0.3, 3.5, 1.5], [3.5, 0.3, 0.2]]])], 1)
    pred_s = torch.cat([gt_s.flip(1), torch.full((1, 2, 3), 0.2)], 1)
    logits = torch.full((1, 4, 3), -20.0)  # C = 2
    logits[0, 0, 0] = 20.0  # query 0 = gt 1 (class 0)
    logits[0, 1, 1] = 20.0  # query 1 = gt 0 (class 1)
    logits[0, 2:, 2] = 20.0  # the rest: no object
    out = SetCriterion(num_classes=2)([_layer(logits, pred_c, pred_s)], targets)
    assert float(out["loss_center"]) < 1e-6 and float(out["loss_size"]) < 1e-6
    assert abs(float(out["loss_giou"])) < 1e-6
    assert float(out["loss_cls"]) < 1e-6
    assert float(out["loss"]) < 1e-5 and out["num_boxes"] == 2.0


def test_criterion_no_object_weight_on_hand_case() -> None:
    # one target of class 0; query 0 is matched to it, query 1 is not ("no object" = 2)
    targets = _targets([[[1.0, 1.0, 1.0]]], [[[1.0, 1.0, 1.0]]], [[0]], [[1]])
    logits = torch.tensor([[[2.0, 0.0, 0.5], [0.3, 1.0, 0.2]]])
    boxes_c = torch.tensor([[[1.0, 1.0, 1.0], [3.0, 3.0, 1.0]]])
    boxes_s = torch.ones(1, 2, 3)
    layer = _layer(logits, boxes_c, boxes_s)
    ce_matched = -torch.log_softmax(logits[0, 0], -1)[0]
    ce_unmatched = -torch.log_softmax(logits[0, 1], -1)[2]
    for w in (0.25, 1.0, 0.1):
        out = SetCriterion(num_classes=2, no_object_weight=w)([layer], targets)
        expected = (ce_matched + w * ce_unmatched) / (1 + w)  # weighted mean, 3DETR
        torch.testing.assert_close(out["loss_cls"], expected)


def test_criterion_normalises_by_number_of_boxes() -> None:
    # sample 0: one target; sample 1: two targets (+1 padded). Predictions are the targets
    # shifted by known amounts, so the matching is the identity and the L1 sums are known.
    gt_c = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                         [[1.0, 1.0, 1.0], [3.0, 3.0, 1.0], [0.0, 0.0, 0.0]]])
    gt_s = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                         [[1.0, 1.0, 1.0], [0.8, 0.8, 0.8], [0.0, 0.0, 0.0]]])
    present = [[1, 0, 0], [1, 1, 0]]
    dmin, dmax = DIMS_MIN.expand(2, 3), DIMS_MAX.expand(2, 3)
    targets = _targets(gt_c, gt_s, [[0, 0, 0], [1, 0, 0]], present, dmin, dmax)
    shift = torch.tensor([[[0.4, 0.0, 0.0], [0, 0, 0]], [[0.0, 0.2, 0.0], [0.0, 0.0, 0.1]]])
    grow = torch.tensor([[[0.0, 0.0, 0.2], [0, 0, 0]], [[0.4, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    pred_c = gt_c[:, :2] + shift
    pred_s = gt_s[:, :2] + grow
    pred_s[0, 1] = 0.3
    pred_c[0, 1] = torch.tensor([3.5, 3.5, 1.5])
    logits = torch.zeros(2, 2, 3)
    layer = _layer(logits, pred_c, pred_s, dmin, dmax)
    out = SetCriterion(num_classes=2)([layer], targets)
    assert out["num_boxes"] == 3.0
    center_sum = (0.4 / 4) + (0.2 / 4) + (0.1 / 2)
    size_sum = (0.2 / 2) + (0.4 / 4)
    torch.testing.assert_close(out["loss_center"], torch.tensor(center_sum / 3))
    torch.testing.assert_close(out["loss_size"], torch.tensor(size_sum / 3))
    # no targets anywhere: normaliser clamps at 1, box losses vanish, class loss stays
    empty = _targets(gt_c, gt_s, [[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]], dmin, dmax)
    out = SetCriterion(num_classes=2)([layer], empty)
    assert out["num_boxes"] == 1.0
    assert out["loss_giou"] == 0 and out["loss_center"] == 0 and out["loss_size"] == 0
    torch.testing.assert_close(out["loss_cls"], torch.tensor(math.log(3.0)))


def _random_layers(num_layers=2, batch=2, queries=6, classes=3, dtype=torch.float32):
    dmin = torch.zeros(batch, 3)
    dmax = torch.tensor([[4.0, 5.0, 2.5]]).expand(batch, 3)
    query = torch.rand(batch, queries, 3) * dmax[:, None]
    coder = BoxCoder()
    leaves, layers = [], []
    for _ in range(num_layers):
        logits = torch.randn(batch, queries, classes + 1, dtype=dtype, requires_grad=True)
        c = torch.randn(batch, queries, 3, dtype=dtype, requires_grad=True)
        s = torch.randn(batch, queries, 3, dtype=dtype, requires_grad=True)
        dec = coder.decode(c, s, query.to(dtype), dmin.to(dtype), dmax.to(dtype))
        leaves.append((logits, c, s))
        layers.append({"sem_cls_logits": logits, **dec})
    gt_c = torch.rand(batch, 4, 3) * dmax[:, None]
    gt_s = torch.rand(batch, 4, 3) + 0.2
    present = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)[:batch]
    labels = torch.randint(0, classes, (batch, 4))
    return leaves, layers, _targets(gt_c, gt_s, labels, present, dmin, dmax)


def test_criterion_sums_layers_and_gradients_flow() -> None:
    leaves, layers, targets = _random_layers(num_layers=3)
    crit = SetCriterion(num_classes=3)
    out = crit(layers, targets)
    weights = {"loss_cls": 1.0, "loss_giou": 1.0, "loss_center": 5.0, "loss_size": 1.0}
    total = sum(w * out[f"{k}_{i}"] for k, w in weights.items() for i in range(3))
    torch.testing.assert_close(out["loss"].detach(), total)
    for k in weights:
        torch.testing.assert_close(out[k], sum(out[f"{k}_{i}"] for i in range(3)))
        assert not out[k].requires_grad
    out["loss"].backward()
    for logits, c, s in leaves:
        for t in (logits, c, s):
            assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    # 3DETR's {"outputs", "aux_outputs"} form gives the same total
    again = crit({"outputs": layers[-1], "aux_outputs": layers[:-1]}, targets)
    torch.testing.assert_close(again["loss"], out["loss"])


def test_criterion_runs_in_fp32_under_bf16_autocast() -> None:
    _, layers, targets = _random_layers(num_layers=2, dtype=torch.bfloat16)
    crit = SetCriterion(num_classes=3)
    reference = crit([{k: v.detach().float() for k, v in layer.items()} for layer in layers],
                     targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crit(layers, targets)
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"].detach(), reference["loss"])
    out["loss"].backward()


# ---------------------------------------------------------------------------------------------
# NMS and post-processing
# ---------------------------------------------------------------------------------------------


def test_nms_same_class_hand_case() -> None:
    boxes = np.array([
        [0.0, 0, 0, 1, 1, 1],      # 0: class 0, best
        [0.1, 0, 0, 1.1, 1, 1],    # 1: class 0, IoU 0.818 with 0 -> suppressed
        [0.1, 0, 0, 1.1, 1, 1],    # 2: class 1, same box -> kept (other class)
        [5.0, 5, 5, 6, 6, 6],      # 3: class 0, far -> kept
        [0.5, 0, 0, 1.5, 1, 1],    # 4: class 0, IoU exactly 1/3 with 0
    ])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    classes = np.array([0, 0, 1, 0, 0])
    assert nms_3d(boxes, scores, classes, 0.25).tolist() == [0, 2, 3]
    # strict ">": an overlap equal to the threshold does not suppress
    assert nms_3d(boxes, scores, classes, 1 / 3).tolist() == [0, 2, 3, 4]
    # class-agnostic: the class-1 copy goes too
    assert nms_3d(boxes, scores, None, 0.25).tolist() == [0, 3]
    assert nms_3d(np.zeros((0, 6)), np.zeros(0)).tolist() == []


def test_parse_predictions_hand_case() -> None:
    boxes = torch.tensor([[[0.0, 0, 0, 1, 1, 1],
                           [0.05, 0, 0, 1.05, 1, 1],   # duplicate of 0, same argmax class
                           [2.0, 2, 2, 3, 3, 3],
                           [5.0, 5, 5, 6, 6, 6]]])     # objectness below conf_thresh
    cls_prob = torch.tensor([[[0.6, 0.3], [0.5, 0.2], [0.1, 0.7], [0.5, 0.5]]])
    obj = torch.tensor([[0.9, 0.7, 0.8, 0.04]])
    out = parse_predictions(boxes, cls_prob, obj, remove_empty_box=False)
    assert len(out) == 1
    got = [(c, tuple(b.tolist()), s) for c, b, s in out[0]]
    assert [(c, b[0]) for c, b, _ in got] == [(0, 0.0), (0, 2.0), (1, 0.0), (1, 2.0)]
    np.testing.assert_allclose([s for *_, s in got], [0.54, 0.08, 0.27, 0.56], rtol=1e-6)
    single = parse_predictions(boxes, cls_prob, obj, remove_empty_box=False,
                               per_class_proposal=False)[0]
    assert [(c, round(s, 6)) for c, _, s in single] == [(0, 0.9), (1, 0.8)]
    # remove_empty_box: box 2 holds 5 points, box 0 only 4 -> only box 2 survives
    points = torch.tensor([[[0.5, 0.5, 0.5]] * 4 + [[2.5, 2.5, 2.5]] * 5])
    kept = parse_predictions(boxes, cls_prob, obj, points)[0]
    assert {b[0] for _, b, _ in kept} == {2.0}
    # every box empty: the most object-like one is kept anyway
    far = torch.full((1, 3, 3), 100.0)
    kept = parse_predictions(boxes, cls_prob, obj, far)[0]
    assert {b[0] for _, b, _ in kept} == {0.0}


# ---------------------------------------------------------------------------------------------
# AP
# ---------------------------------------------------------------------------------------------

UNIT = np.array([0.0, 0, 0, 1, 1, 1])


def _at(x: float) -> np.ndarray:
    return UNIT + np.array([x, 0, 0, x, 0, 0])


def test_voc_ap_all_point_interpolation() -> None:
    rec = np.array([1 / 3, 1 / 3, 2 / 3, 2 / 3])
    prec = np.array([1.0, 0.5, 2 / 3, 0.5])
    assert voc_ap(rec, prec) == pytest.approx(1 / 3 + (1 / 3) * (2 / 3))
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0])) == pytest.approx(1.0)


def test_eval_det_cls_duplicate_is_false_positive() -> None:
    gt = {"s": [_at(0), _at(2), _at(4)]}
    pred = {"s": [(_at(0), 0.9), (_at(0.05), 0.8), (_at(2), 0.7), (_at(10), 0.6)]}
    rec, prec, ap = eval_det_cls(pred, gt, 0.25)
    np.testing.assert_allclose(rec, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(prec, [1.0, 0.5, 2 / 3, 0.5])
    assert ap == pytest.approx(5 / 9)
    # predictions listed in any order: sorted by score first
    shuffled = {"s": pred["s"][::-1]}
    assert eval_det_cls(shuffled, gt, 0.25)[2] == pytest.approx(5 / 9)


def test_eval_det_iou_exactly_at_threshold_is_a_miss() -> None:
    gt = {"s": [UNIT]}
    long_box = np.array([0.0, 0, 0, 4, 1, 1])  # IoU = 1 / 4 exactly
    pred = {"s": [(long_box, 0.9)]}
    assert eval_det_cls(pred, gt, 0.25)[2] == 0.0
    assert eval_det_cls(pred, gt, 0.2499)[2] == pytest.approx(1.0)


def test_eval_det_class_bookkeeping() -> None:
    gt_all = {"a": [(0, _at(0)), (0, _at(2)), (2, _at(6))], "b": [(0, _at(4))]}
    pred_all = {
        "a": [(0, _at(0), 0.9), (0, _at(0.05), 0.8), (0, _at(2), 0.7), (1, _at(8), 0.5)],
        "b": [(0, _at(10), 0.6)],
    }
    rec, prec, ap = eval_det(pred_all, gt_all, 0.25)
    assert set(ap) == {0, 1, 2}  # class 3 (neither) is absent
    assert ap[0] == pytest.approx(5 / 9)  # same curve as the duplicate test, over 2 scenes
    assert ap[1] == 0.0 and not np.isnan(ap[1])  # predictions, no gt: 0 (3DETR's npos guard)
    np.testing.assert_array_equal(rec[1], [0.0])
    assert ap[2] == 0.0 and len(rec[2]) == 0  # gt, no predictions

    calc = DetectionAPCalculator(class_names=["chair", "table", "sofa", "bed"])
    for scene in ("a", "b"):
        calc.add_scene(scene, pred_all[scene], gt_all[scene])
    m = calc.compute((0.25,))[0.25]
    assert m["mAP"] == pytest.approx((5 / 9 + 0 + 0) / 3, rel=1e-6)
    assert m["AR"] == pytest.approx((2 / 3 + 0 + 0) / 3)
    assert set(m["per_class_ap"]) == {"chair", "table", "sofa"}
    assert m["per_class_recall"]["chair"] == pytest.approx(2 / 3)
    assert m["per_class_recall"]["sofa"] == 0.0
    flat = DetectionAPCalculator.flatten({0.25: m})
    assert flat["mAP@0.25"] == m["mAP"] and "AP@0.25/chair" in flat


def _random_batch(rng: np.random.Generator, batch: int, queries: int = 12, classes: int = 3):
    centers = rng.uniform(0, 5, (batch, 5, 3))
    sizes = rng.uniform(0.3, 1.5, (batch, 5, 3))
    gt = np.concatenate([centers - sizes / 2, centers + sizes / 2], -1)
    pick = rng.integers(0, 5, (batch, queries))
    noisy_c = np.take_along_axis(centers, pick[..., None], 1) + rng.normal(0, 0.2,
                                                                           (batch, queries, 3))
    noisy_s = np.take_along_axis(sizes, pick[..., None], 1) * rng.uniform(0.7, 1.3,
                                                                          (batch, queries, 3))
    pred = np.concatenate([noisy_c - noisy_s / 2, noisy_c + noisy_s / 2], -1)
    logits = torch.from_numpy(rng.normal(0, 2, (batch, queries, classes + 1)))
    prob = torch.softmax(logits, -1).float()
    labels = rng.integers(0, classes, (batch, 5))
    present = (rng.uniform(size=(batch, 5)) < 0.8).astype(np.float32)
    return (torch.from_numpy(pred).float(), prob[..., :-1], 1 - prob[..., -1],
            torch.from_numpy(gt).float(), torch.from_numpy(labels), torch.from_numpy(present))


def test_merging_ranks_equals_computing_at_once() -> None:
    rng = np.random.default_rng(0)
    batches = [_random_batch(rng, 2) for _ in range(4)]
    kwargs = {"remove_empty_box": False}
    whole = DetectionAPCalculator(parse_kwargs=kwargs)
    ranks = [DetectionAPCalculator(parse_kwargs=kwargs) for _ in range(2)]
    for i, batch in enumerate(batches):
        ids = [f"scene{i}_{b}" for b in range(2)]
        whole.step(*batch, scene_ids=ids)
        ranks[i % 2].step(*batch, scene_ids=ids)
    merged = DetectionAPCalculator()
    for calc in ranks[::-1]:  # order of the ranks does not matter
        merged.merge(json.loads(json.dumps(calc.state_dict())))
    merged.merge(ranks[0].state_dict())  # a repeated scene (sampler padding) is skipped
    assert len(merged) == len(whole) == 8
    expected, got = whole.compute(), merged.compute()
    assert got == expected
    assert 0 < expected[0.25]["mAP"] <= 1 and expected[0.5]["mAP"] <= expected[0.25]["mAP"]
    with pytest.raises(ValueError):
        whole.add_scene("scene0_0", [], [])
