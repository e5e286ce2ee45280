"""ShapeNetPart (``shapenetcore_partanno_segmentation_benchmark_v0_normal``): 16 categories,
50 parts.

The files users have::

    ROOT/synsetoffset2category.txt         "<Category>\\t<synset>" a line (line order = category id)
    ROOT/<synset>/<shape>.txt              "x y z nx ny nz part" a line (part as a float, 0-49)
    ROOT/train_test_split/shuffled_{train,val,test}_file_list.json
                                           JSON lists of "shape_data/<synset>/<shape>"

Part ids are global (Airplane 0-3, Bag 4-5, ..., Table 47-49); which parts belong to which
category is the standard table below. A category missing from the table (a custom dataset in
this format) gets the parts its shapes use.

The **part-segmentation cache** (``cd2p prepare shapenetpart ROOT OUT``)::

    OUT/meta.json              format, category names, synsets, parts per category, shape
                               ids, and ``skipped``: shapes left out (their file and why)
    OUT/<split>.safetensors    points (T, 3) float32 (every shape centred and scaled into the
                               unit sphere), labels (T,) int16, offsets (S + 1,) int64 (shape
                               i is rows offsets[i]:offsets[i+1]), categories (S,) int64

All points of every shape are kept (shapes have 500 to 3000); loaders sample 2048 per item.
A shape file holding ``nan`` or ``inf`` is skipped, listed under ``skipped`` and printed by the
command; a split with no shape is an error naming its list file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from cd2p._atomic import atomic_write_text
from cd2p._reading import reading
from cd2p.data.common import (
    META_FILE,
    NonFiniteError,
    dataset_source,
    normalize_unit_sphere,
    progress_bar,
    read_cache_meta,
    read_lines,
    read_shape_txt,
    require_finite,
    require_items,
    skipped_shape,
    staged_directory,
)

CACHE_FORMAT = "cd2p-partseg"
CACHE_VERSION = 1
CATEGORY_FILE = "synsetoffset2category.txt"
SPLIT_JSON = "train_test_split/shuffled_{split}_file_list.json"
SPLITS = ("train", "val", "test")

# The standard ShapeNetPart category -> part ids table (PointNet's seg_classes).
STANDARD_PARTS: dict[str, tuple[int, ...]] = {
    "Airplane": (0, 1, 2, 3),
    "Bag": (4, 5),
    "Cap": (6, 7),
    "Car": (8, 9, 10, 11),
    "Chair": (12, 13, 14, 15),
    "Earphone": (16, 17, 18),
    "Guitar": (19, 20, 21),
    "Knife": (22, 23),
    "Lamp": (24, 25, 26, 27),
    "Laptop": (28, 29),
    "Motorbike": (30, 31, 32, 33, 34, 35),
    "Mug": (36, 37),
    "Pistol": (38, 39, 40),
    "Rocket": (41, 42, 43),
    "Skateboard": (44, 45, 46),
    "Table": (47, 48, 49),
}
STANDARD_SYNSETS: dict[str, str] = {
    "Airplane": "02691156",
    "Bag": "02773838",
    "Cap": "02954340",
    "Car": "02958343",
    "Chair": "03001627",
    "Earphone": "03261776",
    "Guitar": "03467462",
    "Knife": "03624134",
    "Lamp": "03636649",
    "Laptop": "03642806",
    "Motorbike": "03790512",
    "Mug": "03797390",
    "Pistol": "03948459",
    "Rocket": "04099429",
    "Skateboard": "04225987",
    "Table": "04379243",
}


# -- the raw format -------------------------------------------------------------------------


def read_categories(root: str | Path) -> list[tuple[str, str]]:
    """``[(name, synset), ...]`` from ``synsetoffset2category.txt``, in file order."""
    path = Path(root) / CATEGORY_FILE
    out = []
    for number, line in enumerate(read_lines(path, "is ROOT a ShapeNetPart folder?"), 1):
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}:{number}: expected '<Category> <synset>', got {line!r}")
        out.append((fields[0], fields[1]))
    return out


def read_split_list(root: str | Path, split: str) -> list[tuple[str, str]]:
    """``[(synset, shape_id), ...]`` of a split json (``train``, ``val`` or ``test``)."""
    if split not in SPLITS:
        raise ValueError(f"ShapeNetPart split must be one of {SPLITS}, got {split!r}")
    path = Path(root) / SPLIT_JSON.format(split=split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the {split} list of ShapeNetPart")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of 'shape_data/<synset>/<shape>' strings")
    out = []
    for entry in entries:
        parts = str(entry).strip("/").split("/")
        if len(parts) < 2:
            raise ValueError(f"{path}: entry {entry!r} is not 'shape_data/<synset>/<shape>'")
        out.append((parts[-2], parts[-1]))
    return out


def read_part_shape(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One shape file -> ``(points (N, 6) xyz + normal float32, parts (N,) int64)``."""
    table = read_shape_txt(path, columns=7)
    labels = table[:, 6]
    if not np.all(labels == np.round(labels)) or labels.min() < 0:
        raise ValueError(f"{path}: the 7th column must hold non-negative integer part ids")
    return table[:, :6], labels.astype(np.int64)


def write_shapenetpart(
    root: str | Path,
    categories: Sequence[tuple[str, str]],
    splits: Mapping[str, Sequence[tuple[str, str, np.ndarray, np.ndarray]]],
) -> Path:
    """Write shapes in the ShapeNetPart layout (for tests and synthetic data).

    Args:
        root: output folder.
        categories: ``[(name, synset), ...]`` in category order.
        splits: ``{"train": [(synset, shape_id, points (N, 6), parts (N,)), ...], "val": ...,
            "test": ...}``.
    """
    root = Path(root)
    atomic_write_text(root / CATEGORY_FILE, "".join(f"{n}\t{s}\n" for n, s in categories))
    synsets = {s for _, s in categories}
    for split in SPLITS:
        entries = []
        for synset, shape_id, points, parts in splits.get(split, ()):
            if synset not in synsets:
                raise ValueError(f"shape {shape_id}: synset {synset} is not among the categories")
            points = np.asarray(points, dtype=np.float32)
            if points.ndim != 2 or points.shape[1] != 6 or len(parts) != len(points):
                raise ValueError(f"shape {shape_id}: need points (N, 6) and parts (N,)")
            rows = "\n".join(
                " ".join(f"{v:.6f}" for v in row) + f" {float(p):.6f}"
                for row, p in zip(points, parts, strict=True)
            )
            atomic_write_text(root / synset / f"{shape_id}.txt", rows + "\n")
            entries.append(f"shape_data/{synset}/{shape_id}")
        atomic_write_text(root / SPLIT_JSON.format(split=split), json.dumps(entries))
    return root


# -- the cache ------------------------------------------------------------------------------


@dataclass
class PartSegSplit:
    """One split of a part-segmentation cache, in memory (see the module docstring)."""

    points: torch.Tensor  # (T, 3) float32
    labels: torch.Tensor  # (T,) int64
    offsets: torch.Tensor  # (S + 1,) int64
    categories: torch.Tensor  # (S,) int64
    shape_ids: list[str]
    category_names: list[str]
    category_parts: list[list[int]]

    @property
    def num_parts(self) -> int:
        return 1 + max(max(p) for p in self.category_parts)

    @property
    def num_categories(self) -> int:
        return len(self.category_names)

    def __len__(self) -> int:
        return len(self.categories)

    def shape(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(points (N_i, 3), labels (N_i,))`` of shape ``index``."""
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.points[lo:hi], self.labels[lo:hi]


def prepare_shapenetpart(
    root: str | Path, out: str | Path, overwrite: bool = False, show_progress: bool = True
) -> Path:
    """Parse ShapeNetPart once into a part-segmentation cache at ``out``.

    A shape file with non-finite numbers is skipped and listed under ``skipped`` in
    ``meta.json``; a split with no (usable) shape is an error naming its list file.
    """
    root, out = Path(root), Path(out)
    categories = read_categories(root)
    cat_of = {synset: i for i, (_, synset) in enumerate(categories)}
    lists = {split: read_split_list(root, split) for split in SPLITS}
    seen_parts: list[set[int]] = [set() for _ in categories]
    skipped: list[dict[str, str]] = []
    with staged_directory(out, overwrite) as tmp, progress_bar(show_progress) as bar:
        meta_splits = {}
        for split, entries in lists.items():
            task = bar.add_task(f"read {split}", total=len(entries))
            points, labels, offsets, cats, ids = [], [], [0], [], []
            for synset, shape_id in entries:
                if synset not in cat_of:
                    raise ValueError(
                        f"{root / SPLIT_JSON.format(split=split)}: synset {synset} of {shape_id} "
                        f"is not in {CATEGORY_FILE}"
                    )
                file = root / synset / f"{shape_id}.txt"
                try:
                    xyzn, parts = read_part_shape(file)
                except NonFiniteError as exc:
                    # One damaged shape file must not poison the cache or stop the run.
                    skipped.append(skipped_shape(split, f"{synset}/{shape_id}", file, exc))
                    bar.advance(task)
                    continue
                points.append(normalize_unit_sphere(xyzn[:, :3]))
                labels.append(parts)
                offsets.append(offsets[-1] + len(parts))
                cats.append(cat_of[synset])
                seen_parts[cat_of[synset]].update(int(p) for p in np.unique(parts))
                ids.append(f"{synset}/{shape_id}")
                bar.advance(task)
            list_file = root / SPLIT_JSON.format(split=split)
            what = "shapes" if not entries else f"usable shapes (all {len(entries)} skipped)"
            require_items(len(ids), f"{list_file} (ShapeNetPart {split})", what)
            # The last guard before writing (the shapes were checked where they were read).
            all_points = require_finite(np.concatenate(points),
                                        f"{split}.safetensors (ShapeNetPart {split})")
            save_file(
                {
                    "points": torch.from_numpy(all_points),
                    "labels": torch.from_numpy(np.concatenate(labels).astype(np.int16)),
                    "offsets": torch.tensor(offsets, dtype=torch.int64),
                    "categories": torch.tensor(cats, dtype=torch.int64),
                },
                str(tmp / f"{split}.safetensors"),
            )
            meta_splits[split] = {"count": len(ids), "shape_ids": ids}
        category_parts = []
        for (name, _), seen in zip(categories, seen_parts, strict=True):
            parts = STANDARD_PARTS.get(name) or tuple(sorted(seen))
            if not parts:
                raise ValueError(f"{root}: category {name} has no shapes and is not a standard one")
            if not seen <= set(parts):
                raise ValueError(
                    f"{root}: {name} shapes use parts {sorted(seen - set(parts))}, which are not "
                    f"{name} parts {list(parts)} of the standard ShapeNetPart table"
                )
            category_parts.append(list(parts))
        meta = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "source": dataset_source(root, "shapenetpart"),
            "category_names": [n for n, _ in categories],
            "synsets": [s for _, s in categories],
            "category_parts": category_parts,
            "splits": meta_splits,
            "skipped": skipped,
        }
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1))
    return out


def load_partseg_cache(path: str | Path, split: str) -> PartSegSplit:
    """Load ``train``, ``val``, ``test`` or ``trainval`` (train + val) of a prepared dataset.

    A split with no shapes is an error naming its file.
    """
    path = Path(path)
    meta = read_cache_meta(path, CACHE_FORMAT)
    names = split.split("+") if split != "trainval" else ["train", "val"]
    for name in names:
        if name not in meta["splits"]:
            raise ValueError(f"{path} has no split {name!r}; it holds {', '.join(meta['splits'])}")
    parts = []
    for name in names:
        with reading(path / f"{name}.safetensors", "prepare the data again"):
            parts.append(load_file(str(path / f"{name}.safetensors")))
    for name, part in zip(names, parts, strict=True):
        require_items(len(part["categories"]), f"{path / name}.safetensors (split {name!r})",
                      "shapes")
    offsets = [torch.zeros(1, dtype=torch.int64)]
    total = 0
    for p in parts:
        offsets.append(p["offsets"][1:] + total)
        total += int(p["offsets"][-1])
    return PartSegSplit(
        points=torch.cat([p["points"] for p in parts]),
        labels=torch.cat([p["labels"] for p in parts]).long(),
        offsets=torch.cat(offsets),
        categories=torch.cat([p["categories"] for p in parts]),
        shape_ids=[i for name in names for i in meta["splits"][name]["shape_ids"]],
        category_names=meta["category_names"],
        category_parts=meta["category_parts"],
    )


# -- the torch dataset ----------------------------------------------------------------------


def sample_indices(count: int, num_points: int, generator: torch.Generator | None) -> torch.Tensor:
    """``num_points`` indices into ``count`` points: without replacement when there are enough,
    else every point once plus random repeats."""
    if count >= num_points:
        return torch.randperm(count, generator=generator)[:num_points]
    extra = torch.randint(count, (num_points - count,), generator=generator)
    return torch.cat([torch.randperm(count, generator=generator), extra])


class PartSegDataset(Dataset):
    """Shapes of a :class:`PartSegSplit` with ``num_points`` points each.

    The points of shape ``i`` are drawn by a generator seeded from ``(seed, i)``: the same in
    every epoch and every evaluation. Training asks for a larger pool and lets the driver draw
    each step's view from it with the step's generator (see :mod:`cd2p.engine.finetune`).

    Items: ``{"points": (N, 3) float32, "part_labels": (N,) int64, "category": () int64}``.
    """

    def __init__(self, data: PartSegSplit, num_points: int, seed: int = 0) -> None:
        self.data = data
        self.num_points = num_points
        self.seed = seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        points, labels = self.data.shape(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        idx = sample_indices(len(points), self.num_points, generator)
        return {
            "points": points[idx].float(),
            "part_labels": labels[idx],
            "category": self.data.categories[index],
        }


__all__ = [
    "STANDARD_PARTS",
    "STANDARD_SYNSETS",
    "PartSegDataset",
    "PartSegSplit",
    "load_partseg_cache",
    "prepare_shapenetpart",
    "read_categories",
    "read_part_shape",
    "read_split_list",
    "write_shapenetpart",
]
