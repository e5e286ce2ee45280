"""Scene segmentation: ScanNet's mIoU on hand-made confusion matrices, whole-scene coverage,
per-epoch draws that resume exactly, the model through the Hub, and a short CPU fine-tune on
synthetic rooms (real files: generated ScanNet scenes prepared by `prepare scannet-scenes`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cd2p import Cd2pBackbone, Cd2pForSemanticSegmentation
from cd2p.cli import main
from cd2p.config import load_recipe
from cd2p.data.epochs import EpochIndex
from cd2p.data.scannet_files import read_mesh_ply
from cd2p.data.scannet_pairs import sample_exact
from cd2p.data.scannet_scenes import (
    SEG_CLASS_IDS,
    load_scene,
    load_scene_split,
    prepare_scannet_scenes,
)
from cd2p.data.synthetic import generate_synthetic_scannet
from cd2p.engine.finetune import run_finetune
from cd2p.engine.metrics import confusion_matrix, segmentation_ious, segmentation_metrics
from cd2p.tasks.segmentation import (
    SceneSegmentationDataset,
    coverage_draws,
    scene_scores,
)

TINY = dict(dim=32, depth=2, num_heads=2, num_groups=16, group_size=8)
SETS = [  # the shipped synthetic recipe, smaller draws
    "data.num_points=1024", "model.num_groups=32", "optim.lr=5e-3", "run.log_every=10",
    "schedule.warmup_epochs=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """8 synthetic rooms (6 train, 2 val) prepared by `prepare scannet-scenes`."""
    root = tmp_path_factory.mktemp("seg")
    generate_synthetic_scannet(root / "raw", num_scenes=8, frames_per_scene=1, seed=0)
    prepare_scannet_scenes(root / "raw", root / "scenes",
                           labels=root / "raw" / "scannetv2-labels.combined.tsv", progress=False)
    return root


# -- the metric -------------------------------------------------------------------------------


def test_iou_follows_scannets_benchmark_script_on_hand_made_matrices():
    # rows: ground truth, columns: prediction
    conf = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    ious = segmentation_ious(conf)
    assert ious[0] == 5 / (5 + 1 + 2) and ious[1] == 3 / (3 + 2 + 1)
    assert math.isnan(ious[2])  # neither in the ground truth nor predicted: no IoU
    metrics = segmentation_metrics(conf)
    assert metrics["miou"] == pytest.approx((5 / 8 + 3 / 6) / 2)
    assert metrics["oa"] == pytest.approx(8 / 11)
    # A class only predicted (never in the ground truth) has IoU 0 and counts in the mean.
    conf = torch.tensor([[2, 1], [0, 0]])
    assert segmentation_ious(conf).tolist() == [2 / 3, 0.0]
    assert segmentation_metrics(conf)["miou"] == pytest.approx(1 / 3)
    # Ignored ground truth never enters the matrix: predictions there are not false positives.
    labels = torch.tensor([0, 0, 1, -1, -1])
    pred = torch.tensor([0, 1, 1, 1, 1])
    keep = labels >= 0
    conf = confusion_matrix(pred[keep], labels[keep], 2)
    assert segmentation_ious(conf).tolist() == [0.5, 0.5]


# -- whole-scene coverage ---------------------------------------------------------------------


@pytest.mark.parametrize("vertices", [1, 5, 16, 17, 40])
def test_coverage_draws_score_every_vertex_exactly_once_per_round(vertices):
    rng = np.random.default_rng(0)
    hits = np.zeros(vertices, dtype=int)
    for indices, own in coverage_draws(vertices, 16, 3, rng):
        assert indices.shape == (16,) and 0 < own <= 16
        assert indices.min() >= 0 and indices.max() < vertices
        hits[indices[:own]] += 1
        if vertices >= 16:  # the filling vertices are other vertices of the scene
            assert len(set(indices.tolist())) == 16
    assert (hits == 3).all()


def test_scene_scores_sum_one_probability_per_vote_on_every_vertex():
    torch.manual_seed(0)
    model = Cd2pForSemanticSegmentation(backbone=TINY, num_classes=4, num_points=64).eval()
    coord = torch.rand(150, 3) * 3
    scores = scene_scores(model, coord, None, 64, 2, np.random.default_rng(1), batch_size=3)
    assert scores.shape == (150, 4)
    torch.testing.assert_close(scores.sum(-1), torch.full((150,), 2.0))
    # Batching does not change the scores (each draw is scored on its own).
    again = scene_scores(model, coord, None, 64, 2, np.random.default_rng(1), batch_size=1)
    torch.testing.assert_close(scores, again)


# -- data -------------------------------------------------------------------------------------


def test_draws_are_pure_functions_of_seed_epoch_and_index(scenes):
    data = load_scene_split(scenes / "scenes", "train")
    cfg = load_recipe("finetune-synthetic-scenes").segmentation
    plain = SceneSegmentationDataset(data, 512, seed=3)
    augmented = SceneSegmentationDataset(data, 512, seed=3, augment=cfg, use_color=True)
    scene = load_scene(data, data.scene_ids[1])
    idx = sample_exact(len(scene["coord"]), 512, np.random.default_rng([3, 2, 1]))
    item = plain[EpochIndex(2, 1)]
    expected = scene["coord"][idx].double()
    torch.testing.assert_close(item["points"].double(), expected - expected.mean(0), atol=1e-5,
                               rtol=0)  # fmt: skip
    assert torch.equal(item["labels"], scene["semantic"][idx])
    assert "colors" not in item
    first, again = augmented[EpochIndex(2, 1)], augmented[EpochIndex(2, 1)]
    assert all(torch.equal(first[k], again[k]) for k in ("points", "labels", "colors"))
    assert not torch.equal(first["points"], augmented[EpochIndex(3, 1)]["points"])
    assert first["colors"].shape == (512, 3) and first["colors"].abs().max() <= 1.0
    # The augmentation is a rotation about z, a scale and mirrors: z only scales, and every
    # distance scales by the same factor.
    raw = (expected - expected.mean(0)).float()
    scale = first["points"][:, 2].norm() / raw[:, 2].norm()
    exact = "donot_use_mm_for_euclid_dist"
    d_raw = torch.cdist(raw[:50], raw[:50], compute_mode=exact)
    d_aug = torch.cdist(first["points"][:50], first["points"][:50], compute_mode=exact)
    torch.testing.assert_close(d_aug, d_raw * scale, atol=1e-4, rtol=1e-4)
    assert cfg.scale_low <= scale <= cfg.scale_high


# -- the model --------------------------------------------------------------------------------


def test_model_shapes_hub_round_trip_and_backbone_start(tmp_path):
    torch.manual_seed(0)
    model = Cd2pForSemanticSegmentation(backbone=TINY, num_classes=5, use_color=True,
                                        class_names=list("abcde"), num_points=96).eval()
    pts, cols = torch.rand(2, 96, 3), torch.rand(2, 96, 3) * 2 - 1
    assert model(pts, cols).shape == (2, 96, 5)
    with pytest.raises(ValueError, match="reads colours"):
        model(pts)
    model.save_pretrained(tmp_path / "seg")
    config = json.loads((tmp_path / "seg" / "config.json").read_text())
    assert config["model_kind"] == "segmentation" and config["use_color"] is True
    loaded = Cd2pForSemanticSegmentation.from_pretrained(tmp_path / "seg")
    assert torch.equal(model(pts, cols), loaded(pts, cols))
    backbone = Cd2pBackbone(**TINY)
    started = Cd2pForSemanticSegmentation.from_backbone(backbone, {"num_groups": 8}, num_classes=3)
    assert started.backbone.num_groups == 8
    for key, value in backbone.state_dict().items():
        assert torch.equal(started.backbone.state_dict()[key], value)


# -- learning, evaluation, prediction, resume -------------------------------------------------


def _majority_baseline(scenes) -> dict[str, float]:
    """mIoU / OA of predicting the commonest training class everywhere in the val scenes."""
    train, val = (load_scene_split(scenes / "scenes", s) for s in ("train", "val"))
    counts = torch.zeros(20, dtype=torch.long)
    for scene_id in train.scene_ids:
        labels = load_scene(train, scene_id)["semantic"]
        counts += torch.bincount(labels[labels >= 0], minlength=20)
    conf = torch.zeros(20, 20, dtype=torch.long)
    for scene_id in val.scene_ids:
        labels = load_scene(val, scene_id)["semantic"]
        labels = labels[labels >= 0]
        conf += confusion_matrix(torch.full_like(labels, int(counts.argmax())), labels, 20)
    return segmentation_metrics(conf)


@pytest.mark.usefixtures("one_thread")
def test_segmentation_learns_then_evaluates_and_predicts_identically(scenes, tmp_path):
    # Measured: mIoU 0.75 (OA 0.93) on every vertex of the 2 val rooms after 120 steps (seeds
    # 0, 1, 2: 0.751, 0.744, 0.755), against 0.057 (OA 0.57) for "every vertex is a wall", the
    # commonest training class.
    recipe = load_recipe("finetune-synthetic-scenes", [
        *SETS, "data.batch_size=3", "schedule.epochs=60", "run.eval_every=30",
    ])  # fmt: skip
    result = run_finetune("segmentation", recipe, scenes / "scenes", None, tmp_path / "run",
                          progress=False)  # fmt: skip
    baseline = _majority_baseline(scenes)
    print("segmentation", result.metrics, "majority baseline", baseline)
    assert result.metrics["miou"] > baseline["miou"] + 0.5, (result.metrics, baseline)
    assert result.metrics["oa"] > baseline["oa"] + 0.15
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["votes"] == 2 and saved["vertices"] > 20_000 and saved["train_scenes"] == 6
    recipe_text = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "segmentation:" in recipe_text and "finetune:" not in recipe_text
    assert "pretrain:" not in recipe_text

    cli = CliRunner().invoke(main, [
        "evaluate", "segmentation", "--model", str(tmp_path / "run" / "model"),
        "--data", str(scenes / "scenes"), "--votes", "2", "--batch-size", "5",
        "--out", str(tmp_path / "eval"),
    ])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("miou", "oa", "macc"):
        assert again[key] == saved[key] == result.metrics[key]
    assert again["confusion_matrix"] == saved["confusion_matrix"]
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 1000
    assert "wall" in cli.output and "mIoU" in cli.output

    scan = scenes / "raw" / "scans" / "scene0007_00" / "scene0007_00_vh_clean_2.ply"
    truth = scan.with_name("scene0007_00_vh_clean_2.labels.ply")
    out = tmp_path / "pred" / "scene7.ply"
    cli = CliRunner().invoke(main, [
        "predict", "segmentation", "--model", str(tmp_path / "run" / "model"), str(scan),
        str(out), "--labels", str(truth), "--votes", "2",
    ])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    written, source = read_mesh_ply(out), read_mesh_ply(scan)
    np.testing.assert_array_equal(written.vertices, source.vertices)
    np.testing.assert_array_equal(written.faces, source.faces)
    assert set(np.unique(written.labels).tolist()) <= set(SEG_CLASS_IDS)
    assert out.with_suffix(".png").stat().st_size > 5000
    assert "mIoU (against the labels)" in cli.output


def test_interrupted_segmentation_finetune_resumes_to_the_same_model(scenes, tmp_path):
    recipe = load_recipe("finetune-synthetic-scenes", [
        *SETS, "data.num_points=256", "model.num_groups=16", "data.batch_size=2",
        "model.dim=32", "model.num_heads=2",
        "schedule.epochs=2", "schedule.warmup_epochs=1", "run.eval_every=1",
        "run.checkpoint_every=4",
        "segmentation.votes=1",
    ])  # fmt: skip
    whole = run_finetune("segmentation", recipe, scenes / "scenes", None, tmp_path / "whole",
                         progress=False)  # fmt: skip
    stopped = run_finetune("segmentation", recipe, scenes / "scenes", None, tmp_path / "part",
                           progress=False, stop_after=4)  # fmt: skip
    assert not stopped.run.completed and stopped.run.step == 4  # mid-epoch 2 of 3 steps each
    cli = CliRunner().invoke(main, ["finetune", "segmentation", "--resume",
                                    str(tmp_path / "part"), "--no-progress"])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    ref = Cd2pForSemanticSegmentation.from_pretrained(tmp_path / "whole" / "model").state_dict()
    got = Cd2pForSemanticSegmentation.from_pretrained(tmp_path / "part" / "model").state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert json.loads((tmp_path / "part" / "metrics.json").read_text())["miou"] == (
        whole.metrics["miou"]
    )


def test_card_puts_scannet_miou_beside_the_papers_numbers_only_for_scannet():
    model = Cd2pForSemanticSegmentation(backbone=TINY, num_classes=20)
    card = model.generate_model_card(metrics={"miou": 0.47}, dataset="scannet")
    assert "| ScanNetV2 mIoU (%) | 37.0 | 45.4 | 46.4 | 47.00 |" in card.text
    assert card.data.eval_results[0].task_type == "point-cloud-segmentation"
    other = model.generate_model_card(metrics={"miou": 0.7}, dataset="synthetic-scannet")
    assert "| ScanNetV2 mIoU (%) | 37.0 | 45.4 | 46.4 | — |" in other.text
