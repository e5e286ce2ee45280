"""`cd2p prepare scannet-scenes` on a small synthetic ScanNet whose room model is known."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cd2p.cli import main
from cd2p.data import scannet_files as sf
from cd2p.data.scannet_scenes import (
    DET_CLASS_NAMES,
    SEG_CLASS_NAMES,
    load_scene,
    load_scene_split,
    nyu40_to_det,
    nyu40_to_seg,
    prepare_scannet_scenes,
)
from cd2p.data.synthetic import CATEGORIES, build_room, generate_synthetic_scannet, room_mesh

SEED, SCENES = 11, ("scene0000_00", "scene0001_00", "scene0002_00")
TABLE = "scannetv2-labels.combined.tsv"
# ScanNet's benchmark classes and VoteNet's detection classes (nyu40 ids), written out here.
BENCHMARK_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
DETECTION_IDS = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
DAMAGED = "scene0001_00"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scannet")
    summary = generate_synthetic_scannet(root, num_scenes=len(SCENES), frames_per_scene=2,
                                         seed=SEED)
    assert summary.splits == {"train": list(SCENES[:2]), "val": list(SCENES[2:])}
    return root


@pytest.fixture(scope="module")
def prepared(root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "out"
    report = prepare_scannet_scenes(root, out, labels=root / TABLE, progress=False)
    return out, report


def prepare(root: Path, out: Path, **kwargs) -> dict:
    return prepare_scannet_scenes(root, out, **{"labels": root / TABLE, "progress": False,
                                                **kwargs})


def copy_root(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "root"))


def scene_file(root: Path, scene: str, key: str) -> Path:
    return sf.scene_files(root / "scans", scene)[key]


def expected_scene(index: int) -> dict:
    """Per-vertex labels, instances and boxes from the generator's room model (aligned frame),
    rebuilt with the generator's generator: ``default_rng([seed, scene index])``."""
    room = build_room(np.random.default_rng([SEED, index]))
    vertices, _, part_of_vertex = room_mesh(room)
    obj = np.array([p.obj for p in room.parts])[part_of_vertex]
    nyu40 = np.array([CATEGORIES[o.label].nyu40id if o.label else 0 for o in room.objects])
    annotated = [i for i, o in enumerate(room.objects) if o.label]  # objectId = rank here
    instance_of = np.zeros(len(room.objects), dtype=np.int64)
    instance_of[annotated] = np.arange(1, len(annotated) + 1)
    seg_of = {n: i for i, n in enumerate(BENCHMARK_IDS)}
    boxes = [
        (instance_of[o], DETECTION_IDS.index(nyu40[o]),
         (vertices[obj == o].min(0) + vertices[obj == o].max(0)) / 2,
         vertices[obj == o].max(0) - vertices[obj == o].min(0))
        for o in annotated if nyu40[o] in DETECTION_IDS
    ]
    return {
        "room": room,
        "coord": vertices,
        "semantic": np.array([seg_of.get(int(n), -1) for n in nyu40])[obj],
        "instance": instance_of[obj],
        "boxes": boxes,
    }


def same_files(out_a: Path, out_b: Path) -> None:
    names = sorted(p.name for p in (out_a / "scenes").iterdir())
    assert names == sorted(p.name for p in (out_b / "scenes").iterdir())
    for name in names:
        a, b = out_a / "scenes" / name, out_b / "scenes" / name
        assert (a / "scene.safetensors").read_bytes() == (b / "scene.safetensors").read_bytes()
        stats_a, stats_b = (json.loads((d / "cd2p_scene.json").read_text()) for d in (a, b))
        stats_a.pop("seconds"), stats_b.pop("seconds")
        assert stats_a == stats_b


# --------------------------------------------------------------------------- labels


def test_label_mapping_and_ignore() -> None:
    ids = np.array([[0, 1, 2, 13, 39], [40, 41, -3, 24, 36]])
    np.testing.assert_array_equal(nyu40_to_seg(ids), [[-1, 0, 1, -1, 19], [-1, -1, -1, 14, 18]])
    np.testing.assert_array_equal(nyu40_to_det(ids), [[-1, -1, -1, -1, 17], [-1, -1, -1, 12, 16]])
    assert nyu40_to_seg(ids).dtype == np.int64
    all_ids = np.arange(41)
    assert sorted(all_ids[nyu40_to_seg(all_ids) >= 0]) == list(BENCHMARK_IDS)
    assert sorted(all_ids[nyu40_to_det(all_ids) >= 0]) == list(DETECTION_IDS)
    assert len(SEG_CLASS_NAMES) == 20 and len(DET_CLASS_NAMES) == 18
    assert SEG_CLASS_NAMES[nyu40_to_seg(np.array([33]))[0]] == "toilet"
    assert DET_CLASS_NAMES[nyu40_to_det(np.array([39]))[0]] == "garbagebin"
    with pytest.raises(ValueError, match="integers"):
        nyu40_to_seg(np.array([1.0]))


def test_recovers_the_generators_labels_instances_and_boxes(root, prepared) -> None:
    out, report = prepared
    assert report["scenes"] == {"total": 3, "prepared": 3, "resumed": 0, "failed": 0,
                                "not_reached": 0}
    assert report["errors"] == [] and report["warnings"] == []
    assert report["scenes_without_axis_alignment"] == []
    for index, scene in enumerate(SCENES):
        want = expected_scene(index)
        got = load_scene(out, scene)
        coord = got["coord"].numpy()
        # The aligned room: floor at z = 0, walls at +-width/2, +-depth/2, up to the height.
        room = want["room"]
        np.testing.assert_allclose(coord.min(0), [-room.width / 2, -room.depth / 2, 0], atol=1e-4)
        np.testing.assert_allclose(coord.max(0), [room.width / 2, room.depth / 2, room.height],
                                   atol=1e-4)
        np.testing.assert_allclose(coord, want["coord"], atol=1e-4)
        np.testing.assert_array_equal(got["semantic"].numpy(), want["semantic"])
        np.testing.assert_array_equal(got["instance"].numpy(), want["instance"])
        # The labels.ply (true nyu40 id per vertex) says the same.
        labels = sf.read_mesh_ply(scene_file(root, scene, "labels")).labels
        seg_of = {n: i for i, n in enumerate(BENCHMARK_IDS)}
        np.testing.assert_array_equal(got["semantic"].numpy(),
                                      [seg_of.get(int(n), -1) for n in labels])
        mesh = sf.read_mesh_ply(scene_file(root, scene, "mesh"))
        np.testing.assert_array_equal(got["color"].numpy(), mesh.colors[:, :3])
        boxes = want["boxes"]
        assert len(boxes) >= 3
        np.testing.assert_array_equal(got["box_instance"].numpy(), [b[0] for b in boxes])
        np.testing.assert_array_equal(got["box_class"].numpy(), [b[1] for b in boxes])
        np.testing.assert_allclose(got["box_center"].numpy(), [b[2] for b in boxes], atol=1e-4)
        np.testing.assert_allclose(got["box_size"].numpy(), [b[3] for b in boxes], atol=1e-4)
        stats = json.loads((out / "scenes" / scene / "cd2p_scene.json").read_text())
        assert stats["split"] == ("val" if index == 2 else "train")
        assert stats["vertices"] == len(coord) and stats["boxes"] == len(boxes)
        assert stats["labelled_vertices"] == int((want["semantic"] >= 0).sum())
        assert stats["instances"] == int(want["instance"].max()) and stats["axis_aligned"]
    assert report["boxes"] == sum(report["boxes_per_class"].values())


# --------------------------------------------------------------------------- reading


def test_load_scene_split_and_dtypes(prepared, tmp_path) -> None:
    out, _ = prepared
    sizes = {s: len(load_scene_split(out, s)) for s in ("train", "val", "all", "trainval")}
    assert sizes == {"train": 2, "val": 1, "all": 3, "trainval": 3}
    split = load_scene_split(out, "train")
    assert split.scene_ids == list(SCENES[:2]) and split.root == out and split.split == "train"
    assert split.class_names == SEG_CLASS_NAMES and split.det_class_names == DET_CLASS_NAMES
    scene = load_scene(split, split.scene_ids[0])
    dtypes = {k: v.dtype for k, v in scene.items()}
    assert dtypes == {"coord": torch.float32, "color": torch.uint8, "semantic": torch.int64,
                      "instance": torch.int64, "box_center": torch.float32,
                      "box_size": torch.float32, "box_class": torch.int64,
                      "box_instance": torch.int64}
    assert scene["semantic"].min() >= -1 and scene["semantic"].max() <= 19
    with pytest.raises(FileNotFoundError, match="scene0009_00"):
        load_scene(out, "scene0009_00")
    with pytest.raises(ValueError, match="not a prepared scenes directory"):
        load_scene_split(tmp_path, "all")
    (tmp_path / "prepare_config.json").write_text(json.dumps({"frame_skip": 25}))
    with pytest.raises(ValueError, match="not an output of `cd2p prepare scannet-scenes`"):
        load_scene_split(tmp_path, "all")
    with pytest.raises(ValueError, match="split must be one of"):
        load_scene_split(out, "test")


def test_empty_split_names_the_prepared_ones(root, tmp_path) -> None:
    report = prepare(root, tmp_path / "out", split="train")
    assert report["scenes"]["total"] == 2 and report["split"] == "train"
    assert len(load_scene_split(tmp_path / "out", "trainval")) == 2
    with pytest.raises(ValueError, match=r"no prepared scene in split 'val' \(prepared: train: 2"):
        load_scene_split(tmp_path / "out", "val")
    # Without split lists the scenes have no split: only 'all' finds them.
    bare = copy_root(root, tmp_path)
    for name in ("scannetv2_train.txt", "scannetv2_val.txt"):
        (bare / name).unlink()
    prepare(bare, tmp_path / "bare")
    assert len(load_scene_split(tmp_path / "bare", "all")) == 3
    with pytest.raises(ValueError, match="no split: 3"):
        load_scene_split(tmp_path / "bare", "train")


# --------------------------------------------------------------------------- runs


def test_resume_and_a_changed_label_table_is_refused(root, prepared, tmp_path) -> None:
    out = tmp_path / "out"

    def stop(scene: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(root, out, on_scene_done=stop)
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["interrupted"] and report["scenes"]["not_reached"] == 2
    stale = out / "scenes" / f".tmp-{SCENES[1]}"
    stale.mkdir()
    (stale / "scene.safetensors").write_bytes(b"half written")

    done: list[dict] = []
    report = prepare(root, out, on_scene_done=done.append)
    assert [s["scene_id"] for s in done] == list(SCENES[1:]) and not stale.exists()
    assert report["scenes"]["resumed"] == 1 and not report["interrupted"]
    done.clear()
    again = prepare(root, out, on_scene_done=done.append)
    assert done == [] and again["scenes"]["resumed"] == 3 and again["scenes"]["prepared"] == 0
    assert again["vertices"] == prepared[1]["vertices"]
    assert again["boxes_per_class"] == prepared[1]["boxes_per_class"]
    same_files(prepared[0], out)

    changed = tmp_path / "labels.tsv"
    changed.write_text((root / TABLE).read_text() + "\t".join(["99", "lamp", "lamp", "1", "35"])
                       + "\n")
    with pytest.raises(ValueError, match="other settings.*label_table_sha256"):
        prepare(root, out, labels=changed)


def test_two_workers_and_shards_give_the_same_files(root, prepared, tmp_path) -> None:
    two = prepare(root, tmp_path / "two", workers=2)
    assert two["vertices"] == prepared[1]["vertices"] and two["workers"] == 2
    same_files(prepared[0], tmp_path / "two")
    for i in range(2):
        part = prepare(root, tmp_path / "parts", shard=(i, 2))
        assert part["scenes"]["total"] == (2 if i == 0 else 1)
        assert (tmp_path / "parts" / f"prepare_report.shard-{i}-of-2.json").is_file()
    same_files(prepared[0], tmp_path / "parts")


def _drop_last_segment(root: Path) -> None:
    path = scene_file(root, DAMAGED, "segs")
    sf.write_segs(path, DAMAGED, sf.read_segs(path)[:-1])


def _edit_groups(root: Path, edit) -> None:
    path = scene_file(root, DAMAGED, "aggregation")
    groups = sf.read_aggregation(path)
    edit(groups)
    sf.write_aggregation(path, DAMAGED, groups, scene_file(root, DAMAGED, "segs").name)


def _unknown_segment(groups: list) -> None:
    groups[3].segments.append(123456)


def _object_twice(groups: list) -> None:
    first = groups[0]
    groups.append(sf.SegGroup(len(groups), first.object_id, [], "chair"))


def _segment_twice(groups: list) -> None:
    groups[5].segments.append(groups[4].segments[0])


DAMAGES = {
    "missing aggregation": ("aggregation",
                            lambda r: scene_file(r, DAMAGED, "aggregation").unlink(),
                            "aggregation.json: file not found"),
    "segs count": ("segs", _drop_last_segment, r"segment ids, but .*_vh_clean_2.ply has \d+ "),
    "unknown segment": ("aggregation", lambda r: _edit_groups(r, _unknown_segment),
                        "references segment id.* 123456 that .*segs.json does not contain"),
    "objectId twice": ("aggregation", lambda r: _edit_groups(r, _object_twice),
                       "objectId 0 appears twice with different labels"),
    "bad mesh": ("mesh", lambda r: scene_file(r, DAMAGED, "mesh").write_bytes(b"not a ply"),
                 "not a ply file"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_bad_scene_files_are_reported_per_scene(root, prepared, tmp_path, damage) -> None:
    key, apply, message = DAMAGES[damage]
    bad = copy_root(root, tmp_path)
    apply(bad)
    report = prepare(bad, tmp_path / "out")
    assert report["scenes"]["prepared"] == 2 and report["scenes"]["failed"] == 1
    (error,) = report["errors"]
    path = str(scene_file(bad, DAMAGED, key))
    assert error["scene"] == DAMAGED and error["file"] == path
    assert error["error"].startswith(path) and "Traceback" not in error["error"]
    assert "\n" not in error["error"]
    assert re.search(message, error["error"]), error["error"]
    assert sorted(p.name for p in (tmp_path / "out" / "scenes").iterdir()) == [
        SCENES[0], SCENES[2]]
    if damage == "segs count":  # the CLI lists it and exits 1, without a traceback
        result = CliRunner().invoke(main, ["prepare", "scannet-scenes", str(bad),
                                           str(tmp_path / "cli")])
        assert result.exit_code == 1
        assert f"failed {DAMAGED}" in result.output and "1 scene(s) failed" in result.output
        assert "Traceback" not in result.output


def test_label_table_errors(root, tmp_path) -> None:
    lacking = tmp_path / "labels.tsv"
    rows = [line.split("\t") for line in (root / TABLE).read_text().splitlines()]
    column = rows[0].index("nyu40id")
    lacking.write_text("".join("\t".join(r[:column] + r[column + 1:]) + "\n" for r in rows))
    lacks = r"labels.tsv: label table lacks column\(s\) \['nyu40id'\]"
    with pytest.raises(ValueError, match=lacks):
        prepare(root, tmp_path / "out", labels=lacking)
    result = CliRunner().invoke(main, ["prepare", "scannet-scenes", str(root),
                                       str(tmp_path / "out"), "--labels", str(lacking)])
    assert result.exit_code == 1 and "nyu40id" in result.output and str(lacking) in result.output
    assert "Traceback" not in result.output

    text = (root / TABLE).read_text().splitlines()
    broken = tmp_path / "broken.tsv"
    cells = text[1].split("\t")
    cells[column] = "chair?"
    broken.write_text("\n".join([text[0], "\t".join(cells), *text[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"broken.tsv:2: nyu40id 'chair\?'"):
        prepare(root, tmp_path / "out2", labels=broken)
    with pytest.raises(FileNotFoundError, match="label table not found"):
        prepare(root, tmp_path / "out3", labels=tmp_path / "nowhere.tsv")


def test_missing_alignment_and_unknown_category(root, tmp_path) -> None:
    bare = copy_root(root, tmp_path)
    meta_path = scene_file(bare, SCENES[0], "meta")
    meta = sf.read_scene_meta(meta_path)
    del meta["axisAlignment"]
    sf.write_scene_meta(meta_path, meta)
    scene_file(bare, SCENES[1], "meta").unlink()
    groups = sf.read_aggregation(scene_file(bare, SCENES[2], "aggregation"))
    mystery = next(g for g in groups if CATEGORIES[g.label].nyu40id in DETECTION_IDS)
    mystery.label = "mystery object"
    sf.write_aggregation(scene_file(bare, SCENES[2], "aggregation"), SCENES[2], groups,
                         scene_file(bare, SCENES[2], "segs").name)

    report = prepare(bare, tmp_path / "out")
    assert report["scenes"]["failed"] == 0
    assert report["scenes_without_axis_alignment"] == list(SCENES[:2])
    for scene in SCENES[:2]:
        raw = sf.read_mesh_ply(scene_file(bare, scene, "mesh")).vertices
        np.testing.assert_array_equal(load_scene(tmp_path / "out", scene)["coord"].numpy(), raw)
    (warning,) = report["warnings"]
    assert warning.startswith(f"{SCENES[2]}: raw category 'mystery object'")
    scene = load_scene(tmp_path / "out", SCENES[2])
    mine = scene["instance"] == mystery.object_id + 1
    assert mine.any() and (scene["semantic"][mine] == -1).all()
    assert mystery.object_id + 1 not in scene["box_instance"].tolist()


def test_cli_end_to_end(root, tmp_path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(main, ["prepare", "scannet-scenes", str(root), str(out),
                                  "--split", "val", "--shard", "0/1"])
    assert result.exit_code == 0, result.output
    assert "boxes (18 classes)" in result.output and "labelled (20 classes)" in result.output
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["split"] == "val" and report["scenes"]["prepared"] == 1
    assert report["labels"] == str(root / TABLE)
    assert load_scene_split(out, "val").scene_ids == [SCENES[2]]
    again = runner.invoke(main, ["prepare", "scannet-scenes", str(root), str(out),
                                 "--split", "val"])
    assert again.exit_code == 0 and "already done (resumed)" in again.output

    no_table = tmp_path / "no_table"
    (no_table / "scans").mkdir(parents=True)
    result = runner.invoke(main, ["prepare", "scannet-scenes", str(no_table), str(out)])
    assert result.exit_code == 2 and "pass --labels" in result.output
    help_text = runner.invoke(main, ["prepare", "scannet-scenes", "--help"]).output
    assert "resumes" in help_text and "scene.safetensors" in help_text


def test_a_segment_claimed_twice_goes_to_the_later_object_with_a_warning(root, tmp_path) -> None:
    # Some real ScanNet aggregations list objects twice; ScanNet's export keeps the later one.
    bad = copy_root(root, tmp_path)
    _edit_groups(bad, _segment_twice)
    groups = sf.read_aggregation(scene_file(bad, DAMAGED, "aggregation"))
    report = prepare(bad, tmp_path / "out")
    assert report["scenes"]["failed"] == 0
    (warning,) = report["warnings"]
    assert f"objectId {groups[4].object_id} are also claimed by objectId" in warning
    segs = sf.read_segs(scene_file(bad, DAMAGED, "segs"))
    shared = segs == groups[4].segments[0]
    scene = load_scene(tmp_path / "out", DAMAGED)
    assert (scene["instance"][torch.from_numpy(shared)] == groups[5].object_id + 1).all()
