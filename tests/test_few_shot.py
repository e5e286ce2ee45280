"""Few-shot classification: the K-per-class draw, and `cd2p finetune classification --few-shot K`
end to end (linear probe and fine-tuning) on a tiny synthetic dataset written in the real format."""

import json

import pytest
import torch
from click.testing import CliRunner

from cd2p.cli import main
from cd2p.data.classification import few_shot_subset, load_classification_cache
from cd2p.data.modelnet40 import prepare_modelnet40
from cd2p.data.synthetic_shapes import synthetic_modelnet40

# Tiny, fast settings on top of the shipped synthetic recipe.
TINY_SETS = [
    "model.dim=32", "model.depth=2", "model.num_heads=2", "model.num_groups=8",
    "model.group_size=8", "data.num_points=64", "data.batch_size=4", "run.log_every=1",
    "run.checkpoint_every=1000", "finetune.head_channels=[32]", "finetune.votes=2",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """4 classes, 6 training and 3 test shapes each, prepared with 96 FPS points."""
    root = tmp_path_factory.mktemp("few_shot")
    raw = synthetic_modelnet40(root / "raw", num_classes=4, train_per_class=6, test_per_class=3,
                               num_points=200, seed=2, show_progress=False)  # fmt: skip
    return prepare_modelnet40(raw, root / "prep", num_points=96, show_progress=False)


def test_subset_has_exactly_k_per_class_and_is_deterministic_by_seed(shapes):
    train = load_classification_cache(shapes, "train")
    sub = few_shot_subset(train, 2, seed=5)
    assert torch.bincount(sub.labels, minlength=4).tolist() == [2, 2, 2, 2]
    # Every kept shape is the training shape of the same id (points, label and id stay together).
    for i, shape_id in enumerate(sub.shape_ids):
        j = train.shape_ids.index(shape_id)
        assert torch.equal(sub.points[i], train.points[j]) and sub.labels[i] == train.labels[j]
    assert sub.class_names == train.class_names and sub.source == train.source
    again = few_shot_subset(train, 2, seed=5)
    assert again.shape_ids == sub.shape_ids and torch.equal(again.points, sub.points)
    draws = {tuple(few_shot_subset(train, 2, seed=s).shape_ids) for s in range(6)}
    assert len(draws) > 1  # the seed chooses the shapes
    # Nested: the 2-shot shapes are among the 3-shot shapes of the same seed.
    assert set(sub.shape_ids) <= set(few_shot_subset(train, 3, seed=5).shape_ids)
    # K = all shapes of each class keeps the whole split, in order.
    assert few_shot_subset(train, 6, seed=0).shape_ids == train.shape_ids
    with pytest.raises(ValueError, match="class 'sphere' has 6 shapes, fewer than the 7"):
        few_shot_subset(train, 7, seed=0)
    with pytest.raises(ValueError, match="at least 1"):
        few_shot_subset(train, 0)


def run_cli(*args: str):
    return CliRunner().invoke(main, ["finetune", "classification", *args])


def test_cli_few_shot_linear_probe(shapes, tmp_path):
    out = tmp_path / "probe"
    result = run_cli("--recipe", "finetune-synthetic-shapes", "--data", str(shapes), "--out",
                     str(out), "--linear-probe", "--few-shot", "3", "--no-progress",
                     *[a for s in TINY_SETS for a in ("--set", s)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "few-shot" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["few_shot"] == 3 and metrics["train_shapes"] == 12
    assert sum(map(sum, metrics["confusion_matrix"])) == 12  # the whole test split is scored
    probe = json.loads((out / "probe" / "probe.json").read_text())
    assert probe["few_shot"] == 3 and probe["train_shapes"] == 12
    recipe = (out / "recipe.yaml").read_text()
    assert "few_shot: 3" in recipe and "linear_probe: true" in recipe

    # More shots than a class has: a clear error naming the data and the class, nothing written.
    bad = run_cli("--recipe", "finetune-synthetic-shapes", "--data", str(shapes), "--out",
                  str(tmp_path / "bad"), "--linear-probe", "--few-shot", "7")  # fmt: skip
    message = " ".join(bad.output.split())  # rich wraps long lines
    assert bad.exit_code != 0
    assert "class 'sphere' has 6 shapes, fewer than the 7 per class" in message
    assert f"{shapes} (train)" in message
    assert not (tmp_path / "bad").exists()


def test_cli_few_shot_fine_tuning(shapes, tmp_path):
    out = tmp_path / "run"
    result = run_cli("--recipe", "finetune-synthetic-shapes", "--data", str(shapes), "--out",
                     str(out), "--few-shot", "2", "--no-progress", "--set", "schedule.epochs=2",
                     "--set", "schedule.warmup_epochs=0",
                     *[a for s in TINY_SETS for a in ("--set", s)])  # fmt: skip
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["few_shot"] == 2 and info["train_shapes"] == 8
    # 8 training shapes in batches of 4: 2 steps per epoch, 2 epochs.
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()
             if json.loads(line)["kind"] == "train"]  # fmt: skip
    assert steps == [1, 2, 3, 4]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["few_shot"] == 2 and metrics["train_shapes"] == 8 and metrics["samples"] == 12
    card = (out / "model" / "README.md").read_text()
    assert "few-shot" in card and "2 training shapes per class" in card

    partseg = CliRunner().invoke(main, ["finetune", "partseg", "--data", str(shapes), "--out",
                                        str(tmp_path / "seg"), "--few-shot", "2"])  # fmt: skip
    assert partseg.exit_code != 0
    assert "--few-shot is for classification" in " ".join(partseg.output.split())
