"""Point-cloud batch augmentations, each driven by an explicit ``torch.Generator``.

The trainer derives the generator from ``(seed, step, rank)`` (:func:`step_generator`), so
the augmentation of every step is a pure function of those numbers: a resumed run draws
exactly what an uninterrupted one would, with no generator state to save.
"""

from __future__ import annotations

import hashlib

import torch


def step_generator(seed: int, step: int, rank: int = 0, stream: str = "augment") -> torch.Generator:
    """A CPU generator seeded from ``(seed, step, rank, stream)`` (independent streams)."""
    digest = hashlib.sha256(f"{stream}:{seed}:{step}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def scale_and_translate(
    points: torch.Tensor,
    generator: torch.Generator,
    scale_low: float = 2.0 / 3.0,
    scale_high: float = 1.5,
    translate: float = 0.2,
) -> torch.Tensor:
    """Point-MAE's ``PointcloudScaleAndTranslate`` on a batch.

    Every cloud of ``points (B, N, 3)`` is scaled per axis by a factor drawn uniformly in
    ``[scale_low, scale_high]`` and shifted per axis by ``[-translate, translate]``.
    Returns a new ``(B, N, 3)`` tensor on ``points``' device.
    """
    batch = points.shape[0]
    scale = torch.empty(batch, 1, 3).uniform_(scale_low, scale_high, generator=generator)
    shift = torch.empty(batch, 1, 3).uniform_(-translate, translate, generator=generator)
    scale = scale.to(points.device, points.dtype)
    shift = shift.to(points.device, points.dtype)
    return points * scale + shift


def random_subsample(
    points: torch.Tensor, num_points: int, generator: torch.Generator
) -> torch.Tensor:
    """Keep ``num_points`` points of every cloud of ``points (B, P, 3)``, chosen at random
    without replacement -> ``(B, num_points, 3)``; no-op when ``P == num_points``."""
    batch, available = points.shape[:2]
    if num_points > available:
        raise ValueError(
            f"cannot sample {num_points} points from clouds of {available}: prepare the pairs "
            f"with more points or lower data.num_points"
        )
    if num_points == available:
        return points
    order = torch.rand(batch, available, generator=generator).argsort(dim=1)[:, :num_points]
    order = order.to(points.device)
    return torch.gather(points, 1, order.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
