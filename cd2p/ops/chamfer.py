"""Chamfer-L2 distance, the Point-MAE reconstruction loss."""

from __future__ import annotations

import torch

from cd2p.ops._checks import check_points, check_same_batch
from cd2p.ops.neighbors import square_distance


def chamfer_distance(a: torch.Tensor, b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Chamfer-L2 between ``a (B, N, 3)`` and ``b (B, M, 3)``.

    For every point the squared distance to its nearest point in the other set; the mean
    over ``a`` plus the mean over ``b`` (Point-MAE's ``ChamferDistanceL2``). Differentiable.

    Returns:
        a scalar (``reduction="mean"``, averaged over the batch) or ``(B,)`` (``"none"``).
    """
    # Loss inputs are model outputs, checked every step: skip the finiteness test, which
    # would stall the GPU on each call.
    check_points("a", a, finite=False)
    check_points("b", b, finite=False)
    check_same_batch("a", a, "b", b)
    dist = square_distance(a, b)  # (B, N, M)
    per_cloud = dist.min(dim=2).values.mean(dim=1) + dist.min(dim=1).values.mean(dim=1)
    if reduction == "none":
        return per_cloud
    if reduction == "mean":
        return per_cloud.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
