"""PairDataset over prepared ScanNet pairs (written by `prepare_scannet` from test .sens files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from cd2p.data.pairs import PairDataset, scene_dirs, target_file
from cd2p.data.scannet_pairs import prepare_scannet
from cd2p.data.sens import SensFrame, SensHeader, SensReader, encode_depth, encode_jpeg, write_sens

K = np.array([[20.0, 0, 9.5, 0], [0, 20.0, 7.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
SCENES = {"scene0000_00": 5, "scene0001_00": 3, "scene0002_00": 4, "scene0003_00": 2}


def write_root(root: Path) -> Path:
    """Small scenes: a 20x16 depth of a tilted surface, noise JPEGs, identity-ish poses."""
    rng = np.random.default_rng(0)
    for scene_id, count in SCENES.items():
        frames = []
        for i in range(count):
            depth = 1.0 + 0.05 * np.arange(20)[None, :] + 0.03 * np.arange(16)[:, None] + 0.1 * i
            pose = np.eye(4, dtype=np.float32)
            pose[:3, 3] = (i, 0.5 * i, 1.0)
            color = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
            frames.append(SensFrame(i, pose, i, i, encode_jpeg(color), encode_depth(depth)))
        header = SensHeader(4, "test", K, np.eye(4, dtype=np.float32), K,
                            np.eye(4, dtype=np.float32), 2, 1, 20, 16, 20, 16, 1000.0, count)
        (root / "scans" / scene_id).mkdir(parents=True)
        write_sens(root / "scans" / scene_id / f"{scene_id}.sens", header, frames)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pairs")
    root = write_root(base / "root")
    options = {"split": "all", "frame_skip": 1, "num_points": 32, "min_valid_points": 10,
               "progress": False}
    prepare_scannet(root, base / "whole", **options)
    for i in range(2):
        prepare_scannet(root, base / f"part{i}", shard=(i, 2), **options)
    # Teacher targets as `cd2p prepare teacher` writes them: (rows, T, C) float16 per scene.
    gen = torch.Generator().manual_seed(0)
    for out in (base / "whole", base / "part0", base / "part1"):
        for scene in scene_dirs(out):
            path = target_file(scene, "clip")
            path.parent.mkdir(parents=True, exist_ok=True)
            targets = torch.randn(SCENES[scene.name], 1, 8, generator=gen).half()
            save_file({"targets": targets}, str(path),
                      metadata={"teacher": "test", "random_teacher": "true"})
    return {"root": root, "whole": base / "whole", "parts": [base / "part0", base / "part1"]}


def test_items_follow_scene_order_and_contract(prepared) -> None:
    dataset = PairDataset(prepared["whole"], with_image=True)
    assert len(dataset) == sum(SCENES.values())
    assert dataset.scene_ids == sorted(SCENES)
    item = dataset[5]  # scene0000_00 has 5 rows: this is scene0001_00 row 0
    assert item["scene_id"] == "scene0001_00" and item["frame_index"] == 0
    assert item["points"].dtype == torch.float32 and item["points"].shape == (32, 3)
    assert "target" not in item
    sens_path = prepared["root"] / "scans" / "scene0001_00" / "scene0001_00.sens"
    with SensReader(sens_path) as reader:
        assert item["image"] == reader.frame(0).color_bytes
    assert dataset[-1]["scene_id"] == "scene0003_00" and dataset[-1]["frame_index"] == 1
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_shards_load_together_as_the_whole(prepared) -> None:
    whole = PairDataset(prepared["whole"], target="clip")
    parts = PairDataset(prepared["parts"], target="clip")
    assert len(parts) == len(whole) and parts.scene_ids == whole.scene_ids
    for i in range(len(whole)):
        a, b = whole[i], parts[i]
        assert (a["scene_id"], a["frame_index"]) == (b["scene_id"], b["frame_index"])
        assert torch.equal(a["points"], b["points"])
    with pytest.raises(ValueError, match="scene0000_00 is in both"):
        scene_dirs([prepared["whole"], prepared["parts"][0]])


def test_targets_are_read_row_by_row_as_stored(prepared, tmp_path: Path) -> None:
    dataset = PairDataset(prepared["whole"], target="clip")
    from safetensors.torch import load_file

    stored = load_file(str(target_file(scene_dirs(prepared["whole"])[2], "clip")))["targets"]
    first = dataset.offsets[2]
    for row in range(len(stored)):
        target = dataset[first + row]["target"]
        # float16 as stored: cast on the device, after the loader moved half the bytes
        assert target.dtype == torch.float16 and target.shape == (1, 8)
        assert torch.equal(target, stored[row])
    with pytest.raises(FileNotFoundError, match=r"targets/prefix/scene0000_00\.safetensors"):
        PairDataset(prepared["whole"], target="prefix")


def test_wrong_target_rows_and_temp_dirs(prepared, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_scannet(prepared["root"], out, split="all", frame_skip=2, num_points=32,
                    min_valid_points=10, progress=False)
    (out / "scenes" / ".tmp-scene0009_00").mkdir()  # a scene being written: not listed
    assert [p.name for p in scene_dirs(out)] == sorted(SCENES)
    for scene in scene_dirs(out):
        path = target_file(scene, "clip")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"targets": torch.zeros(SCENES[scene.name], 1, 8).half()}, str(path))
    with pytest.raises(ValueError, match=r"expected \(3, T, C\)"):
        PairDataset(out, target="clip")  # frame_skip=2 keeps 3 of scene0000_00's 5 frames
    with pytest.raises(FileNotFoundError, match="not an output of"):
        PairDataset(tmp_path / "nothing")


def test_dataloader_with_worker_processes(prepared) -> None:
    dataset = PairDataset(prepared["parts"], target="clip")
    expected = [dataset[i] for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=3, num_workers=2, shuffle=False)
    batches = list(loader)
    points = torch.cat([b["points"] for b in batches])
    assert points.shape == (len(dataset), 32, 3)
    assert torch.equal(points, torch.stack([e["points"] for e in expected]))
    assert torch.equal(torch.cat([b["target"] for b in batches]),
                       torch.stack([e["target"] for e in expected]))
    assert [s for b in batches for s in b["scene_id"]] == [e["scene_id"] for e in expected]
    assert torch.cat([b["frame_index"] for b in batches]).tolist() == [
        e["frame_index"] for e in expected
    ]
