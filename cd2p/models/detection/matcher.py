"""Hungarian matching of box queries to ground-truth boxes (DETR / 3DETR ``Matcher``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from cd2p.models.detection.boxes import generalized_box_iou


@dataclass
class MatchResult:
    """One matching of a batch.

    Attributes:
        indices: per sample ``(query_idx, target_idx)``, two int64 tensors of equal length
            ``min(Q, M_b)`` on the outputs' device; ``target_idx`` indexes the padded target
            axis (``0..M-1``); both empty for a sample without targets (DETR's format).
        per_prop_gt_inds: ``(B, Q)`` int64, the matched target of each query (0 where
            unmatched; 3DETR's ``per_prop_gt_inds``).
        proposal_matched_mask: ``(B, Q)`` float32, 1 where the query is matched (3DETR's
            ``proposal_matched_mask``).
    """

    indices: list[tuple[torch.Tensor, torch.Tensor]]
    per_prop_gt_inds: torch.Tensor
    proposal_matched_mask: torch.Tensor


def class_and_objectness_prob(sem_cls_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, Q, C+1)`` logits (last = "no object") -> ``sem_cls_prob (B, Q, C)`` and
    ``objectness_prob (B, Q)``.

    As 3DETR's ``BoxProcessor.compute_objectness_and_cls_prob``: one softmax over the C+1
    classes; the class probabilities are its first C entries (not renormalised) and
    ``objectness = 1 - p(no object)``.
    """
    prob = torch.softmax(sem_cls_logits, dim=-1)
    return prob[..., :-1], 1 - prob[..., -1]


def center_l1_distance(pred_centers: torch.Tensor, gt_centers: torch.Tensor) -> torch.Tensor:
    """Pairwise L1 distance ``(B, Q, 3) x (B, M, 3) -> (B, Q, M)`` (3DETR:
    ``torch.cdist(center_normalized, gt_box_centers_normalized, p=1)``), differentiable."""
    return (pred_centers[:, :, None, :] - gt_centers[:, None, :, :]).abs().sum(dim=-1)


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of queries to targets, per sample.

    As 3DETR's ``criterion.Matcher`` (itself DETR's ``HungarianMatcher``): the cost of giving
    target ``j`` to query ``i`` is::

        cost_class      * -p_i(class of j)        (softmax over C+1: class_and_objectness_prob)
      + cost_objectness * -objectness_i
      + cost_center     * |center_i - center_j|_1  (normalised coordinates)
      + cost_giou       * -GIoU(box_i, box_j)      (unnormalised boxes)

    One ``(B, Q, M)`` cost matrix is computed for the batch in float32 without gradients, then
    split per sample: sample ``b`` keeps the columns of its present targets and
    ``scipy.optimize.linear_sum_assignment`` solves it (3DETR slices the first
    ``nactual_gt[b]`` columns, which is the same thing when present targets come first, as
    they do in its datasets; any presence pattern works here). Defaults are 3DETR's ScanNet
    settings (``--matcher_cls_cost 1 --matcher_giou_cost 2 --matcher_center_cost 0
    --matcher_objectness_cost 0``).
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_giou: float = 2.0,
        cost_center: float = 0.0,
        cost_objectness: float = 0.0,
    ) -> None:
        super().__init__()
        self.cost_class = float(cost_class)
        self.cost_giou = float(cost_giou)
        self.cost_center = float(cost_center)
        self.cost_objectness = float(cost_objectness)

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_giou={self.cost_giou}, "
                f"cost_center={self.cost_center}, cost_objectness={self.cost_objectness}")

    @torch.no_grad()
    def cost_matrix(
        self,
        outputs: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        gious: torch.Tensor | None = None,
        center_dist: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The ``(B, Q, M)`` float32 cost (padded columns included; they are never used).

        Args: as :meth:`forward`.
        """
        if "sem_cls_prob" in outputs and "objectness_prob" in outputs:
            cls_prob = outputs["sem_cls_prob"].float()
            obj_prob = outputs["objectness_prob"].float()
        else:
            cls_prob, obj_prob = class_and_objectness_prob(outputs["sem_cls_logits"].float())
        batch, nqueries = cls_prob.shape[:2]
        labels = targets["gt_box_sem_cls_label"].long()
        present = targets["gt_box_present"].bool()
        # padded labels may hold anything (-1, ignore ids): point them at class 0, unused anyway
        labels = torch.where(present, labels, torch.zeros_like(labels))
        ngt = labels.shape[1]
        cost = torch.zeros(batch, nqueries, ngt, dtype=torch.float32, device=cls_prob.device)
        if self.cost_class:
            class_prob = torch.gather(cls_prob, 2, labels[:, None, :].expand(batch, nqueries, ngt))
            cost = cost - self.cost_class * class_prob
        if self.cost_objectness:
            cost = cost - self.cost_objectness * obj_prob[:, :, None]
        if self.cost_center:
            if center_dist is None:
                center_dist = center_l1_distance(
                    outputs["center_normalized"].float(),
                    targets["gt_box_centers_normalized"].float(),
                )
            cost = cost + self.cost_center * center_dist.float()
        if self.cost_giou:
            if gious is None:
                pred = torch.cat(
                    [outputs["center_unnormalized"], outputs["size_unnormalized"]], dim=-1
                ).float()
                gt = torch.cat([targets["gt_box_centers"], targets["gt_box_sizes"]], dim=-1)
                gious = generalized_box_iou(pred, gt.float(), present)
            cost = cost - self.cost_giou * gious.float()
        return cost

    @torch.no_grad()
    def forward(
        self,
        outputs: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        gious: torch.Tensor | None = None,
        center_dist: torch.Tensor | None = None,
    ) -> MatchResult:
        """Match one decoder layer's queries to the targets.

        Args:
            outputs: ``sem_cls_logits (B, Q, C+1)`` (or ``sem_cls_prob (B, Q, C)`` with
                ``objectness_prob (B, Q)``); ``center_normalized (B, Q, 3)`` when
                ``cost_center`` is non-zero; ``center_unnormalized``/``size_unnormalized``
                ``(B, Q, 3)`` when ``cost_giou`` is non-zero and ``gious`` is not given.
            targets: ``gt_box_sem_cls_label (B, M)`` int, ``gt_box_present (B, M)`` (0/1 or
                bool, padded boxes 0); ``gt_box_centers_normalized (B, M, 3)`` for the centre
                cost; ``gt_box_centers``/``gt_box_sizes (B, M, 3)`` for the GIoU cost.
            gious: optional precomputed ``(B, Q, M)`` GIoU (the criterion passes its own).
            center_dist: optional precomputed ``(B, Q, M)`` L1 centre distance.
        Returns:
            :class:`MatchResult`.
        """
        cost = self.cost_matrix(outputs, targets, gious=gious, center_dist=center_dist)
        device = cost.device
        batch, nqueries = cost.shape[:2]
        present = targets["gt_box_present"].bool().cpu()
        cost_np = cost.cpu().numpy()
        per_prop_gt_inds = torch.zeros(batch, nqueries, dtype=torch.int64)
        matched = torch.zeros(batch, nqueries, dtype=torch.float32)
        indices: list[tuple[torch.Tensor, torch.Tensor]] = []
        for b in range(batch):
            columns = torch.nonzero(present[b], as_tuple=False).flatten()
            if columns.numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty.to(device), empty.to(device)))
                continue
            rows, cols = linear_sum_assignment(cost_np[b][:, columns.numpy()])
            query_idx = torch.as_tensor(rows, dtype=torch.int64)
            target_idx = columns[torch.as_tensor(cols, dtype=torch.int64)]
            per_prop_gt_inds[b, query_idx] = target_idx
            matched[b, query_idx] = 1.0
            indices.append((query_idx.to(device), target_idx.to(device)))
        return MatchResult(
            indices=indices,
            per_prop_gt_inds=per_prop_gt_inds.to(device),
            proposal_matched_mask=matched.to(device),
        )
