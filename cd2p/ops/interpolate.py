"""Three-nearest-neighbour inverse-distance interpolation (PointNet++ feature propagation)."""

from __future__ import annotations

import torch

from cd2p.ops._checks import check_points, check_same_batch
from cd2p.ops.grouping import index_points
from cd2p.ops.neighbors import knn, square_distance


def three_nn_interpolate(
    queries: torch.Tensor,
    known: torch.Tensor,
    features: torch.Tensor,
    eps: float = 1e-8,
    validate: bool = True,
) -> torch.Tensor:
    """Interpolate ``features`` given at ``known`` points onto ``queries``.

    Args:
        queries: ``(B, N, 3)`` where features are wanted.
        known: ``(B, M, 3)`` where features are given.
        features: ``(B, M, C)``.

    Returns:
        ``(B, N, C)``: for each query, the inverse-squared-distance weighted mean of the
        features of its three nearest known points (fewer if ``M < 3``). ``validate`` also
        checks that the coordinates are finite (a device sync; models pass ``False``).
    """
    check_points("queries", queries, finite=validate)
    check_points("known", known, finite=validate)
    check_same_batch("queries", queries, "known", known)
    if features.dim() != 3 or features.shape[:2] != known.shape[:2]:
        raise ValueError(
            f"features must have shape (B, M, C) = {tuple(known.shape[:2])} + (C,), "
            f"got {tuple(features.shape)}"
        )
    k = min(3, known.shape[1])
    idx = knn(queries, known, k, validate=False)  # (B, N, k)
    nearest = index_points(known, idx)  # (B, N, k, 3)
    dist = (nearest - queries.unsqueeze(2)).square().sum(-1)
    weight = 1.0 / (dist + eps)
    weight = weight / weight.sum(-1, keepdim=True)
    return (index_points(features, idx) * weight.unsqueeze(-1).to(features.dtype)).sum(2)


__all__ = ["three_nn_interpolate", "square_distance"]
