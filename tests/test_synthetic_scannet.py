"""The synthetic ScanNet generator writes a real ScanNet layout that our readers parse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.spatial import cKDTree

from cd2p.cli import main
from cd2p.data import scannet_files as sf
from cd2p.data.sens import SensReader, is_valid_pose
from cd2p.data.synthetic import MESH_EDGE, build_room, generate_synthetic_scannet

SCENES, FRAMES = 2, 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("scannet")
    summary = generate_synthetic_scannet(root, num_scenes=SCENES, frames_per_scene=FRAMES, seed=7)
    return root, summary


def back_project(depth: np.ndarray, intrinsic: np.ndarray) -> np.ndarray:
    """Valid depth pixels -> camera-frame points (N, 3), written here independently."""
    v, u = np.nonzero(depth > 0)
    z = depth[v, u]
    x = (u - intrinsic[0, 2]) * z / intrinsic[0, 0]
    y = (v - intrinsic[1, 2]) * z / intrinsic[1, 1]
    return np.stack([x, y, z], axis=1)


def transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def test_layout_and_every_file_parses(dataset):
    root, summary = dataset
    assert summary.scenes == ["scene0000_00", "scene0001_00"]
    assert sf.read_split(root / "scannetv2_train.txt") == ["scene0000_00"]
    assert sf.read_split(root / "scannetv2_val.txt") == ["scene0001_00"]
    header = (root / "scannetv2-labels.combined.tsv").read_text().splitlines()[0].split("\t")
    assert header[:6] == ["id", "raw_category", "category", "count", "nyu40id", "eigen13id"]
    table = sf.raw_to_nyu40(sf.read_label_table(root / "scannetv2-labels.combined.tsv"))
    assert table["wall"] == 1 and table["floor"] == 2 and table["chair"] == 5
    for scene in summary.scenes:
        files = sf.scene_files(root / "scans", scene)
        assert all(path.is_file() for path in files.values()), files
        mesh = sf.read_mesh_ply(files["mesh"])
        assert mesh.vertices.shape[1] == 3 and len(mesh.vertices) > 2000
        assert mesh.colors.shape == (len(mesh.vertices), 4)
        assert mesh.faces.shape[1] == 3 and mesh.faces.max() < len(mesh.vertices)
        assert list(mesh.vertex_properties) == ["x", "y", "z", "red", "green", "blue", "alpha"]
        labels = sf.read_mesh_ply(files["labels"])
        np.testing.assert_array_equal(labels.vertices, mesh.vertices)
        np.testing.assert_array_equal(labels.faces, mesh.faces)
        assert len(sf.read_segs(files["segs"])) == len(mesh.vertices)
        aggregation = json.loads(files["aggregation"].read_text())
        assert aggregation["sceneId"] == f"scannet.{scene}"
        assert {"id", "objectId", "segments", "label"} <= set(aggregation["segGroups"][0])
        meta = sf.read_scene_meta(files["meta"])
        assert int(meta["numColorFrames"]) == int(meta["numDepthFrames"]) == FRAMES
        assert (meta["colorWidth"], meta["depthWidth"]) == ("160", "80")
        alignment = sf.axis_alignment(meta)
        assert not np.allclose(alignment, np.eye(4), atol=1e-3)  # rooms are not pre-aligned
        np.testing.assert_allclose(alignment[:3, :3] @ alignment[:3, :3].T, np.eye(3), atol=1e-5)
        assert alignment[2, 2] == pytest.approx(1.0)  # a rotation about z (gravity is z)


def test_sens_reads_back_with_registered_cameras(dataset):
    root, summary = dataset
    for scene in summary.scenes:
        meta = sf.read_scene_meta(sf.scene_files(root / "scans", scene)["meta"])
        with SensReader(root / "scans" / scene / f"{scene}.sens") as reader:
            h = reader.header
            assert len(reader) == FRAMES
            assert (h.color_width, h.color_height, h.depth_width, h.depth_height) == (
                160, 120, 80, 60)  # fmt: skip
            assert (h.color_compression, h.depth_compression, h.depth_shift) == (2, 1, 1000.0)
            # One camera, two resolutions: depth intrinsics are the colour ones scaled by 1/2.
            k_c, k_d = h.intrinsic_color, h.intrinsic_depth
            assert k_d[0, 0] == pytest.approx(k_c[0, 0] / 2)
            assert k_d[0, 2] == pytest.approx((k_c[0, 2] + 0.5) / 2 - 0.5)
            assert float(meta["fx_depth"]) == pytest.approx(k_d[0, 0], abs=1e-5)
            assert reader.frame(0).decode_color().shape == (120, 160, 3)
            assert len(reader.imu()) == FRAMES


def test_depth_back_projects_onto_the_mesh(dataset):
    root, summary = dataset
    scene = summary.scenes[0]
    files = sf.scene_files(root / "scans", scene)
    alignment = sf.axis_alignment(sf.read_scene_meta(files["meta"]))
    mesh_aligned = transform(alignment, sf.read_mesh_ply(files["mesh"]).vertices.astype(float))
    tree = cKDTree(mesh_aligned)
    lo, hi = mesh_aligned.min(axis=0), mesh_aligned.max(axis=0)
    assert lo[2] == pytest.approx(0.0, abs=1e-4)  # the aligned floor is z = 0
    checked = 0
    with SensReader(files["sens"]) as reader:
        for i in range(len(reader)):
            pose = reader.pose(i).astype(float)
            depth = reader.frame(i).decode_depth(reader.header.depth_shift)
            if not is_valid_pose(pose) or not depth.any():
                continue
            camera = back_project(depth, reader.header.intrinsic_depth.astype(float))
            points = transform(alignment @ pose, camera)
            assert (points >= lo - 0.01).all() and (points <= hi + 0.01).all()
            # Low points are floor (z = 0 exactly, up to mm quantisation) or the feet of
            # walls and furniture; a wrong pose, alignment or intrinsic would tilt the floor.
            low = points[points[:, 2] < 0.05, 2]
            on_floor = np.abs(low) < 2e-3
            assert on_floor.sum() > 100 and on_floor.mean() > 0.8
            # Every measured point lies on the mesh: within a triangle's reach of a vertex.
            distance, _ = tree.query(points)
            assert distance.max() < MESH_EDGE * 0.7
            checked += 1
    assert checked >= FRAMES - 2


def test_faulty_frames_are_as_reported(dataset):
    root, summary = dataset
    for scene in summary.scenes:
        invalid, empty = summary.invalid_pose_frames[scene], summary.empty_depth_frames[scene]
        assert len(invalid) == len(empty) == 1 and not set(invalid) & set(empty)
        with SensReader(root / "scans" / scene / f"{scene}.sens") as reader:
            for i in range(len(reader)):
                pose = reader.pose(i)
                depth = reader.frame(i).decode_depth(reader.header.depth_shift)
                if i in invalid:
                    assert np.isneginf(pose).all()
                else:
                    assert is_valid_pose(pose)
                    np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-5)
                if i in empty:
                    assert not depth.any()
                else:
                    assert (depth > 0).mean() > 0.9  # 1% sensor dropouts, the rest is seen


def test_labels_agree_with_segments_and_aggregation(dataset):
    root, summary = dataset
    table = sf.raw_to_nyu40(sf.read_label_table(root / "scannetv2-labels.combined.tsv"))
    for scene in summary.scenes:
        files = sf.scene_files(root / "scans", scene)
        segs = sf.read_segs(files["segs"])
        groups = sf.read_aggregation(files["aggregation"])
        semantic, instance = sf.vertex_labels(segs, groups, table)
        labels_ply = sf.read_mesh_ply(files["labels"]).labels
        np.testing.assert_array_equal(labels_ply, semantic)
        assert {1, 2} <= set(semantic.tolist())  # walls and floor
        assert len(set(semantic.tolist()) - {0, 1, 2, 8, 11}) >= 2  # furniture classes
        assert instance.max() == len(groups)
        # Segments never straddle two objects.
        for seg in np.unique(segs):
            assert len(np.unique(instance[segs == seg])) == 1


def test_furniture_does_not_overlap():
    for seed in range(5):
        room = build_room(np.random.default_rng(seed))
        rects = {}
        for part in room.parts:
            label = room.objects[part.obj].label
            if label in ("floor", "wall", "door", "picture"):
                continue
            lo, hi = part.lo[:2] - part.radius, part.hi[:2] + part.radius
            old = rects.get(part.obj)
            rects[part.obj] = (lo, hi) if old is None else (np.minimum(old[0], lo),
                                                            np.maximum(old[1], hi))  # fmt: skip
        boxes = list(rects.values())
        assert len(boxes) >= 3
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                (alo, ahi), (blo, bhi) = boxes[a], boxes[b]
                assert not ((alo < bhi).all() and (blo < ahi).all()), (seed, a, b)


def test_same_seed_same_bytes(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for name in ("a", "b"):
        generate_synthetic_scannet(tmp_path / name, num_scenes=1, frames_per_scene=3, seed=11)
    generate_synthetic_scannet(tmp_path / "c", num_scenes=1, frames_per_scene=3, seed=12)
    first, second, other = (files(tmp_path / n) for n in ("a", "b", "c"))
    assert len(first) == 10 and first == second  # 9 ScanNet files + the synthetic marker
    sens = Path("scans/scene0000_00/scene0000_00.sens")
    assert first[sens] != other[sens]


def test_cli_writes_the_dataset(tmp_path):
    out = tmp_path / "synthetic"
    result = CliRunner().invoke(
        main, ["synthetic", "scannet", str(out), "--scenes", "2", "--frames", "3", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "scene0001_00" in result.output and "val" in result.output
    assert (out / "scans" / "scene0001_00" / "scene0001_00.sens").is_file()
    with SensReader(out / "scans" / "scene0000_00" / "scene0000_00.sens") as reader:
        assert len(reader) == 3
    bad = CliRunner().invoke(main, ["synthetic", "scannet", str(out), "--color-size", "160"])
    assert bad.exit_code != 0 and "WIDTHxHEIGHT" in bad.output
