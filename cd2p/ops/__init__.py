"""Geometry kernels on batched point clouds ``(B, N, 3)``: pure torch, optionally torch-cluster."""

from cd2p.ops.backend import cluster_available, resolve_backend
from cd2p.ops.chamfer import chamfer_distance
from cd2p.ops.grouping import Groups, group_points, index_points
from cd2p.ops.interpolate import three_nn_interpolate
from cd2p.ops.neighbors import knn, square_distance
from cd2p.ops.sampling import farthest_point_sample

__all__ = [
    "Groups",
    "chamfer_distance",
    "cluster_available",
    "farthest_point_sample",
    "group_points",
    "index_points",
    "knn",
    "resolve_backend",
    "square_distance",
    "three_nn_interpolate",
]
