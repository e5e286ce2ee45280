"""Damaged inputs and killed runs of the `cd2p prepare` commands.

Real files are written with the format writers (``.sens``, ModelNet40 / ShapeNetPart text,
ScanObjectNN h5), then damaged the way disks and tools damage them: a pose overwritten with
3e38 or NaN in place, a JPEG payload cut short or replaced by noise, a ``nan`` in a shape file.
Every prepare command must skip (and report, naming the file) or refuse such data, and write
nothing non-finite. The kill test runs `cd2p prepare scannet --workers 2` in a subprocess,
kills it with SIGKILL mid-run and checks that its workers die with it and a rerun completes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from datasets import Image, load_from_disk
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cd2p.data.sens as sens
from cd2p.cli import main
from cd2p.data import scene_jobs
from cd2p.data.classification import load_classification_cache
from cd2p.data.common import EmptySplitError, NonFiniteError, read_shape_txt, require_finite
from cd2p.data.modelnet40 import prepare_modelnet40, write_modelnet40
from cd2p.data.pairs import PairDataset
from cd2p.data.scannet_files import read_mesh_ply, scene_files, write_mesh_ply, write_scene_meta
from cd2p.data.scannet_pairs import images_digest, pose_problem, prepare_scannet
from cd2p.data.scannet_scenes import (
    DEFAULT_LABEL_TABLE,
    load_scene,
    load_scene_split,
    prepare_scannet_scenes,
)
from cd2p.data.scanobjectnn import prepare_scanobjectnn, variant_file, write_scanobjectnn_h5
from cd2p.data.shapenetpart import load_partseg_cache, prepare_shapenetpart, write_shapenetpart
from cd2p.data.synthetic import generate_synthetic_scannet
from cd2p.data.teacher_targets import plan_teacher_targets, prepare_teacher_targets
from cd2p.models.teacher import Teacher

# The small .sens geometry of the preparation tests.
from test_prepare_scannet import COLOR_H, COLOR_W, DEPTH_H, DEPTH_W, K_COLOR, K_DEPTH, SMALL

CLI_SMALL = ["--points", "64", "--min-valid-points", "50"]
FRAME_HEADER = struct.Struct("<16f4Q")  # pose, timestamps, payload sizes (sens._FRAME)


# --------------------------------------------------------------------------- writers


def header(num_frames: int, intrinsic_depth: np.ndarray = K_DEPTH) -> sens.SensHeader:
    return sens.SensHeader(
        version=4, sensor_name="StructureSensor", intrinsic_color=K_COLOR,
        extrinsic_color=np.eye(4, dtype=np.float32), intrinsic_depth=intrinsic_depth,
        extrinsic_depth=np.eye(4, dtype=np.float32), color_compression=2,
        depth_compression=1, color_width=COLOR_W, color_height=COLOR_H, depth_width=DEPTH_W,
        depth_height=DEPTH_H, depth_shift=1000.0, num_frames=num_frames,
    )


def pose_of(i: int) -> np.ndarray:
    a = np.deg2rad(7.0 * i)
    pose = np.eye(4)
    pose[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    pose[:3, 3] = (1.0 + 0.05 * i, 2.0, 1.5)
    return pose


def depth_of(i: int) -> np.ndarray:
    u, v = np.arange(DEPTH_W)[None, :], np.arange(DEPTH_H)[:, None]
    return (1.0 + 0.04 * u + 0.02 * v + 0.01 * i).astype(np.float32)


def write_scene(root: Path, scene_id: str, num_frames: int, *, seed: int = 0,
                intrinsic_depth: np.ndarray = K_DEPTH, align: np.ndarray | None = None) -> Path:
    """``root/scans/<scene>/<scene>.sens`` with noise JPEGs, a slanted surface as depth."""
    rng = np.random.default_rng(seed)
    frames = [
        sens.SensFrame(
            index=i, camera_to_world=pose_of(i).astype(np.float32), timestamp_color=i,
            timestamp_depth=i,
            color_bytes=sens.encode_jpeg(rng.integers(0, 256, (COLOR_H, COLOR_W, 3),
                                                      dtype=np.uint8)),
            depth_bytes=sens.encode_depth(depth_of(i)),
        )
        for i in range(num_frames)
    ]
    scene_dir = root / "scans" / scene_id
    scene_dir.mkdir(parents=True, exist_ok=True)
    path = scene_dir / f"{scene_id}.sens"
    sens.write_sens(path, header(num_frames, intrinsic_depth), frames)
    meta: dict[str, object] = {"numColorFrames": num_frames}
    if align is not None:
        meta["axisAlignment"] = align
    write_scene_meta(scene_dir / f"{scene_id}.txt", meta)
    return path


def overwrite_pose(path: Path, frame: int, pose: np.ndarray) -> None:
    """Damage a written .sens in place: frame ``frame``'s stored pose becomes ``pose``."""
    with sens.SensReader(path) as reader:
        offset = reader.index[frame].offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.asarray(pose, dtype="<f4").tobytes())


def replace_color(path: Path, frame: int, payload: bytes) -> None:
    """Rewrite a .sens with frame ``frame``'s colour payload replaced (sizes follow)."""
    with sens.SensReader(path) as reader:
        head = reader.header
        frames = [reader.frame(i) for i in range(len(reader))]
    frames[frame].color_bytes = payload
    sens.write_sens(path, head, frames)


def scene_rows(scene_dir: Path) -> list[dict]:
    dataset = load_from_disk(str(scene_dir)).cast_column("image", Image(decode=False))
    return [dataset[i] for i in range(len(dataset))]


def assert_all_finite(out: Path) -> None:
    """Every float column of every prepared scene under ``out`` is finite."""
    for scene_dir in (out / "scenes").iterdir():
        if scene_dir.name.startswith("."):
            continue
        data = load_from_disk(str(scene_dir)).with_format("numpy")
        for column in ("points", "pose", "intrinsic_color", "intrinsic_depth"):
            assert np.isfinite(data[column]).all(), (scene_dir, column)


def assert_same_pairs(out_a: Path, out_b: Path) -> None:
    names = sorted(p.name for p in (out_a / "scenes").iterdir())
    assert names == sorted(p.name for p in (out_b / "scenes").iterdir())
    for name in names:
        rows_a, rows_b = scene_rows(out_a / "scenes" / name), scene_rows(out_b / "scenes" / name)
        assert len(rows_a) == len(rows_b)
        for a, b in zip(rows_a, rows_b, strict=True):
            assert a["image"]["bytes"] == b["image"]["bytes"]
            assert a["frame_index"] == b["frame_index"]
            np.testing.assert_array_equal(np.asarray(a["points"]), np.asarray(b["points"]))


# --------------------------------------------------------------------------- the helpers


def test_one_finiteness_check() -> None:
    assert require_finite(np.ones(3), "x") is not None
    assert require_finite(np.arange(3), "ints") is not None  # integers are always finite
    with pytest.raises(NonFiniteError, match=r"out\.bin: 2 of 4 values are not finite "
                                             r"\(nan, -inf\); refusing to write"):
        require_finite(np.array([1.0, np.nan, -np.inf, 2.0]), "out.bin")
    with pytest.raises(NonFiniteError, match="not finite"):
        require_finite(torch.tensor([1.0, float("inf")], dtype=torch.float16), "targets")


def test_pose_checks() -> None:
    assert pose_problem(pose_of(3)) is None
    assert pose_problem(np.full((4, 4), -np.inf))[0] == "invalid_pose"  # ScanNet: lost tracking
    nan = pose_of(1)
    nan[0, 1] = np.nan
    assert pose_problem(nan) == ("damaged_pose", "pose: 1 of 16 values are not finite (nan)")
    huge = pose_of(1)
    huge[1, 1] = 3e38  # finite in float32, but overflows to inf once it multiplies a point
    assert pose_problem(huge)[0] == "damaged_pose" and "orthonormal" in pose_problem(huge)[1]
    far = pose_of(1)
    far[2, 3] = 3e38  # would turn every point into the same float32 number
    assert "translation" in pose_problem(far)[1]


# --------------------------------------------------------------------------- prepare scannet


def test_damaged_sens_frames_are_skipped_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "root"
    path = write_scene(root, "scene0000_00", 8)
    huge, nan = pose_of(2), pose_of(5)
    huge[0, 0] = 3e38
    nan[1, 3] = np.nan
    overwrite_pose(path, 2, huge)
    overwrite_pose(path, 5, nan)
    # a second scene whose axisAlignment is finite but absurd: every point overflows
    write_scene(root, "scene0001_00", 3, seed=1, align=np.diag([3e38, 3e38, 3e38, 1.0]))
    out = tmp_path / "out"
    report = prepare_scannet(root, out, split="all", frame_skip=1, **SMALL)

    assert report["pairs_written"] == 6 and report["errors"] == []
    assert report["frames_skipped"]["damaged_pose"] == 2
    assert report["frames_skipped"]["non_finite_points"] == 3
    damaged = {(d["scene"], d["frame"]): d for d in report["damaged_frames"]}
    assert sorted(damaged) == [("scene0000_00", 2), ("scene0000_00", 5), ("scene0001_00", 0),
                               ("scene0001_00", 1), ("scene0001_00", 2)]
    assert damaged[("scene0000_00", 2)]["file"] == str(path)
    assert "orthonormal" in damaged[("scene0000_00", 2)]["detail"]
    assert "nan" in damaged[("scene0000_00", 5)]["detail"]
    assert damaged[("scene0001_00", 0)]["reason"] == "non_finite_points"
    assert [r["frame_index"] for r in scene_rows(out / "scenes" / "scene0000_00")] == \
        [0, 1, 3, 4, 6, 7]
    assert_all_finite(out)
    saved = json.loads((out / "prepare_report.json").read_text())
    assert saved["damaged_frames"] == report["damaged_frames"]

    result = CliRunner().invoke(main, ["prepare", "scannet", str(root), str(tmp_path / "o2"),
                                       "--split", "all", "--frame-skip", "1", *CLI_SMALL])
    assert result.exit_code == 0, result.output
    assert f"skipped {path} frame 2: damaged pose" in result.output
    assert f"skipped {path} frame 5: damaged pose" in result.output
    assert "skipped: non finite points" in result.output


def test_non_finite_or_overflowing_intrinsics_refuse_the_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    nan_k = K_DEPTH.copy()
    nan_k[0, 2] = np.nan
    tiny_k = K_DEPTH.copy()
    tiny_k[0, 0] = tiny_k[1, 1] = 1e-38  # rays of 1e39: back-projection overflows
    bad_nan = write_scene(root, "scene0000_00", 3, intrinsic_depth=nan_k)
    bad_tiny = write_scene(root, "scene0001_00", 3, intrinsic_depth=tiny_k)
    write_scene(root, "scene0002_00", 3)
    report = prepare_scannet(root, tmp_path / "out", split="all", frame_skip=1, **SMALL)
    errors = {e["scene"]: e for e in report["errors"]}
    assert errors["scene0000_00"]["file"] == str(bad_nan)
    assert "intrinsic depth: 1 of 16 values are not finite (nan)" in errors["scene0000_00"]["error"]
    assert errors["scene0001_00"]["file"] == str(bad_tiny)
    assert "non-finite points" in errors["scene0001_00"]["error"]
    assert report["pairs_written"] == 3
    assert_all_finite(tmp_path / "out")


def test_undecodable_jpeg_frames_are_skipped_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "root"
    path = write_scene(root, "scene0000_00", 6)
    with sens.SensReader(path) as reader:
        good = reader.frame(1).color_bytes
    replace_color(path, 1, good[: len(good) // 2])  # truncated
    replace_color(path, 3, bytes(np.random.default_rng(0).integers(0, 256, 900, np.uint8)))
    replace_color(path, 4, sens.encode_jpeg(np.zeros((10, 10, 3), np.uint8)))  # wrong size
    report = prepare_scannet(root, tmp_path / "out", split="all", frame_skip=1, **SMALL)
    assert report["frames_skipped"]["undecodable_color"] == 3
    assert report["pairs_written"] == 3
    damaged = {d["frame"]: d for d in report["damaged_frames"]}
    assert sorted(damaged) == [1, 3, 4]
    assert all(d["file"] == str(path) and d["reason"] == "undecodable_color"
               for d in damaged.values())
    assert "truncated" in damaged[1]["detail"]
    assert "not a decodable JPEG" in damaged[3]["detail"]
    assert "10x10, the header says 64x48" in damaged[4]["detail"]
    rows = scene_rows(tmp_path / "out" / "scenes" / "scene0000_00")
    assert [r["frame_index"] for r in rows] == [0, 2, 5]
    assert report["time_split_seconds"]["color_check"] > 0


def test_empty_roots_and_lists_are_one_error_line(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "scans" / "scene0000_00").mkdir(parents=True)  # a scene folder without its .sens
    runner = CliRunner()
    for extra in (["--split", "all"], ["--split", "train"]):
        if extra[1] == "train":
            (root / "scannetv2_train.txt").write_text("scene0000_00\nscene0001_00\n")
        result = runner.invoke(main, ["prepare", "scannet", str(root), str(tmp_path / "out"),
                                      *extra])
        assert result.exit_code == 1, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert str(root) in lines[0] and "Traceback" not in result.output
    assert "no scene to prepare" in runner.invoke(
        main, ["prepare", "scannet", str(root), str(tmp_path / "o"), "--split", "all"]).output
    assert not (tmp_path / "out").exists()  # nothing written for nothing

    write_scene(root, "scene0000_00", 2)
    result = runner.invoke(main, ["prepare", "scannet", str(root), str(tmp_path / "out"),
                                  "--split", "all", "--shard", "1/2", *CLI_SMALL])
    assert result.exit_code == 1 and "shard 1/2 of the 1 scene(s) is empty" in result.output
    empty_list, labels = tmp_path / "none.txt", tmp_path / "labels.tsv"
    empty_list.write_text("# nothing yet\n")
    labels.write_text("id\traw_category\tnyu40id\n1\tchair\t5\n")
    result = runner.invoke(main, ["prepare", "scannet-scenes", str(root), str(tmp_path / "s"),
                                  "--scenes", str(empty_list), "--labels", str(labels)])
    assert result.exit_code == 1 and f"scene list {empty_list} names no scene" in result.output

    # a prepared root whose scenes hold no pair cannot be trained on
    prepare_scannet(root, tmp_path / "pairs", split="all", frame_skip=1,
                    **{**SMALL, "min_valid_points": 10**6})
    with pytest.raises(EmptySplitError, match=r"pairs: no pairs in its 1 scene"):
        PairDataset(tmp_path / "pairs")


def test_scannet_scenes_refuses_a_mesh_with_a_nan_vertex(tmp_path: Path) -> None:
    root = tmp_path / "root"
    generate_synthetic_scannet(root, num_scenes=2, frames_per_scene=1, seed=3)
    mesh_path = scene_files(root / "scans", "scene0001_00")["mesh"]
    mesh = read_mesh_ply(mesh_path)
    vertices = mesh.vertices.copy()
    vertices[3, 1] = np.nan
    write_mesh_ply(mesh_path, vertices, mesh.colors, mesh.faces)
    report = prepare_scannet_scenes(root, tmp_path / "out", labels=root / DEFAULT_LABEL_TABLE,
                                    progress=False)
    (error,) = report["errors"]
    assert error["scene"] == "scene0001_00" and error["file"] == str(mesh_path)
    # the rotation of axisAlignment spreads the one NaN over the vertex's three coordinates
    assert "vertices after axisAlignment: 3 of" in error["error"]
    assert "values are not finite (nan)" in error["error"]
    (scene,) = load_scene_split(tmp_path / "out", "all").scene_ids
    tensors = load_scene(tmp_path / "out", scene)
    assert all(torch.isfinite(tensors[k]).all() for k in ("coord", "box_center", "box_size"))


# --------------------------------------------------------------------------- object benchmarks


def shapes(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    return [rng.normal(size=(40, 6)).astype(np.float32) for _ in range(count)]


def test_modelnet40_shapes_with_nan_or_inf_are_skipped_and_listed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = write_modelnet40(tmp_path / "mn", ["chair", "night_stand"], {
        "train": [("chair", s) for s in shapes(rng, 3)] + [("night_stand", s)
                                                          for s in shapes(rng, 2)],
        "test": [("chair", s) for s in shapes(rng, 2)],
    })
    nan_file = root / "chair" / "chair_0002.txt"
    inf_file = root / "night_stand" / "night_stand_0001.txt"
    for file, damaged in ((nan_file, "nan,0.1,0.2,0,0,1"), (inf_file, "0.5,-inf,0.2,0,0,1")):
        lines = file.read_text().splitlines()
        lines[7] = damaged
        file.write_text("\n".join(lines) + "\n")
    with pytest.raises(NonFiniteError, match=str(nan_file)):
        read_shape_txt(nan_file)

    out = tmp_path / "cache"
    result = CliRunner().invoke(main, ["prepare", "modelnet40", str(root), str(out),
                                       "--points", "16"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert f"skipped {nan_file}" in output and f"skipped {inf_file}" in output
    assert "2 skipped" in output
    meta = json.loads((out / "meta.json").read_text())
    assert {(s["split"], s["id"], s["file"]) for s in meta["skipped"]} == {
        ("train", "chair_0002", str(nan_file)), ("train", "night_stand_0001", str(inf_file))}
    assert "not finite (nan)" in next(s["reason"] for s in meta["skipped"]
                                      if s["id"] == "chair_0002")
    train = load_classification_cache(out, "train")
    assert len(train) == 3 and "chair_0002" not in train.shape_ids
    assert torch.isfinite(train.points).all()

    # every shape of a split damaged: refused, naming the split's list file
    for shape_id in ("chair_0004", "chair_0005"):
        (root / "chair" / f"{shape_id}.txt").write_text("nan nan nan 0 0 1\n")
    with pytest.raises(EmptySplitError, match=r"modelnet40_test\.txt \(ModelNet40 test\): no "
                                              r"usable shapes \(all 2 skipped\)"):
        prepare_modelnet40(root, tmp_path / "cache2", num_points=16, show_progress=False)
    assert not (tmp_path / "cache2").exists()


def test_modelnet40_huge_finite_values_stay_finite(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train = shapes(rng, 2)
    train[1][:5, :3] = 3e38  # float32 sums of these overflow; the preparer works in float64
    root = write_modelnet40(tmp_path / "mn", ["chair"], {
        "train": [("chair", s) for s in train], "test": [("chair", s) for s in shapes(rng, 1)]})
    prepare_modelnet40(root, tmp_path / "cache", num_points=16, show_progress=False)
    points = load_classification_cache(tmp_path / "cache", "train").points
    assert torch.isfinite(points).all() and points.abs().max() <= 1.0 + 1e-6


def test_shapenetpart_shapes_with_nan_are_skipped_and_listed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def shape(i: int):
        return ("03797390", f"m{i}", rng.normal(size=(30, 6)).astype(np.float32),
                np.full(30, 36 + i % 2))

    root = write_shapenetpart(tmp_path / "snp", [("Mug", "03797390")], {
        "train": [shape(0), shape(1), shape(2)], "val": [shape(3)], "test": [shape(4)]})
    bad = root / "03797390" / "m1.txt"
    lines = bad.read_text().splitlines()
    lines[3] = "0.1 nan 0.3 0 0 1 36"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "cache"
    result = CliRunner().invoke(main, ["prepare", "shapenetpart", str(root), str(out)])
    assert result.exit_code == 0, result.output
    assert f"skipped {bad}" in " ".join(result.output.split())
    meta = json.loads((out / "meta.json").read_text())
    assert [(s["split"], s["id"], s["file"]) for s in meta["skipped"]] == [
        ("train", "03797390/m1", str(bad))]
    train = load_partseg_cache(out, "train")
    assert train.shape_ids == ["03797390/m0", "03797390/m2"]
    assert torch.isfinite(train.points).all()

    # a split list with nothing in it is refused when preparing...
    (root / "train_test_split" / "shuffled_val_file_list.json").write_text("[]")
    with pytest.raises(EmptySplitError, match=r"shuffled_val_file_list\.json \(ShapeNetPart "
                                              r"val\): no shapes"):
        prepare_shapenetpart(root, tmp_path / "cache2", show_progress=False)
    # ...and a cache whose split is empty (written by hand) when loading it
    empty = load_file(str(out / "val.safetensors"))
    empty = {"points": empty["points"][:0], "labels": empty["labels"][:0],
             "offsets": empty["offsets"][:1], "categories": empty["categories"][:0]}
    save_file(empty, str(out / "val.safetensors"))
    with pytest.raises(EmptySplitError, match=r"val\.safetensors \(split 'val'\): no shapes"):
        load_partseg_cache(out, "trainval")


def test_scanobjectnn_clouds_with_nan_are_skipped_keeping_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "h5"
    for split, count in (("train", 4), ("test", 2)):
        points = rng.normal(size=(count, 32, 3)).astype(np.float32)
        if split == "train":
            points[1, 5, 2] = np.nan
            points[2, 0, 0] = np.inf
        write_scanobjectnn_h5(variant_file(root, "objbg", split), points, np.arange(count) % 3)
    (out,) = prepare_scanobjectnn(root, tmp_path / "out", ["objbg"], show_progress=False)
    meta = json.loads((out / "meta.json").read_text())
    train_file = str(variant_file(root, "objbg", "train"))
    assert [(s["id"], s["file"]) for s in meta["skipped"]] == [
        ("objbg_train_00001", train_file), ("objbg_train_00002", train_file)]
    assert meta["skipped"][0]["reason"] == "cloud 1: 1 of 96 values are not finite (nan)"
    train = load_classification_cache(out, "train")
    assert train.shape_ids == ["objbg_train_00000", "objbg_train_00003"]
    assert train.labels.tolist() == [0, 0] and torch.isfinite(train.points).all()

    # an empty cache split is an error naming its file when loaded
    save_file({"points": torch.zeros(0, 32, 3), "labels": torch.zeros(0, dtype=torch.int64)},
              str(out / "test.safetensors"))
    with pytest.raises(EmptySplitError, match=r"test\.safetensors \(split 'test'\): no shapes"):
        load_classification_cache(out, "test")


# --------------------------------------------------------------------------- teacher targets


def test_teacher_recomputes_targets_of_re_prepared_scenes(tmp_path: Path, tiny_model_name) -> None:
    root, out = tmp_path / "root", tmp_path / "pairs"
    write_scene(root, "scene0000_00", 3, seed=0)
    write_scene(root, "scene0001_00", 2, seed=1)
    prepare_scannet(root, out, split="all", frame_skip=1, **SMALL)
    teacher = Teacher.random("clip", seed=0, model_name=tiny_model_name)
    first = prepare_teacher_targets(out, teacher, batch_size=4)
    assert first.scenes_done == ["scene0000_00", "scene0001_00"]
    target = out / "targets" / "clip" / "scene0000_00.safetensors"
    with safe_open(str(target), framework="pt") as f:
        before, meta = f.get_tensor("targets"), f.metadata()
    rows = scene_rows(out / "scenes" / "scene0000_00")
    assert meta["images_sha256"] == images_digest([r["image"]["bytes"] for r in rows])
    # the digest prepare scannet stored equals the one hashed from the dataset's bytes
    stats = json.loads((out / "scenes" / "scene0000_00" / "cd2p_scene.json").read_text())
    assert stats["images_sha256"] == meta["images_sha256"]

    # the scene is prepared again from other images, with the same number of rows
    write_scene(root, "scene0000_00", 3, seed=7)
    shutil.rmtree(out / "scenes" / "scene0000_00")
    prepare_scannet(root, out, split="all", frame_skip=1, **SMALL)
    with pytest.raises(ValueError, match="computed from other images"):
        PairDataset(out, target="clip")  # training would silently mix them up
    plan = plan_teacher_targets(out, teacher)
    assert [job.scene_id for job in plan.to_compute] == ["scene0000_00"]
    assert "other images" in plan.outdated["scene0000_00"]
    again = prepare_teacher_targets(out, teacher, batch_size=4)
    assert again.scenes_done == ["scene0000_00"] and again.scenes_skipped == ["scene0001_00"]
    with safe_open(str(target), framework="pt") as f:
        after, meta_after = f.get_tensor("targets"), f.metadata()
    assert after.shape == before.shape and not torch.equal(after, before)
    assert meta_after["images_sha256"] != meta["images_sha256"]
    assert len(PairDataset(out, target="clip")) == 5

    # targets written before the digest existed are recomputed once, and said so
    other = out / "targets" / "clip" / "scene0001_00.safetensors"
    with safe_open(str(other), framework="pt") as f:
        old_meta = {k: v for k, v in f.metadata().items() if k != "images_sha256"}
        save_file({"targets": f.get_tensor("targets")}, str(other), metadata=old_meta)
    result = CliRunner().invoke(main, ["prepare", "teacher", str(out), "--random-teacher",
                                       "--target", "clip", "--device", "cpu",
                                       "--model-name", tiny_model_name])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "1 to compute (2 images)" in output and "no images_sha256" in output
    assert plan_teacher_targets(out, teacher).to_compute == []


# --------------------------------------------------------------------------- kill -9


def test_temporary_scene_names_never_collide(tmp_path: Path) -> None:
    scenes = tmp_path / "scenes"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(gone.stdout)  # a process that has exited
    names = {"legacy": ".tmp-scene0001_00", "dead": f".tmp-scene0001_00.{dead}-0a1b",
             "live": f".tmp-scene0001_00.{os.getppid()}-2c3d",  # e.g. an orphan still writing
             "other": f".tmp-scene0001_001.{dead}-4e5f"}  # another scene's
    for name in names.values():
        (scenes / name).mkdir(parents=True)
    tmp = scene_jobs.fresh_tmp_dir(scenes, "scene0001_00")
    assert tmp.name.startswith(f".tmp-scene0001_00.{os.getpid()}-")
    left = {p.name for p in scenes.iterdir()}
    assert left == {names["live"], names["other"]}
    assert scene_jobs.fresh_tmp_dir(scenes, "scene0001_00") != tmp  # one per call

    # two writers of one scene (an orphan and a rerun): the first to commit wins, the other's
    # temporary is dropped instead of failing the run
    final = scenes / "scene0001_00"
    for k, where in enumerate((tmp, scenes / names["live"])):
        where.mkdir(exist_ok=True)
        (where / "data.arrow").write_text(f"writer {k}")
        scene_jobs.commit_scene_dir(where, final, {"writer": k})
    assert (final / "data.arrow").read_text() == "writer 0"
    assert not tmp.exists() and not (scenes / names["live"]).exists()



def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait to be reaped by init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_takes_the_workers_along_and_a_rerun_completes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    scenes = [f"scene{i:04d}_00" for i in range(8)]
    for i, scene in enumerate(scenes):
        write_scene(root, scene, 20, seed=i)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cd2p", "prepare", "scannet", str(root), str(out),
               "--split", "all", "--frame-skip", "1", "--workers", "2", *CLI_SMALL]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
    parent = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    # Workers are spawned by the parent: its children are the two workers and
    # multiprocessing's resource tracker; all of them must go when it is killed.
    try:
        workers: set[int] = set()
        deadline = time.monotonic() + 120
        # kill once the workers are busy: the first scene is written, others are not yet
        while time.monotonic() < deadline and parent.poll() is None:
            workers.update(_children(parent.pid))
            done = [p for p in (out / "scenes").glob("scene*")] if out.is_dir() else []
            if done:
                break
            time.sleep(0.02)
        workers.update(_children(parent.pid))
        assert parent.poll() is None, "the run ended before it could be killed"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert len(workers) >= 2

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.05)
    assert not [pid for pid in workers if _running(pid)], "a worker outlived its parent"
    written = sorted(p.name for p in (out / "scenes").iterdir())
    assert len([n for n in written if not n.startswith(".")]) < len(scenes)  # killed mid-run
    time.sleep(0.5)  # nothing goes on writing
    assert sorted(p.name for p in (out / "scenes").iterdir()) == written

    # An immediate rerun (in this process: the CLI's start-up was paid above) resumes, drops
    # the killed workers' temporaries and gives what a clean run gives.
    report = prepare_scannet(root, out, split="all", frame_skip=1, workers=2, **SMALL)
    assert report["scenes"]["resumed"] >= 1 and report["errors"] == []
    assert report["scenes"]["resumed"] + report["scenes"]["prepared"] == len(scenes)
    assert not [p for p in (out / "scenes").iterdir() if p.name.startswith(".")]
    prepare_scannet(root, tmp_path / "clean", split="all", frame_skip=1, **SMALL)
    assert_same_pairs(tmp_path / "clean", out)
