"""ModelNet40 (``modelnet40_normal_resampled``), prepared into the classification cache of
:mod:`cd2p.data.classification`.

The files users have (PointNet++'s resampled release)::

    ROOT/modelnet40_shape_names.txt     40 class names, one a line (line number = label)
    ROOT/modelnet40_train.txt           9843 shape ids (``airplane_0001``), one a line
    ROOT/modelnet40_test.txt            2468 shape ids
    ROOT/<class>/<shape id>.txt         10 000 lines ``x,y,z,nx,ny,nz`` (comma separated)

A shape id is ``<class>_<4 digits>`` and the class may itself hold underscores
(``night_stand_0001``), so the class is everything before the last underscore.

The **classification cache** (``cd2p prepare modelnet40 ROOT OUT``) parses the text once::

    OUT/meta.json                 format, source, class names, per split the shape ids, and
                                  ``skipped``: shapes left out (their file and why)
    OUT/<split>.safetensors       points (S, P, 3) float32, labels (S,) int64

A shape file holding ``nan`` or ``inf`` (numpy parses both as numbers) is skipped, listed under
``skipped`` in ``meta.json`` and printed by the command; a split left with no shape is an
error naming its list file.

Each cloud is reduced by farthest point sampling to ``P`` points and stored **in FPS order**,
so that its first ``k`` points are themselves an FPS sample of ``k`` points: a loader gets the
1024-point FPS view (or Point-MAE's 1200-point pool) by slicing, without running FPS per
epoch. FPS of an FPS prefix is that prefix, so ``P = 2048`` (the default) trains exactly as
Point-MAE's 8192-point files for up to 1706 points per view (1.2 x 1706 = 2048). The cloud is
then centred and scaled into the unit sphere (Point-MAE's ``pc_normalize``). FPS in pure
torch costs about 0.3 s per ModelNet40 shape on a CPU core for 2048 points (an hour for the
dataset): pass ``device="cuda"`` (``--device cuda``) or install torch-cluster to go faster.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cd2p._atomic import atomic_write_text
from cd2p.data.classification import save_classification_cache, stack_normalized
from cd2p.data.common import (
    NonFiniteError,
    dataset_source,
    fps_order,
    progress_bar,
    read_lines,
    read_shape_txt,
    require_items,
    skipped_shape,
    staged_directory,
)

SHAPE_NAMES_FILE = "modelnet40_shape_names.txt"
SPLIT_FILE = "modelnet40_{split}.txt"
MODELNET_SPLITS = ("train", "test")


# -- the ModelNet40 text format -------------------------------------------------------------


def class_of_shape(shape_id: str) -> str:
    """``night_stand_0001`` -> ``night_stand``."""
    if "_" not in shape_id:
        raise ValueError(f"shape id {shape_id!r} does not look like <class>_<number>")
    return shape_id.rsplit("_", 1)[0]


def read_modelnet40_index(
    root: str | Path, split: str
) -> tuple[list[str], list[tuple[str, int, Path]]]:
    """Class names and the ``(shape_id, label, path)`` of every shape of ``split``."""
    root = Path(root)
    if split not in MODELNET_SPLITS:
        raise ValueError(f"ModelNet40 split must be one of {MODELNET_SPLITS}, got {split!r}")
    names = read_lines(root / SHAPE_NAMES_FILE, "is ROOT a modelnet40_normal_resampled folder?")
    label_of = {name: i for i, name in enumerate(names)}
    shapes = []
    list_file = root / SPLIT_FILE.format(split=split)
    for shape_id in read_lines(list_file, f"the {split} list of ModelNet40"):
        cls = class_of_shape(shape_id)
        if cls not in label_of:
            raise ValueError(
                f"{list_file}: shape {shape_id} has class {cls!r}, not in {SHAPE_NAMES_FILE}"
            )
        shapes.append((shape_id, label_of[cls], root / cls / f"{shape_id}.txt"))
    return names, shapes


def write_modelnet40(
    root: str | Path,
    class_names: Sequence[str],
    splits: Mapping[str, Sequence[tuple[str, np.ndarray]]],
) -> Path:
    """Write shapes in the ``modelnet40_normal_resampled`` layout (for tests and synthetic data).

    Args:
        root: output folder.
        class_names: the classes, in label order.
        splits: ``{"train": [(class_name, points (N, 6)), ...], "test": [...]}``; shapes of a
            class are numbered in the order given, across splits, as in the original release.
    """
    root = Path(root)
    counters = dict.fromkeys(class_names, 0)
    atomic_write_text(root / SHAPE_NAMES_FILE, "".join(f"{n}\n" for n in class_names))
    all_ids = []
    for split in MODELNET_SPLITS:
        ids = []
        for cls, points in splits.get(split, ()):
            if cls not in counters:
                raise ValueError(f"class {cls!r} is not in class_names")
            points = np.asarray(points, dtype=np.float32)
            if points.ndim != 2 or points.shape[1] != 6:
                raise ValueError(f"{cls}: points must be (N, 6) xyz + normal, got {points.shape}")
            counters[cls] += 1
            shape_id = f"{cls}_{counters[cls]:04d}"
            rows = "\n".join(",".join(f"{v:.6f}" for v in row) for row in points)
            atomic_write_text(root / cls / f"{shape_id}.txt", rows + "\n")
            ids.append(shape_id)
        atomic_write_text(root / SPLIT_FILE.format(split=split), "".join(f"{i}\n" for i in ids))
        all_ids += ids
    atomic_write_text(
        root / "filelist.txt", "".join(f"{class_of_shape(i)}/{i}.txt\n" for i in all_ids)
    )
    return root


def prepare_modelnet40(
    root: str | Path,
    out: str | Path,
    num_points: int = 2048,
    device: str = "cpu",
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Parse ``modelnet40_normal_resampled`` once into a classification cache at ``out``.

    Every shape is reduced to ``num_points`` points by FPS (kept in FPS order) and normalised
    into the unit sphere; normals are dropped (the backbone reads xyz only). A shape file with
    non-finite numbers is skipped and listed under ``skipped`` in ``meta.json``.
    """
    out = Path(out)
    indices = {split: read_modelnet40_index(root, split) for split in MODELNET_SPLITS}
    names = indices["train"][0]
    skipped: list[dict[str, str]] = []
    with staged_directory(out, overwrite) as tmp, progress_bar(show_progress) as bar:
        splits = {}
        for split, (_, listed) in indices.items():
            task = bar.add_task(f"read {split}", total=len(listed))
            clouds, shapes = [], []
            for shape in listed:
                try:
                    clouds.append(read_shape_txt(shape[2])[:, :3])
                    shapes.append(shape)
                except NonFiniteError as exc:
                    # One damaged shape file must not poison the cache or stop the run.
                    skipped.append(skipped_shape(split, shape[0], shape[2], exc))
                bar.advance(task)
            list_file = Path(root) / SPLIT_FILE.format(split=split)
            what = "shapes" if not listed else f"usable shapes (all {len(listed)} skipped)"
            require_items(len(shapes), f"{list_file} (ModelNet40 {split})", what)
            task = bar.add_task(f"fps {split}", total=len(shapes))
            sampled = fps_order(
                clouds, num_points, device, on_batch=lambda n, t=task: bar.advance(t, n)
            )
            splits[split] = (
                [s[0] for s in shapes],
                stack_normalized(sampled, f"{root} ({split})"),
                np.array([s[1] for s in shapes], dtype=np.int64),
            )
        source = dataset_source(root, "modelnet40")
        save_classification_cache(tmp, source, names, splits, {"fps_points": num_points},
                                  skipped=skipped)
    return out


__all__ = [
    "class_of_shape",
    "prepare_modelnet40",
    "read_modelnet40_index",
    "write_modelnet40",
]
