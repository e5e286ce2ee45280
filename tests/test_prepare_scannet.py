"""`cd2p prepare scannet` on small ScanNet roots whose .sens files the tests write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from datasets import Image, load_from_disk

import cd2p.data.sens as sens
from cd2p.cli import main
from cd2p.data.scannet_files import write_scene_meta, write_split
from cd2p.data.scannet_pairs import (
    backproject_depth,
    list_scenes,
    prepare_scannet,
    reduce_points,
    voxel_downsample,
)
from cd2p.data.scene_jobs import shard_scenes
from cd2p.data.sens import SensFrame, SensHeader, SensReader, write_sens

DEPTH_W, DEPTH_H = 32, 24
COLOR_W, COLOR_H = 64, 48
K_DEPTH = np.array([[30.0, 0, 15.5, 0], [0, 30.0, 11.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
                   dtype=np.float32)
K_COLOR = np.array([[60.0, 0, 31.5, 0], [0, 60.0, 23.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
                   dtype=np.float32)
SMALL = {"num_points": 64, "min_valid_points": 50, "progress": False}


def rotation(axis: str, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    m = np.eye(4)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def make_header(num_frames: int) -> SensHeader:
    return SensHeader(
        version=4, sensor_name="StructureSensor", intrinsic_color=K_COLOR,
        extrinsic_color=np.eye(4, dtype=np.float32), intrinsic_depth=K_DEPTH,
        extrinsic_depth=np.eye(4, dtype=np.float32), color_compression=2,
        depth_compression=1, color_width=COLOR_W, color_height=COLOR_H, depth_width=DEPTH_W,
        depth_height=DEPTH_H, depth_shift=1000.0, num_frames=num_frames,
    )


def default_pose(i: int) -> np.ndarray:
    pose = rotation("z", 7.0 * i) @ rotation("x", -100.0)
    pose[:3, 3] = (1.0 + 0.05 * i, 2.0, 1.5)
    return pose


def default_depth(i: int) -> np.ndarray:
    """A slanted surface 1-3 m away, different per frame."""
    u = np.arange(DEPTH_W)[None, :]
    v = np.arange(DEPTH_H)[:, None]
    return (1.0 + 0.04 * u + 0.02 * v + 0.01 * i).astype(np.float32)


def write_scene(root: Path, scene_id: str, num_frames: int, *, depth=default_depth,
                pose=default_pose, align: np.ndarray | None = None, seed: int = 0) -> Path:
    """``root/scans/<scene>/<scene>.sens`` (+ ``.txt``) with noise JPEGs and given depth."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(num_frames):
        color = rng.integers(0, 256, (COLOR_H, COLOR_W, 3), dtype=np.uint8)
        frames.append(SensFrame(
            index=i, camera_to_world=np.asarray(pose(i), np.float32), timestamp_color=i,
            timestamp_depth=i, color_bytes=sens.encode_jpeg(color),
            depth_bytes=sens.encode_depth(depth(i)),
        ))
    scene_dir = root / "scans" / scene_id
    scene_dir.mkdir(parents=True, exist_ok=True)
    path = scene_dir / f"{scene_id}.sens"
    write_sens(path, make_header(num_frames), frames)
    meta: dict[str, object] = {"numColorFrames": num_frames, "sceneType": "Office"}
    if align is not None:
        meta["axisAlignment"] = align
    write_scene_meta(scene_dir / f"{scene_id}.txt", meta)
    return path


def make_root(root: Path, scenes: dict[str, int]) -> Path:
    for k, (scene_id, frames) in enumerate(scenes.items()):
        write_scene(root, scene_id, frames, seed=k, align=rotation("z", 30.0 * k))
    write_split(root / "scannetv2_train.txt", sorted(scenes))
    return root


def load_rows(scene_dir: Path) -> list[dict]:
    dataset = load_from_disk(str(scene_dir)).cast_column("image", Image(decode=False))
    return [dataset[i] for i in range(len(dataset))]


def assert_same_output(out_a: Path, out_b: Path) -> None:
    names_a = sorted(p.name for p in (out_a / "scenes").iterdir())
    names_b = sorted(p.name for p in (out_b / "scenes").iterdir())
    assert names_a == names_b
    for name in names_a:
        rows_a, rows_b = load_rows(out_a / "scenes" / name), load_rows(out_b / "scenes" / name)
        assert len(rows_a) == len(rows_b)
        for a, b in zip(rows_a, rows_b, strict=True):
            assert a["image"]["bytes"] == b["image"]["bytes"]
            assert a["frame_index"] == b["frame_index"] and a["scene_id"] == b["scene_id"]
            np.testing.assert_array_equal(np.asarray(a["points"]), np.asarray(b["points"]))


# --------------------------------------------------------------------------- geometry


def test_backproject_matches_the_pinhole_model() -> None:
    depth = default_depth(0)
    depth[3, 5] = 0.0
    points = backproject_depth(depth, K_DEPTH)
    assert points.shape == (DEPTH_H, DEPTH_W, 3) and points.dtype == np.float32
    for v, u in [(0, 0), (7, 20), (23, 31)]:
        z = depth[v, u]
        expected = [(u - 15.5) * z / 30.0, (v - 11.5) * z / 30.0, z]
        np.testing.assert_allclose(points[v, u], expected, rtol=1e-6)
    np.testing.assert_array_equal(points[3, 5], 0.0)


def _first_per_voxel(flat: np.ndarray, mask: np.ndarray, voxel: float) -> np.ndarray:
    """Reference: index of the first masked point of every occupied voxel."""
    keys = np.floor(flat * np.float32(1.0 / voxel)).astype(np.int64)
    firsts = {}
    for i in np.flatnonzero(mask):
        firsts.setdefault(tuple(keys[i]), i)
    return np.sort(np.fromiter(firsts.values(), dtype=np.int64))


@pytest.mark.parametrize("layout", ["image", "flat"])
def test_voxel_downsample_keeps_the_first_point_of_every_voxel(layout: str) -> None:
    rng = np.random.default_rng(3)
    points = backproject_depth(rng.uniform(0.5, 1.5, (40, 50)).astype(np.float32), K_DEPTH)
    mask = rng.random((40, 50)) > 0.2
    if layout == "flat":
        points, mask = points.reshape(-1, 3), mask.reshape(-1)
    kept = voxel_downsample(points, 0.05, mask)
    expected = _first_per_voxel(points.reshape(-1, 3), mask.reshape(-1), 0.05)
    np.testing.assert_array_equal(np.sort(kept), expected)
    assert 50 < len(kept) < mask.sum()


def test_reduce_points_gives_exact_count_and_evens_density() -> None:
    rng = np.random.default_rng(0)
    # 10000 points crowded in one 1 cm cube plus 200 spread over a 1 m cube.
    dense = rng.uniform(0, 0.01, (10000, 3))
    sparse = rng.uniform(0, 1, (200, 3))
    points = np.concatenate([dense, sparse]).astype(np.float32)
    out = reduce_points(points, 100, 0.02, np.random.default_rng(1))
    assert out.shape == (100, 3) and out.dtype == np.float32
    assert len(np.unique(out, axis=0)) == 100  # enough voxels: no repeats
    assert (out.max(axis=1) < 0.01).sum() <= 2  # the crowded cube is one voxel, not 98 %
    few = reduce_points(points[:5], 12, 0.02, np.random.default_rng(1))
    assert few.shape == (12, 3)
    assert len(np.unique(few, axis=0)) == len(np.unique(points[:5] // 0.02, axis=0))


def test_plane_at_known_depth_lands_on_the_plane(tmp_path: Path) -> None:
    """A camera 2.5 m from a wall, tilted and translated; far pixels beyond --max-depth."""
    root = tmp_path / "root"
    wall = 2.5

    def depth(i: int) -> np.ndarray:
        d = np.full((DEPTH_H, DEPTH_W), wall, dtype=np.float32)
        d[:, -4:] = 7.0  # beyond max_depth: must be dropped, would be off the plane
        d[0, :] = 0.0  # invalid
        return d

    pose = rotation("y", 20.0) @ rotation("x", -90.0)
    pose[:3, 3] = (0.3, -1.0, 1.2)
    align = rotation("z", 90.0)
    align[:3, 3] = (5.0, 0.0, 0.0)
    write_scene(root, "scene0000_00", 3, depth=depth, pose=lambda i: pose, align=align)
    report = prepare_scannet(root, tmp_path / "out", split="all", frame_skip=1,
                             max_depth=6.0, voxel_size=0.01, **{**SMALL, "num_points": 256})
    assert report["pairs_written"] == 3
    rows = load_rows(tmp_path / "out" / "scenes" / "scene0000_00")
    points = np.asarray(rows[0]["points"], dtype=np.float64)
    assert points.shape == (256, 3)
    np.testing.assert_allclose(points.mean(axis=0), 0.0, atol=1e-5)  # centred
    normal = (align @ pose.astype(np.float32).astype(np.float64))[:3, 2]  # camera z in world
    np.testing.assert_allclose(points @ normal, 0.0, atol=1e-4)  # on the plane
    # The visible patch spans the valid pixels (u 0..27, v 1..23) at the wall's distance.
    cam_x = (align @ pose)[:3, 0]
    cam_y = (align @ pose)[:3, 1]
    extent_x = np.ptp(points @ cam_x)
    extent_y = np.ptp(points @ cam_y)
    assert extent_x == pytest.approx(27 * wall / 30.0, abs=0.02)
    assert extent_y == pytest.approx(22 * wall / 30.0, abs=0.02)
    np.testing.assert_array_equal(np.asarray(rows[0]["pose"]), pose.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(rows[0]["intrinsic_depth"]), K_DEPTH)
    np.testing.assert_array_equal(np.asarray(rows[0]["intrinsic_color"]), K_COLOR)


# --------------------------------------------------------------------------- pipeline


def test_skipped_frames_are_never_read_or_decoded(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "root"

    def pose(i: int) -> np.ndarray:
        return np.full((4, 4), -np.inf) if i in (4, 5) else default_pose(i)

    def depth(i: int) -> np.ndarray:
        return np.zeros((DEPTH_H, DEPTH_W), np.float32) if i == 6 else default_depth(i)

    write_scene(root, "scene0001_00", 11, pose=pose, depth=depth)
    calls = {"depth": 0, "jpeg": 0, "frame": []}
    real_depth, real_jpeg, real_frame = sens.decode_depth, sens.decode_jpeg, SensReader.frame

    def count_depth(*args, **kwargs):
        calls["depth"] += 1
        return real_depth(*args, **kwargs)

    def count_jpeg(*args, **kwargs):
        calls["jpeg"] += 1
        return real_jpeg(*args, **kwargs)

    def count_frame(self, i):
        calls["frame"].append(i)
        return real_frame(self, i)

    monkeypatch.setattr(sens, "decode_depth", count_depth)
    monkeypatch.setattr(sens, "decode_jpeg", count_jpeg)
    monkeypatch.setattr(SensReader, "frame", count_frame)
    report = prepare_scannet(root, tmp_path / "out", split="all", frame_skip=2, **SMALL)
    # Considered: 0 2 4 6 8 10; frame 4 has a -inf pose (not read), 6 has no depth.
    assert calls["frame"] == [0, 2, 6, 8, 10]
    # JPEGs are stored, never decoded to pixels (sens.check_jpeg only verifies them, at 1/8)
    assert calls["depth"] == 5 and calls["jpeg"] == 0
    assert report["frames_in_files"] == 11 and report["frames_considered"] == 6
    assert report["frames_read"] == 5 and report["pairs_written"] == 4
    assert report["frames_skipped"] == {"invalid_pose": 1, "too_few_valid_depth": 1,
                                        "damaged_pose": 0, "undecodable_color": 0,
                                        "non_finite_points": 0}
    assert report["damaged_frames"] == []  # lost tracking is not damage
    rows = load_rows(tmp_path / "out" / "scenes" / "scene0001_00")
    assert [r["frame_index"] for r in rows] == [0, 2, 8, 10]
    saved = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert saved["frames_skipped"] == report["frames_skipped"]


def test_jpeg_bytes_are_stored_exactly(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "root", "scene0002_00", 7)
    prepare_scannet(tmp_path / "root", tmp_path / "out", split="all", frame_skip=3, **SMALL)
    rows = load_rows(tmp_path / "out" / "scenes" / "scene0002_00")
    assert [r["frame_index"] for r in rows] == [0, 3, 6]
    with SensReader(path) as reader:
        for row in rows:
            assert row["image"]["bytes"] == reader.frame(row["frame_index"]).color_bytes
            assert row["scene_id"] == "scene0002_00"
            assert np.asarray(row["points"]).shape == (64, 3)


def test_bad_scenes_are_reported_and_the_rest_prepared(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", {"scene0000_00": 4, "scene0001_00": 4})
    broken = root / "scans" / "scene0001_00" / "scene0001_00.sens"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) - 3000])  # cut inside the last frames' payloads
    scenes = tmp_path / "scenes.txt"
    scenes.write_text("scene0000_00\nscene0001_00\nscene0009_00  # not downloaded\n")
    report = prepare_scannet(root, tmp_path / "out", scenes_file=scenes, frame_skip=1, **SMALL)
    assert report["scenes"] == {"total": 3, "prepared": 1, "resumed": 0, "failed": 2,
                                "not_reached": 0}
    errors = {e["scene"]: e for e in report["errors"]}
    assert str(broken) in errors["scene0001_00"]["error"]
    assert "byte offset" in errors["scene0001_00"]["error"]
    assert "scene0009_00.sens: file not found" in errors["scene0009_00"]["error"]
    assert [p.name for p in (tmp_path / "out" / "scenes").iterdir()] == ["scene0000_00"]

    result = CliRunner().invoke(main, ["prepare", "scannet", str(root), str(tmp_path / "o2"),
                                       "--scenes", str(scenes), "--points", "64",
                                       "--min-valid-points", "50"])
    assert result.exit_code == 1
    assert "scene0001_00" in result.output and "byte offset" in result.output
    assert "2 scene(s) failed" in result.output


def test_shards_together_equal_the_whole(tmp_path: Path) -> None:
    scenes = {f"scene000{i}_00": 3 for i in range(5)}
    root = make_root(tmp_path / "root", scenes)
    parts = [shard_scenes(list_scenes(root), (i, 2)) for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(scenes) and not set(parts[0]) & set(parts[1])
    prepare_scannet(root, tmp_path / "whole", frame_skip=2, **SMALL)
    for i in range(2):
        report = prepare_scannet(root, tmp_path / "parts", frame_skip=2, shard=(i, 2), **SMALL)
        assert report["scenes"]["total"] == len(parts[i])
        assert (tmp_path / "parts" / f"prepare_report.shard-{i}-of-2.json").is_file()
    assert_same_output(tmp_path / "whole", tmp_path / "parts")


def test_interrupted_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", {f"scene000{i}_00": 3 for i in range(3)})
    prepare_scannet(root, tmp_path / "reference", frame_skip=1, **SMALL)

    out = tmp_path / "out"

    class Interrupt(Exception):
        pass

    def stop_after_first(scene: dict) -> None:
        raise Interrupt(scene["scene_id"])

    with pytest.raises(Interrupt):
        prepare_scannet(root, out, frame_skip=1, on_scene_done=stop_after_first, **SMALL)
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["interrupted"] and report["scenes"]["not_reached"] == 2
    # Simulate a crash while the next scene was being written.
    stale = out / "scenes" / ".tmp-scene0001_00"
    stale.mkdir()
    (stale / "data-00000-of-00001.arrow").write_bytes(b"half written")

    done = []
    report = prepare_scannet(root, out, frame_skip=1, on_scene_done=done.append, **SMALL)
    assert [s["scene_id"] for s in done] == ["scene0001_00", "scene0002_00"]
    assert report["scenes"]["resumed"] == 1 and report["pairs_written"] == 9
    assert not stale.exists()
    assert_same_output(tmp_path / "reference", out)

    done.clear()
    again = prepare_scannet(root, out, frame_skip=1, on_scene_done=done.append, **SMALL)
    assert done == [] and again["scenes"]["resumed"] == 3
    assert again["frames_skipped"] == report["frames_skipped"]
    with pytest.raises(ValueError, match="other settings"):
        prepare_scannet(root, out, frame_skip=2, **SMALL)


def test_two_workers_give_the_same_dataset_as_one(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", {f"scene000{i}_00": 4 for i in range(3)})
    one = prepare_scannet(root, tmp_path / "one", frame_skip=2, workers=1, **SMALL)
    two = prepare_scannet(root, tmp_path / "two", frame_skip=2, workers=2, **SMALL)
    assert one["pairs_written"] == two["pairs_written"] == 6
    assert_same_output(tmp_path / "one", tmp_path / "two")


def test_split_lists_and_cli(tmp_path: Path) -> None:
    root = make_root(tmp_path / "ScanNet", {"scene0000_00": 3, "scene0001_00": 3})
    (root / "meta").mkdir()
    shutil.move(root / "scannetv2_train.txt", root / "meta" / "scannetv2_train.txt")
    write_split(root.parent / "scannetv2_val.txt", ["scene0001_00"])
    assert list_scenes(root, "train") == ["scene0000_00", "scene0001_00"]
    assert list_scenes(root, "val") == ["scene0001_00"]
    assert list_scenes(root, "all") == ["scene0000_00", "scene0001_00"]
    (root / "meta" / "scannetv2_train.txt").unlink()
    with pytest.raises(FileNotFoundError, match="scannetv2_train.txt not found"):
        list_scenes(root, "train")

    out = tmp_path / "out"
    args = ["prepare", "scannet", str(root), str(out), "--split", "val", "--frame-skip", "2",
            "--points", "64", "--min-valid-points", "50", "--shard", "0/1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "pairs written" in result.output
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["pairs_written"] == 2 and report["split"] == "val"
    bad = CliRunner().invoke(main, [*args[:-1], "2/2"])
    assert bad.exit_code == 2 and "0 <= I < N" in bad.output
