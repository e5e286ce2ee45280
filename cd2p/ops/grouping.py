"""Gathering and grouping points into local neighbourhoods (the point tokenizer's geometry)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from cd2p.ops._checks import check_points
from cd2p.ops.neighbors import knn
from cd2p.ops.sampling import farthest_point_sample


def index_points(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather rows of ``values (B, N, C)`` with ``idx (B, *S)`` -> ``(B, *S, C)``."""
    if values.dim() != 3:
        raise ValueError(f"values must have shape (B, N, C), got {tuple(values.shape)}")
    if idx.shape[0] != values.shape[0]:
        raise ValueError(
            f"idx batch size {idx.shape[0]} does not match values batch size {values.shape[0]}"
        )
    batch, _, channels = values.shape
    flat = idx.reshape(batch, -1)
    out = torch.gather(values, 1, flat.unsqueeze(-1).expand(-1, -1, channels))
    return out.view(*idx.shape, channels)


class Groups(NamedTuple):
    """Result of :func:`group_points`.

    neighborhoods: ``(B, G, K, 3)`` neighbour coordinates relative to their center.
    centers: ``(B, G, 3)`` center coordinates.
    center_idx: ``(B, G)`` indices of the centers in the input cloud.
    neighbor_idx: ``(B, G, K)`` indices of the neighbours in the input cloud.
    """

    neighborhoods: torch.Tensor
    centers: torch.Tensor
    center_idx: torch.Tensor
    neighbor_idx: torch.Tensor


def group_points(
    points: torch.Tensor,
    num_groups: int,
    group_size: int,
    random_start: bool = False,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> Groups:
    """Split ``points (B, N, 3)`` into ``num_groups`` patches of ``group_size`` neighbours.

    Centers come from farthest point sampling; each patch is the ``group_size`` nearest
    points of its center, expressed relative to the center (Point-BERT / Point-MAE tokenizer).
    ``validate`` also checks that the coordinates are finite (a device sync; models pass
    ``False``).
    """
    check_points("points", points, finite=validate)
    center_idx = farthest_point_sample(points, num_groups, random_start, generator,
                                       validate=False)  # fmt: skip
    centers = index_points(points, center_idx)
    neighbor_idx = knn(centers, points, group_size, validate=False)
    neighborhoods = index_points(points, neighbor_idx) - centers.unsqueeze(2)
    return Groups(neighborhoods, centers, center_idx, neighbor_idx)
