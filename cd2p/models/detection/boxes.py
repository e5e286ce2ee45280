"""Box encoding for 3DETR-style detection: the one module that knows what a box tensor holds.

Conventions (every function here, and every caller, follows them):

* A **box** is ``(..., 6)`` = ``(cx, cy, cz, dx, dy, dz)``: centre and full side lengths along
  the scene's x, y, z axes, in the scene's (metric, z-up) coordinates. ScanNet boxes are
  axis-aligned, so that is all there is; a rotated variant would append a heading angle as a
  7th column, and functions here refuse any last dimension but 6 (``_check_boxes``), so that
  rotated boxes are added here and nowhere else.
* A **min/max box** is ``(..., 6)`` = ``(xmin, ymin, zmin, xmax, ymax, zmax)``
  (:func:`boxes_to_minmax` / :func:`minmax_to_boxes`); evaluation and NMS use that form.
* The **scene box** of a point cloud is its per-axis ``dims_min`` / ``dims_max`` ``(B, 3)``
  (3DETR's ``point_cloud_dims``); *normalised* coordinates put ``dims_min`` at 0 and
  ``dims_max`` at 1, normalised sizes are sizes divided by the scene extent.

How 3DETR turns head outputs into boxes (``models/model_3detr.py``: ``get_box_predictions`` and
``BoxProcessor``), reproduced by :class:`BoxCoder`:

* ``center_offset = sigmoid(center_head) - 0.5`` is added to the query point in **metric**
  units: ``center_unnormalized = query_xyz + center_offset`` (``query_xyz`` are the unnormalised
  FPS-sampled encoder points), and ``center_normalized = shift_scale_points(center_unnormalized,
  point_cloud_dims)``. (A parametrisation with the offset added in normalised coordinates is
  available as ``BoxCoder(center_offset_space="normalized")``; it is *not* what 3DETR does.)
* ``size_normalized = sigmoid(size_head)``, ``size_unnormalized = size_normalized *
  clamp(dims_max - dims_min, min=0.1)`` (``compute_predicted_size``; the clamp is 3DETR's).
* Targets (``datasets/scannet.py``): ``gt_box_centers_normalized = shift_scale_points(centers)``
  then zeroed for padded boxes; ``gt_box_sizes_normalized = scale_points(sizes,
  1 / (dims_max - dims_min))`` (no clamp on the target side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

BOX_DIM = 6
"""Columns of a box tensor: centre (3) + size (3). Axis-aligned only for now."""

GIOU_EPS = 1e-8
"""3DETR's ``EPS`` in ``generalized_box3d_iou_tensor`` (volume and union floor)."""

SIDE_EPS = 1e-3
"""3DETR's ``box3d_vol_tensor`` takes ``sqrt(clamp(edge**2, min=1e-6))``: edges below 1 mm
count as 1 mm in the volumes of the GIoU (and a zero-size box stays differentiable)."""

# Corner sign pattern of :func:`box_corners`: the bottom face (z = min) counter-clockwise seen
# from above, then the top face in the same order.
_CORNER_SIGNS = (
    (-1, -1, -1),
    (+1, -1, -1),
    (+1, +1, -1),
    (-1, +1, -1),
    (-1, -1, +1),
    (+1, -1, +1),
    (+1, +1, +1),
    (-1, +1, +1),
)


def _check_boxes(boxes: torch.Tensor, name: str = "boxes") -> None:
    if boxes.shape[-1] == BOX_DIM + 1:
        raise NotImplementedError(f"{name}: rotated boxes (7 columns) are not supported yet")
    if boxes.shape[-1] != BOX_DIM:
        raise ValueError(f"{name} must be (..., {BOX_DIM}) (cx, cy, cz, dx, dy, dz); "
                         f"got {tuple(boxes.shape)}")


def _per_scene(dims: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B, 3)`` scene dims viewed as ``(B, 1, ..., 1, 3)`` to broadcast against ``like``
    ``(B, ..., 3)`` (3DETR's ``[:, None, :]`` for 3-D and ``[:, None, None, :]`` for 4-D)."""
    if dims.ndim != 2 or dims.shape[-1] != like.shape[-1]:
        raise ValueError(f"scene dims must be (B, {like.shape[-1]}); got {tuple(dims.shape)}")
    if like.ndim < 2 or like.shape[0] != dims.shape[0]:
        raise ValueError(f"points {tuple(like.shape)} do not start with the batch of the scene "
                         f"dims {tuple(dims.shape)}")
    return dims.reshape(dims.shape[0], *([1] * (like.ndim - 2)), dims.shape[-1])


# ---------------------------------------------------------------------------------------------
# Normalisation to the scene box (3DETR utils/pc_util.py: shift_scale_points, scale_points)
# ---------------------------------------------------------------------------------------------


def normalize_points(
    xyz: torch.Tensor, dims_min: torch.Tensor, dims_max: torch.Tensor
) -> torch.Tensor:
    """Scene coordinates -> ``[0, 1]`` per axis: ``(xyz - min) / (max - min)``.

    As 3DETR's ``shift_scale_points(xyz, src_range=[min, max])`` (default ``dst_range`` [0, 1]).

    Args:
        xyz: ``(B, ..., 3)`` points.
        dims_min, dims_max: ``(B, 3)`` the scene box.
    Returns:
        ``(B, ..., 3)``.
    """
    lo = _per_scene(dims_min, xyz)
    hi = _per_scene(dims_max, xyz)
    return (xyz - lo) / (hi - lo)


def unnormalize_points(
    xyz_normalized: torch.Tensor, dims_min: torch.Tensor, dims_max: torch.Tensor
) -> torch.Tensor:
    """Inverse of :func:`normalize_points`: ``xyz_normalized * (max - min) + min``.

    As 3DETR's ``shift_scale_points(xyz, src_range=[0, 1], dst_range=[min, max])``.
    Shapes as :func:`normalize_points`.
    """
    lo = _per_scene(dims_min, xyz_normalized)
    hi = _per_scene(dims_max, xyz_normalized)
    return xyz_normalized * (hi - lo) + lo


def normalize_sizes(
    sizes: torch.Tensor, dims_min: torch.Tensor, dims_max: torch.Tensor
) -> torch.Tensor:
    """Box sizes -> fractions of the scene extent, ``sizes * (1 / (max - min))``.

    As the ScanNet dataset of 3DETR: ``scale_points(sizes, mult_factor=1.0 / (max - min))``
    (multiplication by the reciprocal, not a division, and no clamp of the extent).

    Args:
        sizes: ``(B, ..., 3)``; dims ``(B, 3)``. Returns ``(B, ..., 3)``.
    """
    extent = _per_scene(dims_max, sizes) - _per_scene(dims_min, sizes)
    return sizes * (1.0 / extent)


def unnormalize_sizes(
    sizes_normalized: torch.Tensor,
    dims_min: torch.Tensor,
    dims_max: torch.Tensor,
    min_scene_scale: float = 0.1,
) -> torch.Tensor:
    """Normalised sizes -> metric: ``sizes_normalized * clamp(max - min, min=min_scene_scale)``.

    As 3DETR's ``BoxProcessor.compute_predicted_size`` (``scale_points`` with the extent clamped
    at 0.1). Shapes as :func:`normalize_sizes`.
    """
    extent = _per_scene(dims_max, sizes_normalized) - _per_scene(dims_min, sizes_normalized)
    return sizes_normalized * torch.clamp(extent, min=min_scene_scale)


@dataclass(frozen=True)
class BoxCoder:
    """Head outputs <-> boxes, and ground truth -> normalised regression targets.

    Matches 3DETR's ``Model3DETR.get_box_predictions`` / ``BoxProcessor`` (see the module
    docstring) for the axis-aligned case (ScanNet: one angle bin, angle 0).

    Attributes:
        min_scene_scale: floor of the scene extent when decoding sizes (3DETR: 0.1).
        center_offset_space: ``"metric"`` (3DETR: ``center = query_xyz + sigmoid(x) - 0.5``
            in scene units) or ``"normalized"`` (``center_normalized = normalize(query_xyz)
            + sigmoid(x) - 0.5``).
    """

    min_scene_scale: float = 0.1
    center_offset_space: Literal["metric", "normalized"] = "metric"

    def __post_init__(self) -> None:
        if self.center_offset_space not in ("metric", "normalized"):
            raise ValueError(f"center_offset_space must be 'metric' or 'normalized'; "
                             f"got {self.center_offset_space!r}")

    def decode(
        self,
        center_logits: torch.Tensor,
        size_logits: torch.Tensor,
        query_xyz: torch.Tensor,
        dims_min: torch.Tensor,
        dims_max: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Raw head outputs -> boxes (differentiable).

        Args:
            center_logits: ``(B, Q, 3)`` centre head output, before the sigmoid.
            size_logits: ``(B, Q, 3)`` size head output, before the sigmoid.
            query_xyz: ``(B, Q, 3)`` the queries' points, in scene (unnormalised) coordinates.
            dims_min, dims_max: ``(B, 3)`` the scene box.
        Returns:
            ``center_normalized``, ``center_unnormalized``, ``size_normalized``,
            ``size_unnormalized``: each ``(B, Q, 3)``; ``boxes``: ``(B, Q, 6)`` unnormalised
            ``(centre, size)``.
        """
        offset = torch.sigmoid(center_logits) - 0.5
        if self.center_offset_space == "metric":
            center_unnormalized = query_xyz + offset
            center_normalized = normalize_points(center_unnormalized, dims_min, dims_max)
        else:
            center_normalized = normalize_points(query_xyz, dims_min, dims_max) + offset
            center_unnormalized = unnormalize_points(center_normalized, dims_min, dims_max)
        size_normalized = torch.sigmoid(size_logits)
        size_unnormalized = unnormalize_sizes(
            size_normalized, dims_min, dims_max, self.min_scene_scale
        )
        return {
            "center_normalized": center_normalized,
            "center_unnormalized": center_unnormalized,
            "size_normalized": size_normalized,
            "size_unnormalized": size_unnormalized,
            "boxes": torch.cat([center_unnormalized, size_unnormalized], dim=-1),
        }

    def unnormalize(
        self,
        center_normalized: torch.Tensor,
        size_normalized: torch.Tensor,
        dims_min: torch.Tensor,
        dims_max: torch.Tensor,
    ) -> torch.Tensor:
        """Normalised centre/size ``(B, N, 3)`` each -> unnormalised boxes ``(B, N, 6)``
        (sizes use the clamped extent, as predictions do)."""
        center = unnormalize_points(center_normalized, dims_min, dims_max)
        size = unnormalize_sizes(size_normalized, dims_min, dims_max, self.min_scene_scale)
        return torch.cat([center, size], dim=-1)

    def encode_targets(
        self,
        gt_box_centers: torch.Tensor,
        gt_box_sizes: torch.Tensor,
        dims_min: torch.Tensor,
        dims_max: torch.Tensor,
        gt_box_present: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Ground-truth boxes -> normalised targets, as 3DETR's ScanNet dataset.

        Args:
            gt_box_centers, gt_box_sizes: ``(B, M, 3)`` scene units (padded per batch).
            dims_min, dims_max: ``(B, 3)``.
            gt_box_present: optional ``(B, M)`` mask; padded centres are zeroed (3DETR
                multiplies the normalised centres by the mask).
        Returns:
            ``gt_box_centers_normalized``, ``gt_box_sizes_normalized``: ``(B, M, 3)``.
        """
        centers = normalize_points(gt_box_centers, dims_min, dims_max)
        if gt_box_present is not None:
            centers = centers * gt_box_present[..., None].to(centers.dtype)
        sizes = normalize_sizes(gt_box_sizes, dims_min, dims_max)
        return {"gt_box_centers_normalized": centers, "gt_box_sizes_normalized": sizes}


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def box_corners(center: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """The 8 corners of axis-aligned boxes.

    Args:
        center, size: ``(..., 3)``.
    Returns:
        ``(..., 8, 3)``: bottom face (z min) counter-clockwise seen from +z starting at
        (xmin, ymin), then the top face in the same order. (3DETR's ``get_3d_box_batch_tensor``
        builds corners in a camera frame; only their hull matters for axis-aligned boxes.)
    """
    signs = torch.tensor(_CORNER_SIGNS, dtype=center.dtype, device=center.device)
    return center[..., None, :] + 0.5 * size[..., None, :] * signs


def boxes_to_minmax(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 6)`` (centre, size) -> ``(..., 6)`` (xmin, ymin, zmin, xmax, ymax, zmax)."""
    _check_boxes(boxes)
    center, half = boxes[..., :3], 0.5 * boxes[..., 3:]
    return torch.cat([center - half, center + half], dim=-1)


def minmax_to_boxes(minmax: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`boxes_to_minmax`."""
    _check_boxes(minmax, "minmax")
    lo, hi = minmax[..., :3], minmax[..., 3:]
    return torch.cat([0.5 * (lo + hi), hi - lo], dim=-1)


def box_volume(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 6)`` -> ``(...)`` volumes (negative sizes count as 0)."""
    _check_boxes(boxes)
    return boxes[..., 3:].clamp(min=0).prod(dim=-1)


def _pairwise_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(..., N, 6)`` x ``(..., M, 6)`` (centre, size) -> ``(..., N, M)`` intersection volumes,
    and the enclosing (hull) volumes."""
    a_lo = a[..., :3] - 0.5 * a[..., 3:]
    a_hi = a[..., :3] + 0.5 * a[..., 3:]
    b_lo = b[..., :3] - 0.5 * b[..., 3:]
    b_hi = b[..., :3] + 0.5 * b[..., 3:]
    lo = torch.maximum(a_lo[..., :, None, :], b_lo[..., None, :, :])
    hi = torch.minimum(a_hi[..., :, None, :], b_hi[..., None, :, :])
    inter = (hi - lo).clamp(min=0).prod(dim=-1)
    hull_lo = torch.minimum(a_lo[..., :, None, :], b_lo[..., None, :, :])
    hull_hi = torch.maximum(a_hi[..., :, None, :], b_hi[..., None, :, :])
    enclosing = (hull_hi - hull_lo).abs().prod(dim=-1)
    return inter, enclosing


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise axis-aligned 3D IoU.

    Args:
        a: ``(..., N, 6)``, b: ``(..., M, 6)`` boxes as (centre, size); leading dims broadcast
            (typically ``(B, N, 6)`` x ``(B, M, 6)``).
    Returns:
        ``(..., N, M)`` ``intersection / union``, 0 where the union is empty (two zero-size
        boxes), never NaN. Equal to 3DETR's evaluation IoU (``box3d_iou`` on corners) for
        axis-aligned boxes.
    """
    _check_boxes(a, "a")
    _check_boxes(b, "b")
    inter, _ = _pairwise_intersection(a, b)
    union = box_volume(a)[..., :, None] + box_volume(b)[..., None, :] - inter
    return inter / union.clamp(min=GIOU_EPS)


def generalized_box_iou(
    a: torch.Tensor, b: torch.Tensor, b_present: torch.Tensor | None = None
) -> torch.Tensor:
    """Pairwise generalized IoU of axis-aligned boxes, differentiable.

    As 3DETR's ``generalized_box3d_iou_tensor(..., rotated_boxes=False)``:
    ``giou = inter / union - (enclosing - union) / enclosing`` where ``enclosing`` is the
    volume of the axis-aligned hull of the pair, with 3DETR's guards: edges shorter than
    ``SIDE_EPS`` count as ``SIDE_EPS`` in the two box volumes, volumes and the union are floored
    at ``GIOU_EPS``, and pairs with ``enclosing <= 2 * GIOU_EPS`` or
    ``vol_a + vol_b <= 4 * GIOU_EPS`` (malformed, e.g. two zero-size boxes) get GIoU 0. Unlike
    3DETR (whose ``union / enclosing`` is inf/NaN for a zero enclosing volume before the mask)
    this never produces NaN, in the value or the gradient.

    Args:
        a: ``(..., N, 6)``, b: ``(..., M, 6)`` boxes as (centre, size).
        b_present: optional ``(..., M)`` mask; GIoU is 0 in the columns of absent (padded)
            boxes, as 3DETR's ``nums_k2``.
    Returns:
        ``(..., N, M)`` in ``[-1, 1]``.
    """
    _check_boxes(a, "a")
    _check_boxes(b, "b")
    inter, enclosing = _pairwise_intersection(a, b)
    vol_a = a[..., 3:].abs().clamp(min=SIDE_EPS).prod(dim=-1).clamp(min=GIOU_EPS)
    vol_b = b[..., 3:].abs().clamp(min=SIDE_EPS).prod(dim=-1).clamp(min=GIOU_EPS)
    sum_vols = vol_a[..., :, None] + vol_b[..., None, :]
    good = (enclosing > 2 * GIOU_EPS) & (sum_vols > 4 * GIOU_EPS)
    union = (sum_vols - inter).clamp(min=GIOU_EPS)
    giou = inter / union - (1 - union / enclosing.clamp(min=GIOU_EPS))
    giou = torch.where(good, giou, torch.zeros_like(giou))
    if b_present is not None:
        giou = giou * b_present[..., None, :].to(giou.dtype)
    return giou
