"""3DETR's set-prediction loss over every decoder layer (``criterion.SetCriterion``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cd2p.models.detection.boxes import BoxCoder, generalized_box_iou
from cd2p.models.detection.matcher import HungarianMatcher, center_l1_distance

LOSS_NAMES = ("loss_cls", "loss_giou", "loss_center", "loss_size")


def num_boxes_across_ranks(gt_box_present: torch.Tensor) -> float:
    """The loss normaliser: the number of present targets, averaged over distributed ranks,
    at least 1.

    As 3DETR's ``torch.clamp(all_reduce_average(nactual_gt.sum()), min=1).item()``: the sum over
    ranks divided by the world size (a plain local count without an initialised process group).
    """
    count = gt_box_present.detach().float().sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        count = count / dist.get_world_size()
    return float(torch.clamp(count, min=1).item())


class SetCriterion(nn.Module):
    """Hungarian-matched detection losses, summed over decoder layers.

    As 3DETR's ``SetCriterion`` for axis-aligned boxes (no angle terms). For each decoder layer
    independently: match (:class:`HungarianMatcher`, using this layer's GIoU and L1 centre
    distance), then

    * ``loss_cls``: ``F.cross_entropy`` over the C+1 classes of **every** query (unmatched
      queries target the last, "no object", class) with class weights 1 except
      ``no_object_weight`` for "no object", ``reduction="mean"`` -- a *weighted* mean, i.e.
      divided by the sum of the targets' weights, **not** by the number of boxes (3DETR's
      ``loss_sem_cls``);
    * ``loss_giou``: ``sum over matched pairs (1 - GIoU) / num_boxes`` (unnormalised boxes);
    * ``loss_center``: ``sum over matched pairs |c - c_gt|_1 / num_boxes`` (normalised centres);
    * ``loss_size``: ``sum over matched pairs |s - s_gt|_1 / num_boxes`` (normalised sizes);

    where ``num_boxes`` is :func:`num_boxes_across_ranks` (computed once per call). The layer's
    loss is ``sum_k weight_k * loss_k`` and ``loss`` sums the layers. Everything is computed in
    float32 with autocast disabled. Defaults are 3DETR's ScanNet recipe
    (``scripts/scannet_ep1080.sh`` over ``main.py``'s defaults): weights cls 1, giou 1,
    center 5, size 1, no-object 0.25; matcher costs cls 1, giou 2, center 0, objectness 0.

    Args:
        num_classes: C, the number of object classes (logits have C+1 columns).
        matcher: defaults to ``HungarianMatcher()`` (3DETR's ScanNet costs).
        weight_cls, weight_giou, weight_center, weight_size: loss weights; a weight of 0
            skips that term (its value is reported as 0).
        no_object_weight: cross-entropy weight of the "no object" class.
        box_coder: used only to build normalised targets when ``targets`` lacks them.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        weight_cls: float = 1.0,
        weight_giou: float = 1.0,
        weight_center: float = 5.0,
        weight_size: float = 1.0,
        no_object_weight: float = 0.25,
        box_coder: BoxCoder | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        self.num_classes = int(num_classes)
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weights = {
            "loss_cls": float(weight_cls),
            "loss_giou": float(weight_giou),
            "loss_center": float(weight_center),
            "loss_size": float(weight_size),
        }
        self.no_object_weight = float(no_object_weight)
        self.box_coder = box_coder if box_coder is not None else BoxCoder()
        class_weights = torch.ones(self.num_classes + 1)
        class_weights[-1] = self.no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def extra_repr(self) -> str:
        weights = ", ".join(f"{k}={v}" for k, v in self.weights.items())
        return (f"num_classes={self.num_classes}, {weights}, "
                f"no_object_weight={self.no_object_weight}")

    # -- inputs -----------------------------------------------------------------------------

    @staticmethod
    def _layers(outputs: Any) -> list[Mapping[str, torch.Tensor]]:
        if isinstance(outputs, Mapping):
            if "outputs" in outputs:  # 3DETR's {"outputs": last, "aux_outputs": [...]}
                return [*outputs.get("aux_outputs", []), outputs["outputs"]]
            return [outputs]
        if isinstance(outputs, Sequence) and len(outputs) > 0:
            return list(outputs)
        raise ValueError("outputs must be a non-empty list of per-layer dicts or one dict")

    def _prepare_targets(self, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        present = targets["gt_box_present"].float()
        out = {
            "gt_box_present": present,
            "gt_box_sem_cls_label": targets["gt_box_sem_cls_label"].long(),
            "gt_box_centers": targets["gt_box_centers"].float(),
            "gt_box_sizes": targets["gt_box_sizes"].float(),
        }
        if "gt_box_centers_normalized" in targets and "gt_box_sizes_normalized" in targets:
            out["gt_box_centers_normalized"] = targets["gt_box_centers_normalized"].float()
            out["gt_box_sizes_normalized"] = targets["gt_box_sizes_normalized"].float()
        else:
            out.update(self.box_coder.encode_targets(
                out["gt_box_centers"], out["gt_box_sizes"],
                targets["point_cloud_dims_min"].float(), targets["point_cloud_dims_max"].float(),
                present,
            ))
        # padded labels may hold anything: make them valid indices (they are never selected)
        out["gt_box_sem_cls_label"] = torch.where(
            present.bool(), out["gt_box_sem_cls_label"],
            torch.zeros_like(out["gt_box_sem_cls_label"]),
        )
        return out

    # -- one layer --------------------------------------------------------------------------

    def layer_losses(
        self,
        layer: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        num_boxes: float,
    ) -> dict[str, torch.Tensor]:
        """Unweighted losses of one decoder layer (float32), ``targets`` as prepared."""
        logits = layer["sem_cls_logits"].float()
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"sem_cls_logits has {logits.shape[-1]} columns; expected "
                             f"num_classes + 1 = {self.num_classes + 1}")
        center_n = layer["center_normalized"].float()
        size_n = layer["size_normalized"].float()
        pred_boxes = torch.cat(
            [layer["center_unnormalized"].float(), layer["size_unnormalized"].float()], dim=-1
        )
        gt_boxes = torch.cat([targets["gt_box_centers"], targets["gt_box_sizes"]], dim=-1)
        present = targets["gt_box_present"]

        gious = generalized_box_iou(pred_boxes, gt_boxes, present)  # (B, Q, M)
        center_dist = center_l1_distance(center_n, targets["gt_box_centers_normalized"])
        match = self.matcher(
            {"sem_cls_logits": logits.detach(), "center_normalized": center_n.detach()},
            targets,
            gious=gious.detach(),
            center_dist=center_dist.detach(),
        )
        gt_inds = match.per_prop_gt_inds  # (B, Q)
        matched = match.proposal_matched_mask  # (B, Q)
        zero = logits.sum() * 0.0

        losses: dict[str, torch.Tensor] = {}
        if self.weights["loss_cls"] > 0:
            labels = torch.gather(targets["gt_box_sem_cls_label"], 1, gt_inds)
            labels = torch.where(matched.bool(), labels, torch.full_like(labels, self.num_classes))
            losses["loss_cls"] = F.cross_entropy(
                logits.transpose(1, 2), labels, weight=self.class_weights.float(),
                reduction="mean",
            )
        else:
            losses["loss_cls"] = zero
        if self.weights["loss_giou"] > 0:
            matched_giou = torch.gather(gious, 2, gt_inds[..., None]).squeeze(-1)
            losses["loss_giou"] = ((1 - matched_giou) * matched).sum() / num_boxes
        else:
            losses["loss_giou"] = zero
        if self.weights["loss_center"] > 0:
            matched_dist = torch.gather(center_dist, 2, gt_inds[..., None]).squeeze(-1)
            losses["loss_center"] = (matched_dist * matched).sum() / num_boxes
        else:
            losses["loss_center"] = zero
        if self.weights["loss_size"] > 0:
            gt_sizes = torch.gather(
                targets["gt_box_sizes_normalized"], 1, gt_inds[..., None].expand(-1, -1, 3)
            )
            size_l1 = (size_n - gt_sizes).abs().sum(dim=-1)
            losses["loss_size"] = (size_l1 * matched).sum() / num_boxes
        else:
            losses["loss_size"] = zero
        return losses

    # -- all layers -------------------------------------------------------------------------

    def forward(self, outputs: Any, targets: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Losses of every decoder layer.

        Args:
            outputs: a list of per-layer dicts, first layer first (or one dict, or 3DETR's
                ``{"outputs": last, "aux_outputs": [...]}``); each holds
                ``sem_cls_logits (B, Q, C+1)`` (last column = "no object"),
                ``center_normalized (B, Q, 3)``, ``size_normalized (B, Q, 3)``,
                ``center_unnormalized (B, Q, 3)``, ``size_unnormalized (B, Q, 3)``.
            targets: ``gt_box_centers (B, M, 3)``, ``gt_box_sizes (B, M, 3)`` (scene units),
                ``gt_box_sem_cls_label (B, M)`` int in ``[0, C)`` where present,
                ``gt_box_present (B, M)`` 0/1 (targets padded per batch), and either
                ``gt_box_centers_normalized``/``gt_box_sizes_normalized (B, M, 3)`` or
                ``point_cloud_dims_min``/``point_cloud_dims_max (B, 3)`` to build them.
        Returns:
            ``loss``: scalar float32 tensor with gradients, ``sum_layers sum_k w_k * loss_k``;
            ``loss_cls``, ``loss_giou``, ``loss_center``, ``loss_size``: detached scalars,
            **unweighted**, summed over layers; ``{name}_{i}``: the same per layer ``i``
            (0 = first); ``num_boxes``: the float normaliser.
        """
        layers = self._layers(outputs)
        device_type = layers[0]["sem_cls_logits"].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            prepared = self._prepare_targets(targets)
            num_boxes = num_boxes_across_ranks(prepared["gt_box_present"])
            total = None
            result: dict[str, Any] = {}
            sums = {name: None for name in LOSS_NAMES}
            for i, layer in enumerate(layers):
                losses = self.layer_losses(layer, prepared, num_boxes)
                layer_total = sum(self.weights[k] * losses[k] for k in LOSS_NAMES)
                total = layer_total if total is None else total + layer_total
                for name in LOSS_NAMES:
                    value = losses[name].detach()
                    result[f"{name}_{i}"] = value
                    sums[name] = value if sums[name] is None else sums[name] + value
            result["loss"] = total
            result.update(sums)
            result["num_boxes"] = num_boxes
        return result
