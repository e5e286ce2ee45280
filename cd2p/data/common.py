"""Helpers shared by the dataset preparers: progress bars, staged output directories, the
unit-sphere normalisation, FPS ordering, plain-text readers, and the ``meta.json`` of the
prepared caches."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cd2p._atomic import atomic_directory
from cd2p.ops import farthest_point_sample

META_FILE = "meta.json"
# Written by the synthetic generators next to the files: the cache's source becomes
# "synthetic-<format>", so that no card or report calls synthetic shapes ModelNet40.
SYNTHETIC_MARKER = "cd2p_synthetic.json"


def dataset_source(root: str | Path, name: str) -> str:
    """``name``, or ``synthetic-<name>`` for a folder written by a cd2p synthetic generator."""
    return f"synthetic-{name}" if (Path(root) / SYNTHETIC_MARKER).is_file() else name


def progress_bar(enabled: bool = True) -> Progress:
    """The rich progress bar every preparation step shows."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


@contextmanager
def staged_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it to ``out`` when complete.

    Yields the temporary directory. If the block raises, nothing appears at ``out``; an
    existing ``out`` is only replaced (with ``overwrite``) once the new one is complete.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} already exists and is not empty; pass --overwrite to replace it"
        )
    with atomic_directory(out) as tmp:
        yield tmp


def normalize_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Centre ``(N, 3)`` points at their centroid and scale the farthest to radius 1."""
    centred = points - points.mean(0, keepdims=True)
    radius = float(np.sqrt((centred**2).sum(1)).max())
    return (centred / radius if radius > 0 else centred).astype(np.float32)


def fps_order(
    clouds: Sequence[np.ndarray],
    num_points: int,
    device: str = "cpu",
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Farthest-point-sample every ``(N_i, 3)`` cloud to ``min(num_points, N_i)`` points, in FPS
    order. Clouds of equal size are batched together, ``batch_size`` at a time."""
    out: list[np.ndarray | None] = [None] * len(clouds)
    by_size: dict[int, list[int]] = {}
    for i, cloud in enumerate(clouds):
        by_size.setdefault(len(cloud), []).append(i)
    for size, members in by_size.items():
        k = min(num_points, size)
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            pts = torch.from_numpy(np.stack([clouds[i] for i in chunk])).float().to(device)
            idx = farthest_point_sample(pts, k)
            picked = torch.gather(pts, 1, idx.unsqueeze(-1).expand(-1, -1, 3)).cpu().numpy()
            for j, i in enumerate(chunk):
                out[i] = picked[j]
            if on_batch is not None:
                on_batch(len(chunk))
    return out  # type: ignore[return-value]


def read_shape_txt(path: str | Path, columns: int = 6) -> np.ndarray:
    """One shape file: ``columns`` comma- or space-separated numbers a line -> ``(N, columns)``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: shape file not found") from None
    try:
        values = np.array(text.replace(",", " ").split(), dtype=np.float32)
    except ValueError as exc:
        raise ValueError(f"{path}: not a table of numbers ({exc})") from None
    if values.size == 0 or values.size % columns:
        raise ValueError(
            f"{path}: expected {columns} numbers a line, got {values.size} numbers in all"
        )
    return values.reshape(-1, columns)


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty stripped lines of a list file, with an error naming the file if it is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_cache_meta(path: str | Path, expected_format: str) -> dict:
    """``meta.json`` of a prepared cache, checked to be of ``expected_format``."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found: {path} is not a prepared dataset (run `cd2p prepare ...`)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path} is not valid JSON: {exc}") from None
    if meta.get("format") != expected_format:
        raise ValueError(
            f"{meta_path}: format {meta.get('format')!r}, expected {expected_format!r}"
        )
    return meta


__all__ = [
    "META_FILE",
    "SYNTHETIC_MARKER",
    "dataset_source",
    "fps_order",
    "normalize_unit_sphere",
    "progress_bar",
    "read_cache_meta",
    "read_lines",
    "read_shape_txt",
    "staged_directory",
]
