"""`cd2p pretrain` on synthetic ScanNet pairs: learning, the frozen teacher, CLI, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard

import cd2p
from cd2p import Cd2pBackbone
from cd2p.cli import main
from cd2p.config import apply_overrides, load_recipe
from cd2p.data.pairs import PairDataset, scene_dirs, target_file
from cd2p.data.scannet_pairs import prepare_scannet
from cd2p.data.synthetic import generate_synthetic_scannet
from cd2p.data.teacher_targets import write_targets
from cd2p.engine import load_checkpoint, read_metrics, weights_sha256
from cd2p.engine.pretrain import PretrainStep, build_pretrain_model, run_pretrain
from cd2p.provenance import data_fingerprint

# A student small enough to train for a hundred steps in seconds on 2 cores.
TINY = (
    "model.dim=96",
    "model.depth=2",
    "model.num_heads=4",
    "model.num_groups=8",
    "model.group_size=16",
    "model.drop_path_rate=0.0",
    "data.num_points=512",
    "data.batch_size=4",
    "data.num_workers=0",
    "schedule.epochs=100",
    "schedule.warmup_epochs=2",
    "run.log_every=5",
    "run.checkpoint_every=1000",
    "optim.lr=2e-3",
)


def tiny(*overrides: str):
    return apply_overrides(load_recipe("demo"), [*TINY, *overrides])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """~40 synthetic ScanNet pairs of 512 points with stored ``prefix`` targets.

    The targets are a fixed random function of each cloud's per-axis spread (tanh of a
    linear map to (10, 768)), so that a student can learn them from the points alone; they
    are written in the real targets format and marked as not coming from CLIP.
    """
    root = tmp_path_factory.mktemp("pairs")
    generate_synthetic_scannet(
        root / "scannet", num_scenes=4, frames_per_scene=10, seed=0,
        color_size=(64, 48), depth_size=(64, 48),
    )  # fmt: skip
    prepare_scannet(
        root / "scannet", root / "pairs", frame_skip=1, num_points=512, split="all",
        min_valid_points=256, progress=False,
    )  # fmt: skip
    projection = torch.randn(3, 10 * 768, generator=torch.Generator().manual_seed(0))
    dataset = PairDataset(root / "pairs")
    by_scene: dict[str, list[torch.Tensor]] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        by_scene.setdefault(item["scene_id"], []).append(item["points"])
    for scene in scene_dirs(root / "pairs"):
        spread = torch.stack(by_scene[scene.name]).std(dim=1)  # (rows, 3)
        targets = torch.tanh((spread - 0.8) * 3 @ projection).view(-1, 10, 768)
        meta = {"teacher": "test: tanh(linear(spread of the cloud))", "random_teacher": "true"}
        write_targets(target_file(scene, "prefix"), targets, meta)
    return root / "pairs"


def window_losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(run_dir, "train")]


def test_distillation_loss_falls_and_the_student_exports(pairs: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # A constant learning rate after the warm-up (min_lr = lr) to learn fast in few steps.
    recipe = tiny("schedule.max_steps=80", "schedule.min_lr=2e-3")
    result = run_pretrain(recipe, [pairs], run_dir, progress=False, recipe_name="tiny")
    losses = window_losses(run_dir, "loss_distill")
    print(f"distill loss: first 5 steps {losses[0]:.4f}, last 5 steps {losses[-1]:.4f}")
    assert result.run.completed and result.run.step == 80
    assert losses[-1] < 0.5 * losses[0], losses  # it learns the targets from the points

    backbone = Cd2pBackbone.from_pretrained(str(run_dir / "backbone"))
    points = PairDataset(pairs)[0]["points"][None]
    trained = result.model.backbone.eval()
    with torch.no_grad():
        assert torch.equal(backbone(points).tokens, trained(points).tokens)
    card = (run_dir / "backbone" / "README.md").read_text()
    assert "tiny" in card and "80" in card and "random teacher" in card and "yes" in card
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["random_teacher"] is True and summary["pairs"] == result.pairs
    assert summary["final_loss"] == pytest.approx(losses[-1])
    info = json.loads((run_dir / "run.json").read_text())
    assert info["targets"] == "stored" and info["data"] == [str(pairs.resolve())]
    # Provenance: the pairs and their targets hashed, the steps' throughput, in the summary
    # and in the backbone card's metadata.
    prov = summary["provenance"]
    assert prov["data"]["sha256"] == data_fingerprint([pairs.resolve()])["sha256"]
    assert prov["data"] == info["data_fingerprint"] and prov["steps"] == 80
    assert prov["train_samples"] == 80 * recipe.data.batch_size and prov["samples_per_s"] > 0
    assert ModelCard.load(run_dir / "backbone" / "README.md").data.cd2p_provenance["seeds"] == [0]


def test_mae_loss_falls(pairs: Path, tmp_path: Path) -> None:
    recipe = tiny("pretrain.objective=mae", "schedule.max_steps=30")
    run_pretrain(recipe, [pairs], tmp_path / "run", progress=False)
    losses = window_losses(tmp_path / "run", "loss_mae")
    print(f"mae loss: first 5 steps {losses[0]:.4f}, last 5 steps {losses[-1]:.4f}")
    assert losses[-1] < 0.2 * losses[0], losses


def test_on_the_fly_teacher_gets_no_gradients_and_stays_unchanged(
    pairs: Path, tmp_path: Path
) -> None:
    from cd2p.models.teacher import Teacher

    teacher = Teacher.random("prefix", seed=3)
    before = weights_sha256(teacher)
    recipe = tiny("pretrain.targets=on-the-fly", "schedule.max_steps=2", "data.batch_size=2")
    result = run_pretrain(recipe, [pairs], tmp_path / "run", progress=False, teacher=teacher)
    assert result.run.completed and result.random_teacher
    assert weights_sha256(teacher) == before
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["targets"] == "on-the-fly" and "RANDOM" in info["teacher"]
    # The checkpoint holds the student only, never the teacher.
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    fresh = PretrainStep(build_pretrain_model(recipe))
    load_checkpoint(ckpt, fresh, restore_rng=False)  # strict: no extra (teacher) keys


def test_cli_errors_and_resume(pairs: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["pretrain", "--recipe", "demo", "--data", str(pairs), "--no-progress"]
    tiny_sets = [x for o in TINY for x in ("--set", o)]

    missing = runner.invoke(main, [*args, "--out", str(tmp_path / "a"), *tiny_sets,
                                   "--set", "pretrain.objective=distill-clip"])  # fmt: skip
    assert missing.exit_code != 0
    assert "cd2p prepare teacher" in missing.output and "--target clip" in missing.output

    # A run stopped after step 3 of 6 (as a job with a time limit), then resumed by the CLI.
    run_dir = tmp_path / "mae"
    recipe = tiny("pretrain.objective=mae", "schedule.max_steps=6")
    stopped = run_pretrain(recipe, [pairs], run_dir, progress=False, stop_after=3)
    assert not stopped.run.completed and stopped.backbone_dir is None
    assert not (run_dir / "backbone").exists()

    again = runner.invoke(main, [*args, "--out", str(run_dir), *tiny_sets])
    assert again.exit_code != 0 and "--resume" in again.output  # refuses a non-empty RUN

    resumed = runner.invoke(main, ["pretrain", "--resume", str(run_dir), "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert "6 / 6" in resumed.output
    assert Cd2pBackbone.from_pretrained(str(run_dir / "backbone")).dim == 96
    assert [r["step"] for r in read_metrics(run_dir, "train")] == [3, 5, 6]


def test_torchrun_two_processes_hold_identical_weights(pairs: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    sets = [*TINY, "schedule.max_steps=20", "data.batch_size=4", "run.checkpoint_every=10"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "cd2p", "pretrain", "--recipe", "demo", "--data", str(pairs),
        "--out", str(run_dir), "--no-progress", *[x for s in sets for x in ("--set", s)],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    final = read_metrics(run_dir, "final")[-1]
    assert len(final["weights_sha256"]) == 2
    assert final["weights_sha256"][0] == final["weights_sha256"][1]
    # The checksums are those of the weights rank 0 saved, after 20 steps of batch 2 per rank.
    recipe = load_recipe(run_dir / "recipe.yaml")
    model = PretrainStep(build_pretrain_model(recipe))
    ckpt = load_checkpoint(run_dir / "checkpoints" / "step-00000020", model, restore_rng=False)
    assert ckpt.world_size == 2
    assert weights_sha256(model) == final["weights_sha256"][0]
    assert [r["step"] for r in read_metrics(run_dir, "train")][-1] == 20
    Cd2pBackbone.from_pretrained(str(run_dir / "backbone"))


def test_distill_clip_on_the_fly_takes_both_targets_from_the_teacher(
    pairs: Path, tmp_path: Path, tiny_model_name: str
) -> None:
    from cd2p.models.teacher import Teacher

    teacher = Teacher.random("prefix", seed=3, model_name=tiny_model_name)
    passes = []
    teacher.visual.register_forward_hook(lambda *_: passes.append(1))
    recipe = tiny("pretrain.objective=distill+clip", "pretrain.targets=on-the-fly",
                  "schedule.max_steps=2", "data.batch_size=2")  # fmt: skip
    result = run_pretrain(recipe, [pairs], tmp_path / "run", progress=False, teacher=teacher)
    assert result.run.completed and len(passes) == 2  # one CLIP pass per step for both targets
    assert set(result.run.final_components) == {"loss_distill", "loss_clip"}
    assert cd2p.from_pretrained(result.student_dir).outputs == ("prefix", "clip")
    # The stored prefix targets alone are not enough: the error names the command to run.
    stored = tiny("pretrain.objective=distill+clip", "schedule.max_steps=2")
    with pytest.raises(FileNotFoundError, match="--target prefix,clip"):
        run_pretrain(stored, [pairs], tmp_path / "stored", progress=False)
