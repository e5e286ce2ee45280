"""Helpers shared by the dataset preparers: progress bars, staged output directories, the
unit-sphere normalisation, FPS ordering, plain-text readers, the ``meta.json`` of the
prepared caches, and the finiteness check every preparer applies (:func:`find_non_finite`,
:func:`require_finite`): where an array is produced, a non-finite value makes the frame or
shape skipped (and reported), and before anything is written it is refused outright."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cd2p._atomic import atomic_directory

META_FILE = "meta.json"
# Written by the synthetic generators next to the files: the cache's source becomes
# "synthetic-<format>", so that no card or report calls synthetic shapes ModelNet40.
SYNTHETIC_MARKER = "cd2p_synthetic.json"


class NonFiniteError(ValueError):
    """An array holds NaN or infinity; the message names where it came from (file, frame,
    shape). A ``ValueError``, so that the CLI prints it as a user error."""


def find_non_finite(array: Any) -> str | None:
    """``None`` when every value of ``array`` (numpy or a CPU torch tensor) is finite, else
    what is wrong, e.g. ``"3 of 12288 values are not finite (nan, +inf)"``.

    The one finiteness test of the preparers: they call it where arrays are produced (a
    frame's points, a shape's coordinates) to skip and report the item, and
    :func:`require_finite` calls it as the last guard before a file is written.
    """
    values = np.asarray(array)
    if values.dtype.kind not in "fc":  # integers and booleans are always finite
        return None
    finite = np.isfinite(values)
    if finite.all():
        return None
    bad = values[~finite]
    kinds = [name for name, hit in (("nan", np.isnan(bad).any()),
                                    ("+inf", np.isposinf(bad).any()),
                                    ("-inf", np.isneginf(bad).any())) if hit]
    return f"{bad.size} of {values.size} values are not finite ({', '.join(kinds)})"


def require_finite(array: Any, where: str) -> Any:
    """``array`` unchanged when all finite, else :class:`NonFiniteError` naming ``where``.

    The final guard before anything is written: the checks where arrays are produced should
    have skipped the item already, so reaching it means a bug or a case they do not cover;
    either way nothing non-finite reaches a prepared file.
    """
    problem = find_non_finite(array)
    if problem is not None:
        raise NonFiniteError(f"{where}: {problem}; refusing to write non-finite values")
    return array


class EmptySplitError(ValueError):
    """A split (or a whole root) with nothing in it: a preparer would write, or a loader hand
    to training, an empty dataset. The message names the file or split."""


def require_items(count: int, where: str, what: str) -> int:
    """``count`` when at least 1, else :class:`EmptySplitError` ``"<where>: no <what>"``.

    Used by every preparer before it writes a split and by the loaders of prepared splits, so
    that an empty split is one clear error instead of an empty success or a crash later.
    """
    if count < 1:
        raise EmptySplitError(f"{where}: no {what}")
    return count


def skipped_shape(split: str, shape_id: str, file: str | Path, error: Exception
                  ) -> dict[str, str]:
    """The record of a shape a preparer left out (``meta.json``'s ``skipped``): ``split``,
    ``id``, ``file`` and ``reason`` (the error without the file name it starts with)."""
    reason = str(error)
    return {"split": split, "id": shape_id, "file": str(file),
            "reason": reason.removeprefix(f"{file}: ")}


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
    """Centre ``(N, 3)`` points at their centroid and scale the farthest to radius 1.

    The centroid and the radius are computed in float64: coordinates that are finite but
    huge (a damaged file's 3e38) overflow float32 sums and squares into inf and NaN, while in
    float64 they normalise to finite values.
    """
    centred = np.asarray(points, dtype=np.float64)
    centred = centred - centred.mean(0, keepdims=True)
    radius = float(np.sqrt((centred**2).sum(1)).max()) if len(centred) else 0.0
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
    # Imported here: the ScanNet preparers' worker processes use this module's finiteness
    # check and need not pay for importing torch.
    import torch

    from cd2p.ops import farthest_point_sample

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
    # numpy parses "nan" and "inf" as numbers: refuse them here, where the array is made, so
    # that the preparers can skip the shape and report the file.
    problem = find_non_finite(values)
    if problem is not None:
        raise NonFiniteError(f"{path}: {problem}")
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
    "EmptySplitError",
    "NonFiniteError",
    "dataset_source",
    "find_non_finite",
    "fps_order",
    "normalize_unit_sphere",
    "progress_bar",
    "read_cache_meta",
    "read_lines",
    "read_shape_txt",
    "require_finite",
    "require_items",
    "skipped_shape",
    "staged_directory",
]
