"""Farthest point sampling as one fused Triton kernel (the CUDA path of ``farthest_point_sample``).

The pure-torch FPS is a Python loop of about seven kernels per picked center: 457 launches to
pick 64 of 4096 points and 14 345 for 2048 of 40 000 (the detection setting), and compiling the
loop unrolls it. Here one program per cloud runs the whole loop on the GPU: coordinates are read
as three contiguous rows of the ``(B, 3, N)`` layout (coalesced), the running distance to the
picked set lives in a ``(B, N)`` buffer, and the arg-max of each block is reduced in registers.

The kernel reproduces the torch reference (:func:`cd2p.ops.sampling._fps_torch`) index for
index: distances are ``(dx*dx + dy*dy) + dz*dz`` in float32 without fused multiply-adds (the
kernel is launched with ``enable_fp_fusion=False``), the running minimum is updated the same way,
and ties go to the smallest index, as ``torch.argmax`` does. It is registered as the custom op
``cd2p::fps`` so that ``torch.compile`` sees one opaque operation instead of a loop.

Run on the CPU with Triton's interpreter (``TRITON_INTERPRET=1`` set before ``import triton``),
which is how the tests compare it with the reference without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

BLOCK = 1024


def triton_available() -> bool:
    """Whether Triton can be imported (it ships with the CUDA builds of PyTorch)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def fps_kernel(xyz_ptr, dist_ptr, out_ptr, start_ptr, n, m, BLOCK_N: tl.constexpr):
        # One program per cloud: xyz is (B, 3, N) float32, dist (B, N) float32 = +inf,
        # out (B, M) int32, start (B,) int32.
        b = tl.program_id(0)
        xyz = xyz_ptr + b * 3 * n
        dist = dist_ptr + b * n
        current = tl.load(start_ptr + b)
        for i in range(m):
            tl.store(out_ptr + b * m + i, current)
            cx = tl.load(xyz + current)
            cy = tl.load(xyz + n + current)
            cz = tl.load(xyz + 2 * n + current)
            best_value = -1.0
            best_index = current * 0
            for start in range(0, n, BLOCK_N):
                offsets = start + tl.arange(0, BLOCK_N)
                inside = offsets < n
                dx = tl.load(xyz + offsets, mask=inside, other=0.0) - cx
                dy = tl.load(xyz + n + offsets, mask=inside, other=0.0) - cy
                dz = tl.load(xyz + 2 * n + offsets, mask=inside, other=0.0) - cz
                squared = dx * dx + dy * dy + dz * dz
                nearest = tl.load(dist + offsets, mask=inside, other=-1.0)
                nearest = tl.where(inside, tl.minimum(nearest, squared), -1.0)
                tl.store(dist + offsets, nearest, mask=inside)
                block_max = tl.max(nearest, axis=0)
                # the first index holding the block's maximum (torch.argmax's tie rule)
                block_index = tl.min(tl.where(nearest == block_max, offsets, n), axis=0)
                better = block_max > best_value  # strict: an earlier block wins a tie
                best_index = tl.where(better, block_index, best_index)
                best_value = tl.where(better, block_max, best_value)
            current = best_index

    return fps_kernel


def fps_triton(points: torch.Tensor, num_samples: int, start: torch.Tensor) -> torch.Tensor:
    """Indices ``(B, M)`` int64 of farthest point sampling of ``points (B, N, 3)`` from the
    start indices ``start (B,)``, by the fused kernel (inputs on the GPU, or on the CPU under
    ``TRITON_INTERPRET=1``)."""
    batch, n, _ = points.shape
    if n >= 2**31:
        raise ValueError(f"the fused FPS indexes points with int32; {n} points are too many")
    xyz = points.detach().float().transpose(1, 2).contiguous()
    dist = torch.full((batch, n), float("inf"), device=points.device)
    out = torch.empty(batch, num_samples, dtype=torch.int32, device=points.device)
    starts = start.to(device=points.device, dtype=torch.int32).contiguous()
    kwargs = {} if interpreting() else {"enable_fp_fusion": False}
    _kernel()[(batch,)](xyz, dist, out, starts, n, num_samples, BLOCK_N=BLOCK, **kwargs)
    return out.long()


# -- the custom op ----------------------------------------------------------------------------


@torch.library.custom_op("cd2p::fps", mutates_args=())
def fps_op(points: torch.Tensor, num_samples: int, start: torch.Tensor) -> torch.Tensor:
    """``torch.ops.cd2p.fps``: the fused FPS as one operation for ``torch.compile``."""
    return fps_triton(points, num_samples, start)


@fps_op.register_fake
def _(points: torch.Tensor, num_samples: int, start: torch.Tensor) -> torch.Tensor:
    return points.new_empty((points.shape[0], num_samples), dtype=torch.long)


# -- trust, once ------------------------------------------------------------------------------


@functools.cache
def fused_fps_usable(device_index: int) -> bool:
    """Whether the fused kernel runs on this GPU and reproduces the torch reference; checked
    once per device on a small cloud with duplicated points. A failure (no Triton, a compiler
    error, different indices) is reported once and the pure-torch FPS is used instead."""
    if not triton_available():
        return False
    from cd2p.ops.sampling import _fps_torch

    device = torch.device("cuda", device_index)
    g = torch.Generator(device="cpu").manual_seed(0)
    cloud = torch.rand(2, 3000, 3, generator=g)
    cloud[:, 1000:1100] = cloud[:, :100]  # duplicates: ties must resolve as torch's
    cloud = cloud.to(device)
    start = torch.tensor([0, 17], device=device)
    try:
        fused = fps_triton(cloud, 256, start)
        reference = _fps_torch(cloud, 256, start)
        same = bool(torch.equal(fused, reference))
    except Exception as exc:  # noqa: BLE001  (any failure means: do not use it)
        warnings.warn(f"the fused Triton FPS failed on {device} ({exc}); using torch's FPS",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
        return False
    if not same:
        warnings.warn(f"the fused Triton FPS differs from torch's on {device}; using torch's FPS",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
    return same


__all__ = ["fps_op", "fps_triton", "fused_fps_usable", "interpreting", "triton_available"]
