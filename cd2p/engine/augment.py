"""Point-cloud batch augmentations, each driven by an explicit ``torch.Generator``.

The trainer derives the generator from ``(seed, step, rank)`` (:func:`step_generator`), so
the augmentation of every step is a pure function of those numbers: a resumed run draws
exactly what an uninterrupted one would, with no generator state to save. The generator lives
on the training device and every draw is made there, from the generator's device: a step
copies no random numbers from the host and never waits for it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cd2p.config import Recipe


def step_generator(
    seed: int,
    step: int,
    rank: int = 0,
    stream: str = "augment",
    device: torch.device | str = "cpu",
) -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, step, rank, stream)`` (independent
    streams)."""
    digest = hashlib.sha256(f"{stream}:{seed}:{step}:{rank}".encode()).digest()
    generator = torch.Generator(device=device)
    return generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


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
    batch, device = points.shape[0], generator.device
    scale = torch.empty(batch, 1, 3, device=device).uniform_(
        scale_low, scale_high, generator=generator
    )
    shift = torch.empty(batch, 1, 3, device=device).uniform_(
        -translate, translate, generator=generator
    )
    return points * scale.to(points.device, points.dtype) + shift.to(points.device, points.dtype)


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
    order = torch.rand(batch, available, generator=generator, device=generator.device)
    order = order.argsort(dim=1)[:, :num_points].to(points.device)
    return torch.gather(points, 1, order.unsqueeze(-1).expand(-1, -1, points.shape[-1]))


def subsample_views(
    batch: dict[str, Any], num_points: int, generator: torch.Generator, keys: tuple[str, ...]
) -> dict[str, Any]:
    """Keep the same random ``num_points`` of every cloud in each of ``keys`` (``(B, P, ...)``)."""
    b, available = batch[keys[0]].shape[:2]
    if num_points > available:
        raise ValueError(f"cannot draw {num_points} points from pools of {available}")
    order = torch.rand(b, available, generator=generator, device=generator.device)
    order = order.argsort(dim=1)[:, :num_points].to(batch[keys[0]].device)
    for key in keys:
        value = batch[key]
        index = order.view(b, num_points, *([1] * (value.dim() - 2))).expand(
            -1, -1, *value.shape[2:]
        )
        batch[key] = torch.gather(value, 1, index)
    return batch


class PrepareViews:
    """The per-step, on-device augmentation of the object benchmarks: draw ``data.num_points``
    of each pool at random, then Point-MAE's scale-and-translate, all from the step's
    generator (``StepContext.generator``)."""

    def __init__(self, recipe: Recipe, keys: tuple[str, ...]) -> None:
        self.data = recipe.data
        self.keys = keys

    def __call__(self, batch: dict[str, Any], ctx: Any) -> dict[str, Any]:
        batch = subsample_views(batch, self.data.num_points, ctx.generator, self.keys)
        batch["points"] = scale_and_translate(
            batch["points"],
            ctx.generator,
            self.data.scale_low,
            self.data.scale_high,
            self.data.translate,
        )
        return batch
