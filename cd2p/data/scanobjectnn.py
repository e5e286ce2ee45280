"""ScanObjectNN (real-scan object classification, 15 classes) from its released h5 files.

The files users have (``h5_files`` of the release)::

    ROOT/main_split/training_objectdataset.h5                        OBJ-BG  train (2309)
    ROOT/main_split/test_objectdataset.h5                            OBJ-BG  test  (581)
    ROOT/main_split_nobg/training_objectdataset.h5                   OBJ-ONLY train
    ROOT/main_split_nobg/test_objectdataset.h5                       OBJ-ONLY test
    ROOT/main_split/training_objectdataset_augmentedrot_scale75.h5   PB-T50-RS train (11416)
    ROOT/main_split/test_objectdataset_augmentedrot_scale75.h5       PB-T50-RS test  (2882)

Each h5 holds ``data`` ``(S, 2048, 3)`` float32, ``label`` ``(S,)`` integer class ids and
``mask`` ``(S, 2048)`` (object/background per point, unused for classification). The clouds
are already centred and scaled, so unlike ModelNet40 they are not re-normalised (as in
Point-MAE). ``cd2p prepare scanobjectnn ROOT OUT`` writes one classification cache (the format
of :mod:`cd2p.data.classification`) per variant, ``OUT/objbg``, ``OUT/objonly``, ``OUT/hardest``,
each cloud re-ordered by farthest point sampling. A cloud holding NaN or infinity is skipped
(its id keeps its index in the h5 file) and listed under ``skipped`` in ``meta.json``; an h5
file with no (usable) cloud is an error naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cd2p._atomic import atomic_output
from cd2p.data.classification import save_classification_cache
from cd2p.data.common import (
    find_non_finite,
    fps_order,
    progress_bar,
    require_items,
    staged_directory,
)

SCANOBJECTNN_CLASSES = (
    "bag",
    "bin",
    "box",
    "cabinet",
    "chair",
    "desk",
    "display",
    "door",
    "shelf",
    "table",
    "bed",
    "pillow",
    "sink",
    "sofa",
    "toilet",
)

# variant -> (folder, file stem suffix)
VARIANTS = {
    "objbg": ("main_split", ""),
    "objonly": ("main_split_nobg", ""),
    "hardest": ("main_split", "_augmentedrot_scale75"),
}
SPLIT_STEMS = {"train": "training_objectdataset", "test": "test_objectdataset"}


def variant_file(root: str | Path, variant: str, split: str) -> Path:
    """Path of the h5 file of a ScanObjectNN ``variant`` (objbg, objonly, hardest) and split."""
    if variant not in VARIANTS:
        raise ValueError(
            f"ScanObjectNN variant must be one of {', '.join(VARIANTS)}, got {variant!r}"
        )
    if split not in SPLIT_STEMS:
        raise ValueError(f"ScanObjectNN split must be train or test, got {split!r}")
    folder, suffix = VARIANTS[variant]
    return Path(root) / folder / f"{SPLIT_STEMS[split]}{suffix}.h5"


def read_scanobjectnn_h5(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(points (S, P, 3) float32, labels (S,) int64)`` of one ScanObjectNN h5 file."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is ROOT the h5_files folder of ScanObjectNN?")
    try:
        with h5py.File(path, "r") as f:
            missing = [key for key in ("data", "label") if key not in f]
            if missing:
                raise ValueError(f"{path}: missing dataset(s) {', '.join(missing)}")
            points = np.asarray(f["data"][:], dtype=np.float32)
            labels = np.asarray(f["label"][:]).reshape(-1).astype(np.int64)
    except OSError as exc:
        raise ValueError(f"{path}: not a readable h5 file ({exc})") from None
    if points.ndim != 3 or points.shape[2] < 3:
        raise ValueError(f"{path}: data must be (S, P, 3), got {points.shape}")
    if len(labels) != len(points):
        raise ValueError(f"{path}: {len(points)} clouds but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(SCANOBJECTNN_CLASSES)):
        raise ValueError(f"{path}: labels outside [0, {len(SCANOBJECTNN_CLASSES)})")
    return points[:, :, :3], labels


def write_scanobjectnn_h5(
    path: str | Path, points: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None
) -> Path:
    """Write ``points (S, P, 3)``, ``labels (S,)`` and ``mask (S, P)`` in the release's layout."""
    import h5py

    path = Path(path)
    points = np.asarray(points, dtype=np.float32)
    if mask is None:
        mask = np.zeros(points.shape[:2], dtype=np.int64)
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("data", data=points)
        # The release stores labels as a column of integers and the mask per point.
        f.create_dataset("label", data=np.asarray(labels, dtype=np.int64))
        f.create_dataset("mask", data=np.asarray(mask, dtype=np.int64))
    return path


def available_variants(root: str | Path) -> list[str]:
    """The variants whose train and test files are both present under ``root``."""
    return [
        v for v in VARIANTS if all(variant_file(root, v, split).is_file() for split in SPLIT_STEMS)
    ]


def prepare_scanobjectnn(
    root: str | Path,
    out: str | Path,
    variants: Sequence[str] | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    show_progress: bool = True,
) -> list[Path]:
    """Write one classification cache per variant under ``out/<variant>``; returns them.

    ``variants`` defaults to every variant whose files exist in ``root``.
    """
    out = Path(out)
    variants = list(variants) if variants else available_variants(root)
    if not variants:
        raise FileNotFoundError(
            f"no ScanObjectNN h5 files under {root} (expected e.g. "
            f"{variant_file(root, 'objbg', 'train')})"
        )
    written = []
    for variant in variants:
        data = {
            split: read_scanobjectnn_h5(variant_file(root, variant, split)) for split in SPLIT_STEMS
        }
        skipped: list[dict[str, str]] = []
        with staged_directory(out / variant, overwrite) as tmp, progress_bar(show_progress) as bar:
            splits = {}
            for split, (points, labels) in data.items():
                file = variant_file(root, variant, split)
                # Ids keep the cloud's index in the h5 file, also when clouds before it are
                # skipped, so that an id always names the same cloud of the release.
                ids, keep = [], []
                for i, cloud in enumerate(points):
                    shape_id = f"{variant}_{split}_{i:05d}"
                    problem = find_non_finite(cloud)
                    if problem is None:
                        ids.append(shape_id)
                        keep.append(i)
                    else:
                        skipped.append({"split": split, "id": shape_id, "file": str(file),
                                        "reason": f"cloud {i}: {problem}"})
                what = f"usable clouds (all {len(points)} skipped)" if len(points) else "clouds"
                require_items(len(keep), f"{file} (ScanObjectNN {variant} {split})", what)
                task = bar.add_task(f"{variant} fps {split}", total=len(keep))
                ordered = fps_order(
                    [points[i] for i in keep],
                    points.shape[1],
                    device,
                    on_batch=lambda n, t=task: bar.advance(t, n),
                )
                splits[split] = (ids, np.stack(ordered), labels[keep])
            save_classification_cache(
                tmp, f"scanobjectnn-{variant}", SCANOBJECTNN_CLASSES, splits, {"variant": variant},
                skipped=skipped,
            )
        written.append(out / variant)
    return written


__all__ = [
    "SCANOBJECTNN_CLASSES",
    "VARIANTS",
    "available_variants",
    "prepare_scanobjectnn",
    "read_scanobjectnn_h5",
    "variant_file",
    "write_scanobjectnn_h5",
]
