"""Few-shot classification: the K-per-class draw, `cd2p finetune classification --few-shot K`
end to end (linear probe and fine-tuning), and Point-BERT's N-way K-shot episodes and
`--few-shot-protocol`, on a tiny synthetic dataset written in the real format."""

import json

import pytest
import torch
from click.testing import CliRunner

from cd2p.cli import main
from cd2p.data.classification import (
    Episode,
    episode_split,
    few_shot_subset,
    load_classification_cache,
)
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


def test_episodes_are_balanced_disjoint_and_a_pure_function_of_the_seed(shapes):
    train = load_classification_cache(shapes, "train")
    test = load_classification_cache(shapes, "test")
    episode = Episode(way=3, shot=2, fold=0, seed=0, queries=2)
    support, queries = episode_split(train, episode, "train"), episode_split(test, episode, "test")
    # Balanced: K shapes of each of the N classes for training, `queries` of each for testing.
    assert torch.bincount(support.labels).tolist() == [2, 2, 2]
    assert torch.bincount(queries.labels).tolist() == [2, 2, 2]
    assert support.class_names == queries.class_names and len(set(support.class_names)) == 3
    # Disjoint: no shape twice, none both for training and testing.
    assert len(set(support.shape_ids)) == 6 and len(set(queries.shape_ids)) == 6
    assert not set(support.shape_ids) & set(queries.shape_ids)
    # Episode labels 0..N-1 name the chosen classes; points travel with their ids.
    for split, part in ((train, support), (test, queries)):
        for i, shape_id in enumerate(part.shape_ids):
            j = split.shape_ids.index(shape_id)
            assert split.class_names[split.labels[j]] == part.class_names[part.labels[i]]
            assert torch.equal(part.points[i], split.points[j])
    # Reproducible: a pure function of (seed, way, shot, fold); the folds differ.
    again = episode_split(train, Episode(3, 2, 0, 0, queries=3), "train")
    assert again.shape_ids == support.shape_ids and torch.equal(again.labels, support.labels)
    folds = {tuple(episode_split(train, Episode(3, 2, f, 0, 2), "train").shape_ids)
             for f in range(5)}  # fmt: skip
    assert len(folds) == 5
    assert episode_split(train, Episode(3, 2, 0, 1, 2), "train").shape_ids != support.shape_ids
    with pytest.raises(ValueError, match="has 3 shapes, fewer than the 4 test shapes"):
        episode_split(test, Episode(2, 2, 0, 0, queries=4), "test", "the test split")
    with pytest.raises(ValueError, match="a 5-way episode needs 5 classes; the data has 4"):
        episode_split(train, Episode(5, 1, 0), "train")


def test_few_shot_protocol_trains_every_fold_and_saves_the_folds(shapes, tmp_path):
    out = tmp_path / "protocol"
    result = run_cli("--recipe", "finetune-synthetic-shapes", "--data", str(shapes), "--out",
                     str(out), "--few-shot-protocol", "--ways", "2", "--shots", "2", "--folds",
                     "2", "--queries", "3", "--no-progress", "--set", "schedule.epochs=1",
                     "--set", "schedule.warmup_epochs=0",
                     *[a for s in TINY_SETS for a in ("--set", s)])  # fmt: skip
    assert result.exit_code == 0, result.output
    folds = json.loads((out / "few_shot_folds.json").read_text())["folds"]
    assert sorted(folds) == ["2way-2shot/fold-0", "2way-2shot/fold-1"]
    train = load_classification_cache(shapes, "train")
    for name, fold in folds.items():
        assert len(fold["classes"]) == 2 and len(fold["train"]) == 4 and len(fold["test"]) == 6
        expected = episode_split(train, Episode(2, 2, fold["fold"], 0, 3), "train")
        assert fold["train"] == expected.shape_ids  # the saved folds are the trained ones
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["samples"] == 6 and metrics["few_shot_way"] == 2
        assert metrics["few_shot_fold"] == fold["fold"] and metrics["train_shapes"] == 4
        config = json.loads((out / name / "model" / "config.json").read_text())
        assert config["class_names"] == fold["classes"]
    summary = json.loads((out / "summary.json").read_text())
    group = summary["groups"]["2-way 2-shot"]
    assert group["n"] == 2 and group["metrics"]["oa"]["n"] == 2
    card = (out / "2way-2shot/fold-1" / "model" / "README.md").read_text()
    assert "2-way 2-shot episode (fold 1" in card and "## Over the 2 folds of 2-way 2-shot" in card
    both = run_cli("--data", str(shapes), "--out", str(tmp_path / "x"), "--few-shot-protocol",
                   "--seeds", "0,1")  # fmt: skip
    assert both.exit_code != 0 and "not combined with --seeds" in " ".join(both.output.split())
