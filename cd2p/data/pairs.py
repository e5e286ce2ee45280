"""Prepared ScanNet RGB/point pairs for training: a torch ``Dataset`` over one or more OUT dirs.

``cd2p prepare scannet ROOT OUT`` writes ``OUT/scenes/<scene_id>/`` (one Hugging Face dataset
per scene) and ``cd2p prepare teacher`` adds ``OUT/targets/<name>/<scene_id>.safetensors``
(one float16 tensor ``"targets"`` of shape ``(rows, T, C)`` in the scene's row order). Several
OUT directories (the parts of a ``--shard I/N`` run) load together as one dataset.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from cd2p._reading import reading
from cd2p.data.common import require_items
from cd2p.data.scene_jobs import SCENE_STATS_FILE, TMP_PREFIX

DATASET_STATE_FILE = "state.json"  # written last by datasets' save_to_disk


def _as_roots(roots: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(roots, str | Path):
        return [Path(roots)]
    roots = [Path(r) for r in roots]
    if not roots:
        raise ValueError("no prepared directories given")
    return roots


def scene_dirs(roots: str | Path | Sequence[str | Path]) -> list[Path]:
    """All complete scene datasets under one or several prepared OUT directories.

    Temporary directories of scenes still being written (``scenes/.tmp-*``) are ignored. The
    result is sorted by scene id; a scene present under two roots is an error (two shards of
    one run never share a scene, so it means the same data was given twice).
    """
    found: dict[str, Path] = {}
    for root in _as_roots(roots):
        scenes = root / "scenes"
        if not scenes.is_dir():
            raise FileNotFoundError(
                f"{scenes} not found: {root} is not an output of `cd2p prepare scannet`"
            )
        for path in scenes.iterdir():
            if path.name.startswith((".", TMP_PREFIX)) or not path.is_dir():
                continue
            if not (path / DATASET_STATE_FILE).is_file():
                continue
            if path.name in found:
                raise ValueError(
                    f"scene {path.name} is in both {found[path.name]} and {path}; "
                    "give each prepared part once"
                )
            found[path.name] = path
    return [found[name] for name in sorted(found)]


def _scene_rows(path: Path) -> int:
    stats = path / SCENE_STATS_FILE
    if stats.is_file():
        return int(json.loads(stats.read_text(encoding="utf-8"))["pairs"])
    from datasets import load_from_disk

    return len(load_from_disk(str(path)))


def _scene_images_sha256(path: Path) -> str | None:
    """The digest of a scene's JPEGs recorded by ``prepare scannet`` (None for older scenes)."""
    stats = path / SCENE_STATS_FILE
    if not stats.is_file():
        return None
    return json.loads(stats.read_text(encoding="utf-8")).get("images_sha256")


def target_file(scene_dir: Path, name: str) -> Path:
    """``OUT/targets/<name>/<scene_id>.safetensors`` for ``OUT/scenes/<scene_id>``."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"invalid target name {name!r}")
    return scene_dir.parent.parent / "targets" / name / f"{scene_dir.name}.safetensors"


class PairBatch(Sequence):
    """The items of one DataLoader batch, read at once: ``points (B, P, 3)``, ``targets``
    (item key -> ``(B, T, C)``: ``target`` for the first target named, ``target_<name>`` for
    the others), ``scene_ids``, ``frame_index (B,)`` and ``images`` (or None).

    ``PairCollate`` uses the stacked tensors directly; anything else (torch's default collate,
    a loop) sees a sequence of per-item dicts, built only when asked for.
    """

    def __init__(self, points: torch.Tensor, targets: dict[str, torch.Tensor],
                 scene_ids: list[str], frame_index: torch.Tensor,
                 images: list[bytes] | None = None) -> None:  # fmt: skip
        self.points, self.targets, self.scene_ids = points, targets, scene_ids
        self.frame_index, self.images = frame_index, images

    def __len__(self) -> int:
        return len(self.scene_ids)

    def __getitem__(self, k: int) -> dict[str, Any]:  # type: ignore[override]
        item: dict[str, Any] = {
            "points": self.points[k],
            "scene_id": self.scene_ids[k],
            "frame_index": int(self.frame_index[k]),
        }
        for key, values in self.targets.items():
            item[key] = values[k]
        if self.images is not None:
            item["image"] = self.images[k]
        return item


class PairDataset(Dataset):
    """Pairs of one or several prepared OUT directories, scene by scene in scene-id order.

    Args:
        roots: one OUT directory or several (e.g. the parts of a ``--shard`` run).
        target: name of teacher targets to return (``"prefix"``, ``"clip"``...), read from
            ``OUT/targets/<target>/<scene_id>.safetensors``; every scene must have them. A
            sequence of names (``("prefix", "clip")``) returns several.
        with_image: also return the colour JPEG bytes.
        in_memory: read every pair's points (and targets) into memory once, here, instead of
            from the memory-mapped files (100 k pairs of 4096 points take 4.9 GB as float32);
            not with ``with_image``.

    Item ``i`` is a dict: ``points`` float32 ``(P, 3)``, ``scene_id`` str, ``frame_index``
    int, and ``target`` ``(T, C)`` (the first target named) / ``target_<name>`` (the others,
    e.g. ``target_clip``) as stored (float16: cast on the device, which halves what the loader
    moves) / ``image`` bytes when asked for.

    A DataLoader fetches a whole batch at once through :meth:`__getitems__`: rows of the same
    scene are read with one Arrow ``take`` and one slice per target, about 2.4x cheaper per
    pair than row by row (``benchmarks/pretrain.py``).

    Roots without any pair are an error naming them.

    Only paths and row counts are held until the first item is read; datasets (memory-mapped
    Arrow files) and target files are then opened lazily in each process, so the object is
    cheap to send to DataLoader workers, with fork or spawn.
    """

    def __init__(
        self,
        roots: str | Path | Sequence[str | Path],
        target: str | Sequence[str] | None = None,
        with_image: bool = False,
        in_memory: bool = False,
    ) -> None:
        self.scene_paths = scene_dirs(roots)
        self.scene_ids = [p.name for p in self.scene_paths]
        self.rows = [_scene_rows(p) for p in self.scene_paths]
        self.offsets = [0]
        for count in self.rows:
            self.offsets.append(self.offsets[-1] + count)
        # Training or captioning nothing would fail later with a less useful message.
        where = ", ".join(str(r) for r in _as_roots(roots))
        require_items(len(self.scene_paths), where, "prepared scenes (OUT/scenes/<scene_id>/)")
        require_items(self.offsets[-1], where, f"pairs in its {len(self.scene_paths)} scene(s)")
        names = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        self.targets: tuple[str, ...] = names
        self.target = names[0] if names else None
        self.with_image = with_image
        # target name -> one targets file per scene, in scene order
        self.paths_of_target: dict[str, list[Path]] = {}
        for name in names:
            paths = [target_file(p, name) for p in self.scene_paths]
            for path, rows, scene in zip(paths, self.rows, self.scene_paths, strict=True):
                self._check_targets(path, rows, scene)
            self.paths_of_target[name] = paths
        self.target_paths: list[Path] = self.paths_of_target.get(self.target, [])
        self._reset()
        self.memory: dict[str, Any] | None = None
        if in_memory:
            if with_image:
                raise ValueError("in_memory keeps points and targets, not images: drop one")
            self.memory = self._load_all()

    # ------------------------------------------------------------------ per-process state
    def _reset(self) -> None:
        self._pid = os.getpid()
        self._datasets: dict[int, Any] = {}
        self._targets: dict[tuple[int, str], Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_datasets"], state["_targets"] = {}, {}  # reopened lazily in the new process
        return state

    @staticmethod
    def _check_targets(path: Path, rows: int, scene: Path) -> None:
        """The targets file exists, holds one row per pair and, when both record the digest of
        the scene's JPEGs, was computed from the images the scene holds now."""
        from safetensors import safe_open

        if not path.is_file():
            raise FileNotFoundError(
                f"teacher targets {path} not found (run `cd2p prepare teacher` for this OUT)"
            )
        with reading(path, "run `cd2p prepare teacher` again"), \
                safe_open(str(path), framework="pt") as handle:
            if "targets" not in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
                raise ValueError(f"{path}: no tensor named 'targets'")
            shape = handle.get_slice("targets").get_shape()
            computed_from = (handle.metadata() or {}).get("images_sha256")
        if len(shape) != 3 or shape[0] != rows:
            raise ValueError(
                f"{path}: targets have shape {tuple(shape)}, expected ({rows}, T, C) "
                "for the scene's rows"
            )
        now = _scene_images_sha256(scene)
        if computed_from and now and computed_from != now:
            # Same row count, other frames: training would pair points with another image's
            # targets without any other sign.
            raise ValueError(
                f"{path}: computed from other images than {scene} holds now (the scene was "
                f"prepared again); run `cd2p prepare teacher {scene.parent.parent}` again"
            )

    def _scene(self, scene: int) -> Any:
        if os.getpid() != self._pid:  # a forked worker: do not share file handles
            self._reset()
        dataset = self._datasets.get(scene)
        if dataset is None:
            from datasets import Image, load_from_disk

            dataset = load_from_disk(str(self.scene_paths[scene]))
            columns = ["points", "scene_id", "frame_index"]
            if self.with_image:
                columns.append("image")
                dataset = dataset.cast_column("image", Image(decode=False))
            dataset = dataset.select_columns(columns).with_format("numpy")
            self._datasets[scene] = dataset
        return dataset

    def _target_slice(self, scene: int, name: str) -> Any:
        handle = self._targets.get((scene, name))
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.paths_of_target[name][scene]), framework="pt")
            self._targets[(scene, name)] = handle
        return handle.get_slice("targets")

    # ------------------------------------------------------------------ Dataset API
    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """``(scene position, row within that scene)`` of item ``index``."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range ({len(self)} pairs)")
        scene = bisect.bisect_right(self.offsets, index) - 1
        return scene, index - self.offsets[scene]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> PairBatch:
        """The items of ``indices`` (a DataLoader batch), in that order, as one
        :class:`PairBatch`; each scene's rows are read at once."""
        located = [self.locate(int(i)) for i in indices]
        if self.memory is not None:
            flat = torch.tensor([self.offsets[s] + r for s, r in located], dtype=torch.long)
            memory = self.memory
            return PairBatch(
                memory["points"][flat],
                {key: values[flat] for key, values in memory["targets"].items()},
                [self.scene_ids[int(s)] for s in memory["scene"][flat]],
                memory["frame_index"][flat],
            )
        count = len(located)
        order: list[int] = []
        points, scene_ids, frames, images = [], [], [], []
        targets: dict[str, list[torch.Tensor]] = {
            self._target_key(i): [] for i in range(len(self.targets))
        }
        by_scene: dict[int, list[int]] = {}
        for position, (scene, _) in enumerate(located):
            by_scene.setdefault(scene, []).append(position)
        for scene, positions in by_scene.items():
            rows = [located[p][1] for p in positions]
            records = self._scene(scene)[rows]  # one Arrow take for the scene's rows
            points.append(torch.from_numpy(records["points"].astype("float32", copy=False)))
            lo, hi = min(rows), max(rows)
            for position, name in enumerate(self.targets):
                block = self._target_slice(scene, name)[lo : hi + 1]
                targets[self._target_key(position)].append(block[torch.tensor(rows) - lo])
            scene_ids += [str(s) for s in records["scene_id"]]
            frames.append(torch.from_numpy(records["frame_index"].astype("int64")))
            if self.with_image:
                images += [bytes(image["bytes"]) for image in records["image"]]
            order += positions
        # back to the order of ``indices``
        inverse = torch.empty(count, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(count)
        return PairBatch(
            torch.cat(points)[inverse],
            {key: torch.cat(values)[inverse] for key, values in targets.items()},
            [scene_ids[i] for i in inverse.tolist()],
            torch.cat(frames)[inverse],
            [images[i] for i in inverse.tolist()] if self.with_image else None,
        )

    # ------------------------------------------------------------------ in memory
    def _target_key(self, position: int) -> str:
        return "target" if position == 0 else f"target_{self.targets[position]}"

    def _load_all(self) -> dict[str, Any]:
        points, scene_of, frames = [], [], []
        targets: dict[str, list[torch.Tensor]] = {
            self._target_key(i): [] for i in range(len(self.targets))
        }
        for scene in range(len(self.scene_paths)):
            if not self.rows[scene]:
                continue
            table = self._scene(scene)[:]
            points.append(torch.from_numpy(table["points"].astype("float32", copy=False)))
            frames.append(torch.from_numpy(table["frame_index"].astype("int64")))
            scene_of.append(torch.full((self.rows[scene],), scene, dtype=torch.int32))
            for position, name in enumerate(self.targets):
                targets[self._target_key(position)].append(self._target_slice(scene, name)[:])
        self._reset()  # no open files kept: the object goes to loader workers
        return {
            "points": torch.cat(points),
            "targets": {key: torch.cat(values) for key, values in targets.items()},
            "scene": torch.cat(scene_of),
            "frame_index": torch.cat(frames),
        }
