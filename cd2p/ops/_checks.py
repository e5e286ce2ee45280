"""Input validation shared by the geometry kernels: clear errors instead of silent garbage."""

from __future__ import annotations

import torch


def check_points(
    name: str, x: torch.Tensor, channels: int | None = 3, finite: bool = True
) -> None:
    """Raise ``ValueError`` unless ``x`` is a finite ``(B, N, C)`` floating tensor.

    ``finite=False`` skips the finiteness test, which synchronises a CUDA stream.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, N, {channels or 'C'}), got {tuple(x.shape)}")
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(
            f"{name} must have {channels} coordinates in the last dimension, got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if finite and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=-1).sum())
        raise ValueError(f"{name} contains {bad} point(s) with non-finite (NaN/inf) coordinates")


def check_same_batch(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{a_name} and {b_name} have different batch sizes: {a.shape[0]} vs {b.shape[0]}"
        )
    if a.device != b.device:
        raise ValueError(f"{a_name} is on {a.device} but {b_name} is on {b.device}")
