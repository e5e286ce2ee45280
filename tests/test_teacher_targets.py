"""`cd2p prepare teacher`: targets stored with the pairs, in row order, atomically, resumable.

The pairs are real scene datasets in the contract's layout (``datasets`` save_to_disk with
``pair_features``), written by the tests; the teacher is a seeded random one with a tiny
registered open_clip config, so the real preprocessing, batching and file code all run.
"""

from __future__ import annotations

import io
import shutil
import zlib

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open

from cd2p.cli import main
from cd2p.data.pairs import PairDataset
from cd2p.data.scannet_pairs import images_digest, pair_features
from cd2p.data.teacher_targets import plan_teacher_targets, prepare_teacher_targets
from cd2p.models.teacher import ClipCapMapper, Teacher

SCENES = {"scene0000_00": 3, "scene0001_00": 5, "scene0002_00": 0}
POINTS = 8


def scene_images(scene_id: str, rows: int) -> list[bytes]:
    """Distinct JPEGs (a flat colour per row plus noise), so that a row mix-up shows."""
    rng = np.random.default_rng(zlib.crc32(scene_id.encode()))
    images = []
    for _ in range(rows):
        pixels = rng.integers(0, 256, 3) + rng.integers(-20, 20, (60, 80, 3))
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
    return images


def write_scene(root, scene_id: str, rows: int) -> list[bytes]:
    """One scene dataset of ``rows`` pairs in the prepared-pairs layout; its JPEGs."""
    from datasets import Dataset

    images = scene_images(scene_id, rows)
    eye = np.tile(np.eye(4, dtype=np.float32), (rows, 1, 1))
    columns = {
        "image": [{"bytes": data, "path": None} for data in images],
        "points": np.random.default_rng(rows).random((rows, POINTS, 3), dtype=np.float32),
        "scene_id": [scene_id] * rows,
        "frame_index": (np.arange(rows, dtype=np.int32) * 25),
        "pose": eye,
        "intrinsic_color": eye,
        "intrinsic_depth": eye,
    }
    Dataset.from_dict(columns, features=pair_features(POINTS)).save_to_disk(
        str(root / "scenes" / scene_id), num_shards=1  # as `prepare scannet`: empty scenes too
    )
    return images


@pytest.fixture
def pairs(tmp_path):
    root = tmp_path / "pairs"
    images = {scene: write_scene(root, scene, rows) for scene, rows in SCENES.items()}
    return root, images


def read_targets(path):
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("targets"), f.metadata()


def expected_targets(teacher: Teacher, images: list[bytes]) -> torch.Tensor:
    if not images:
        return torch.empty(0, *teacher.target_shape)
    return teacher(teacher.preprocess(images))


def check_scene(root, teacher: Teacher, scene: str, images: list[bytes]) -> None:
    stored, metadata = read_targets(root / "targets" / teacher.target / f"{scene}.safetensors")
    assert stored.dtype == torch.float16
    assert stored.shape == (len(images), *teacher.target_shape)
    # images_sha256: the targets remember the JPEGs (in row order) they were computed from
    assert metadata == {"teacher": teacher.description,
                        "random_teacher": str(teacher.is_random).lower(),
                        "images_sha256": images_digest(images)}
    expected = expected_targets(teacher, images)
    torch.testing.assert_close(stored.float(), expected.half().float(), rtol=2e-3, atol=2e-3)


def test_targets_follow_the_dataset_rows(pairs, tiny_model_name):
    root, images = pairs
    teacher = Teacher.random("prefix", seed=0, model_name=tiny_model_name)
    # rows differ far beyond the fp16 tolerance, so a permuted order could not pass
    rows = expected_targets(teacher, images["scene0001_00"])
    gaps = (rows[:, None] - rows[None]).abs().amax(dim=(2, 3)) + torch.eye(len(rows))
    assert gaps.min() > 0.05

    seen = []
    summary = prepare_teacher_targets(root, teacher, batch_size=3, on_images=seen.append)
    assert summary.scenes_done == sorted(SCENES) and summary.scenes_skipped == []
    assert summary.images == sum(SCENES.values()) == sum(seen)
    assert summary.random_teacher and summary.target == "prefix"
    for scene, scene_jpegs in images.items():  # batches of 3 straddle the 3/5/0 scenes
        check_scene(root, teacher, scene, scene_jpegs)

    # the training reader sees the same targets, row for row
    dataset = PairDataset(root, target="prefix")
    stored, _ = read_targets(root / "targets" / "prefix" / "scene0001_00.safetensors")
    for index in range(3, 8):
        item = dataset[index]
        assert item["scene_id"] == "scene0001_00"
        assert torch.equal(item["target"], stored[item["frame_index"] // 25].float())


def test_clip_target_with_workers_and_shards(pairs, tiny_model_name):
    root, images = pairs
    teacher = Teacher.random("clip", seed=3, model_name=tiny_model_name)
    first = prepare_teacher_targets(root, teacher, batch_size=4, workers=1, shard=(0, 2))
    assert first.scenes_done == ["scene0000_00", "scene0002_00"]
    second = prepare_teacher_targets(root, teacher, batch_size=4, workers=1, shard=(1, 2))
    assert second.scenes_done == ["scene0001_00"]
    for scene, scene_jpegs in images.items():
        check_scene(root, teacher, scene, scene_jpegs)
    assert not (root / "targets" / "prefix").exists()


def test_resume_skips_done_scenes_and_redoes_incomplete_ones(pairs, tiny_model_name):
    root, images = pairs
    teacher = Teacher.random("prefix", seed=0, model_name=tiny_model_name)
    prepare_teacher_targets(root, teacher, batch_size=4)
    out = root / "targets" / "prefix"
    files = {scene: out / f"{scene}.safetensors" for scene in SCENES}
    stamps = {scene: path.stat().st_mtime_ns for scene, path in files.items()}

    again = prepare_teacher_targets(root, teacher, batch_size=4)
    assert again.scenes_done == [] and again.scenes_skipped == sorted(SCENES)
    assert again.images == 0
    assert {scene: path.stat().st_mtime_ns for scene, path in files.items()} == stamps

    # an interrupted run: scene 1's file never got renamed, only its temporary is there;
    # scene 0's file is truncated (copied by hand, disk full...); scene 2 was re-prepared
    good = files["scene0001_00"].read_bytes()
    files["scene0001_00"].unlink()
    stale = out / ".scene0001_00.k2j4x9.tmp"
    stale.write_bytes(good[: len(good) // 2])
    files["scene0000_00"].write_bytes(files["scene0000_00"].read_bytes()[:1000])
    shutil.rmtree(root / "scenes" / "scene0002_00")
    images["scene0002_00"] = write_scene(root, "scene0002_00", 2)

    plan = plan_teacher_targets(root, teacher)
    assert [job.scene_id for job in plan.to_compute] == sorted(SCENES)
    assert plan.done == [] and plan.images == 3 + 5 + 2
    resumed = prepare_teacher_targets(root, teacher, batch_size=4)
    assert resumed.scenes_done == sorted(SCENES)
    assert not stale.exists() and list(out.glob("*.tmp")) == []
    for scene, scene_jpegs in images.items():
        check_scene(root, teacher, scene, scene_jpegs)


def test_targets_of_another_teacher_are_not_mixed(pairs, tiny_model_name, tmp_path):
    root, images = pairs
    prepare_teacher_targets(root, Teacher.random("prefix", 0, model_name=tiny_model_name))
    other = Teacher.random("prefix", 1, model_name=tiny_model_name)
    with pytest.raises(ValueError, match=r"scene0000_00\.safetensors(.|\n)*--overwrite"):
        prepare_teacher_targets(root, other)
    summary = prepare_teacher_targets(root, other, overwrite=True)
    assert summary.scenes_done == sorted(SCENES)
    for scene, scene_jpegs in images.items():
        check_scene(root, other, scene, scene_jpegs)

    # a real teacher (real weight files, tiny architecture) never resumes random targets
    clip_file, clipcap_file = tmp_path / "clip.bin", tmp_path / "conceptual_weights.pt"
    torch.save(open_clip.create_model(tiny_model_name).state_dict(), clip_file)
    mapper = {f"clip_project.{k}": v for k, v in ClipCapMapper().state_dict().items()}
    torch.save(mapper, clipcap_file)
    real = Teacher.from_pretrained(
        "prefix", clip_weights=clip_file, clipcap_weights=clipcap_file, model_name=tiny_model_name
    )
    with pytest.raises(ValueError, match="random_teacher=true"):
        plan_teacher_targets(root, real)


def test_cli_prepare_teacher(pairs, tiny_model_name, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    root, images = pairs
    runner = CliRunner()
    args = ["prepare", "teacher", str(root), "--random-teacher", "--seed", "2", "--device",
            "cpu", "--batch-size", "4", "--model-name", tiny_model_name]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "RANDOM TEACHER (seed 2)" in result.output
    assert "images/s" in result.output and "3 to compute (8 images)" in result.output
    teacher = Teacher.random("prefix", 2, model_name=tiny_model_name)
    for scene, scene_jpegs in images.items():
        check_scene(root, teacher, scene, scene_jpegs)

    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "0 to compute (0 images), 3 already done" in result.output

    result = runner.invoke(main, [*args, "--clip-weights", str(root / "scenes" / "x")])
    assert result.exit_code == 2  # click refuses a path that does not exist

    # offline with empty caches and no local files: a clear error, no traceback
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(empty))
    result = runner.invoke(main, ["prepare", "teacher", str(root), "--device", "cpu"])
    assert result.exit_code == 1
    message = " ".join(result.output.split())  # rich wraps long lines
    assert message.startswith("error: could not fetch the CLIP weights")
    assert "--clip-weights PATH" in message and "--clipcap-weights PATH" in message
    assert "Traceback" not in message


def test_prefix_and_clip_from_one_clip_pass(pairs, tiny_model_name):
    root, images = pairs
    teacher = Teacher.random("prefix", seed=0, model_name=tiny_model_name)
    passes = []
    teacher.visual.register_forward_hook(lambda *_: passes.append(1))
    summary = prepare_teacher_targets(root, teacher, batch_size=4, targets="prefix,clip")
    assert summary.target == "prefix,clip" and summary.images == 8
    assert len(passes) == 2  # 8 images in batches of 4: one CLIP pass per batch for both
    clip_teacher = Teacher.random("clip", seed=0, model_name=tiny_model_name)  # same CLIP
    for scene, scene_jpegs in images.items():
        check_scene(root, teacher, scene, scene_jpegs)
        check_scene(root, clip_teacher, scene, scene_jpegs)  # "clip" files name CLIP alone
    # Done means every target is complete: a clip teacher resumes the clip files as its own.
    assert plan_teacher_targets(root, clip_teacher).to_compute == []
    (root / "targets" / "clip" / "scene0001_00.safetensors").unlink()
    plan = plan_teacher_targets(root, teacher, targets=("prefix", "clip"))
    assert [job.scene_id for job in plan.to_compute] == ["scene0001_00"]
    with pytest.raises(ValueError, match="cannot compute 'prefix'"):
        plan_teacher_targets(root, clip_teacher, targets="prefix,clip")
    with pytest.raises(ValueError, match="unknown teacher target"):
        plan_teacher_targets(root, teacher, targets="prefix,caption")
    # The training reader returns both, row for row.
    prepare_teacher_targets(root, teacher, targets="prefix,clip")
    item = PairDataset(root, target=("prefix", "clip"))[4]
    assert item["target"].shape == (10, 768) and item["target_clip"].shape == (1, 512)
    result = CliRunner().invoke(main, ["prepare", "teacher", str(root), "--random-teacher",
                                       "--device", "cpu", "--model-name", tiny_model_name,
                                       "--target", "prefix,clip"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "0 to compute (0 images), 3 already done" in result.output
    bad = CliRunner().invoke(main, ["prepare", "teacher", str(root), "--target", "clip,clip"])
    assert bad.exit_code == 2 and "named twice" in bad.output
