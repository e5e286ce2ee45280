"""Task models, initialisation from a pre-trained backbone, voting, the linear probe, and short
CPU fine-tunes on the synthetic shapes (real learning problems, real files)."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cd2p import Cd2pBackbone, Cd2pForClassification, Cd2pForPartSegmentation
from cd2p.cli import main
from cd2p.config import load_recipe
from cd2p.data.classification import load_classification_cache
from cd2p.data.modelnet40 import prepare_modelnet40
from cd2p.data.shapenetpart import load_partseg_cache, prepare_shapenetpart
from cd2p.data.synthetic_shapes import synthetic_modelnet40, synthetic_shapenetpart
from cd2p.engine.finetune import build_task_model, load_backbone, run_finetune
from cd2p.engine.linear_probe import fit_linear_classifier, run_linear_probe
from cd2p.engine.metrics import PartSegMeter
from cd2p.engine.metrics_log import read_metrics
from cd2p.models.partseg import default_feature_blocks
from cd2p.tasks.classification import classification_logits
from cd2p.tasks.classification import vote_view as _vote_view

TINY = dict(dim=64, depth=3, num_heads=4, num_groups=16, group_size=16)
# Tiny, fast settings on top of the shipped synthetic recipes.
TINY_SETS = [
    "model.dim=64", "model.depth=3", "model.num_heads=4", "model.num_groups=16",
    "model.group_size=8", "data.num_points=128", "run.log_every=5", "run.checkpoint_every=1000",
]  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    raw = synthetic_modelnet40(root / "raw", num_classes=8, train_per_class=12, test_per_class=5,
                               num_points=400, seed=1, show_progress=False)  # fmt: skip
    return prepare_modelnet40(raw, root / "prep", num_points=256, show_progress=False)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    raw = synthetic_shapenetpart(root / "raw", train_per_category=10, val_per_category=1,
                                 test_per_category=4, points_range=(250, 350), seed=1,
                                 show_progress=False)  # fmt: skip
    return prepare_shapenetpart(raw, root / "prep", show_progress=False)


def test_task_models_round_trip_through_the_hub(tmp_path):
    cls_model = Cd2pForClassification(backbone=TINY, num_classes=3, class_names=["a", "b", "c"])
    seg_model = Cd2pForPartSegmentation(
        backbone=TINY, num_parts=5, num_categories=2, propagation_channels=(32, 32),
        head_channels=(32, 16), category_names=["x", "y"], category_parts=[[0, 1], [2, 3, 4]],
    )  # fmt: skip
    pts, cats = torch.rand(2, 96, 3), torch.tensor([0, 1])
    for model, args in ((cls_model, (pts,)), (seg_model, (pts, cats))):
        model.eval().save_pretrained(tmp_path / model.model_kind)
        config = json.loads((tmp_path / model.model_kind / "config.json").read_text())
        assert config["model_kind"] == model.model_kind and config["backbone"]["dim"] == 64
        loaded = type(model).from_pretrained(tmp_path / model.model_kind)
        assert torch.equal(model(*args), loaded(*args))
    assert seg_model(pts, cats).shape == (2, 96, 5)
    assert set(seg_model.predict(pts, cats)[1].tolist()) <= {2, 3, 4}
    assert default_feature_blocks(12) == [4, 8, 12] and default_feature_blocks(6) == [2, 4, 6]
    assert "Cd2pForClassification" in (tmp_path / "classification" / "README.md").read_text()


def test_init_from_a_backbone_dir_loads_its_weights(tmp_path, shapes, parts):
    torch.manual_seed(3)
    pretrained = Cd2pBackbone(dim=32, depth=2, num_heads=2, num_groups=8, group_size=8)
    pretrained.save_pretrained(tmp_path / "run" / "backbone")
    backbone = load_backbone(tmp_path / "run")  # a pre-training run directory
    recipe = load_recipe("finetune-synthetic-shapes", TINY_SETS)
    for task, path, load in (("classification", shapes, load_classification_cache),
                             ("partseg", parts, load_partseg_cache)):  # fmt: skip
        model = build_task_model(task, recipe, load(path, "train"), backbone)
        own = dict(model.backbone.state_dict())
        for key, value in pretrained.state_dict().items():
            assert torch.equal(own[key], value), key
        # The task's patch settings come from the recipe, the architecture from the backbone.
        assert model.backbone.num_groups == 16 and model.backbone.dim == 32
        scratch = build_task_model(task, recipe, load(path, "train"))
        assert scratch.backbone.dim == 64
    head = Cd2pBackbone(**TINY)
    Cd2pForClassification(backbone=TINY, num_classes=2).save_pretrained(tmp_path / "cls")
    with pytest.raises(ValueError, match="holds a 'classification' model"):
        load_backbone(tmp_path / "cls")
    assert head.dim == 64


class MeanLinear(nn.Module):
    """Logits that depend on every point of a view: a linear map of the cloud's mean."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.num_points = 32

    def forward(self, points):
        return self.fc(points.mean(1) * 10)


def test_voting_averages_the_logits_of_several_views(shapes):
    data = load_classification_cache(shapes, "test")
    model = MeanLinear().eval()
    plain, voted = classification_logits(model, data, 32, votes=3, batch_size=7)
    assert torch.allclose(plain, model(data.points[:, :32]))
    pool = data.points[:, : round(1.2 * 32)]
    for i in (0, 9, len(data) - 1):
        views = torch.stack([_vote_view(pool[i], i, v, 32, _settings())[1] for v in range(3)])
        torch.testing.assert_close(voted[i], model(views).mean(0))
    assert not torch.allclose(voted, plain)
    # Views depend on (seed, shape, vote) only, not on how shapes are batched.
    torch.testing.assert_close(classification_logits(model, data, 32, 3, batch_size=40)[1], voted)


def _settings():
    from cd2p.engine.evaluation import VoteSettings

    return VoteSettings()


def test_linear_classifier_and_probe(tmp_path, shapes):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 4
    y = torch.arange(3).repeat_interleave(20)
    x = centers[y] + torch.randn(60, 5, generator=g)
    w, b = fit_linear_classifier(x, y, 3, l2=1e-4)
    assert w.shape == (5, 3) and ((x @ w + b).argmax(-1) == y).float().mean() == 1.0
    recipe = load_recipe("finetune-synthetic-shapes", TINY_SETS)
    result = run_linear_probe(recipe, shapes, None, tmp_path / "probe")
    saved = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert saved["oa"] == result.metrics["oa"] and (tmp_path / "probe" / "probe").is_dir()
    # Synthetic data is never called ModelNet40 (marker written by the generator).
    assert load_classification_cache(shapes, "train").source == "synthetic-modelnet40"
    # Even random features separate the primitives better than chance (1/8).
    assert result.metrics["oa"] > 0.25

    # The probe exports a model that evaluate, plot and push (dry run) take like any run.
    run = tmp_path / "probe"
    model = Cd2pForClassification.from_pretrained(run / "model")
    assert model.head_type == "linear-probe" and not hasattr(model, "cls_token")
    runner = CliRunner()
    evaluated = runner.invoke(main, ["evaluate", "classification", "--model", str(run / "model"),
                                     "--data", str(shapes), "--out", str(run / "eval")])
    assert evaluated.exit_code == 0, evaluated.output
    again = json.loads((run / "eval" / "metrics.json").read_text())
    assert again["oa"] == saved["oa"] and again["macc"] == saved["macc"]
    assert saved["metric_descriptions"]["oa"].startswith("overall accuracy, one view per shape")
    assert "predictions" in saved["confusion_matrix_of"]
    plotted = runner.invoke(main, ["plot", str(run)])
    assert plotted.exit_code == 0 and (run / "metrics.png").is_file(), plotted.output
    pushed = runner.invoke(main, ["push", str(run), "org/cd2p-probe", "--dry-run",
                                  str(tmp_path / "upload")])  # fmt: skip
    assert pushed.exit_code == 0, pushed.output
    uploaded = {p.name for p in (tmp_path / "upload").iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "metrics.json"} <= uploaded
    card = (tmp_path / "upload" / "README.md").read_text()
    assert "linear probe" in card


def test_classification_learns_and_evaluate_reproduces_it(tmp_path, shapes):
    # Measured: OA 0.775 (0.75 with 2 votes) on 40 test shapes after 8 epochs; chance 0.125.
    recipe = load_recipe("finetune-synthetic-shapes", [
        *TINY_SETS, "data.batch_size=8", "schedule.epochs=8", "run.eval_every=4", "optim.lr=2e-3",
        "finetune.votes=2", "finetune.head_channels=[64]",
    ])  # fmt: skip
    result = run_finetune("classification", recipe, shapes, None, tmp_path / "run", progress=False)
    print("classification", result.metrics)
    assert result.metrics["oa"] >= 0.5, result.metrics
    assert set(result.metrics) == {"oa", "macc", "oa_vote", "macc_vote"}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [e["step"] for e in evals if e["kind"] == "eval"] == [48, 96]
    cli = CliRunner().invoke(main, [
        "evaluate", "classification", "--model", str(tmp_path / "run" / "model"),
        "--data", str(shapes), "--votes", "2", "--out", str(tmp_path / "eval"),
    ])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("oa", "macc", "oa_vote", "macc_vote"):
        assert again[key] == saved[key] == result.metrics[key]
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 1000
    assert "sphere" in cli.output and "OA" in cli.output


def test_partseg_beats_the_majority_part_baseline(tmp_path, parts):
    # Measured: instance mIoU 0.46 vs 0.28 for "every point is its category's commonest part".
    recipe = load_recipe("finetune-synthetic-parts", [
        *TINY_SETS, "data.batch_size=8", "schedule.epochs=10", "run.eval_every=10", "optim.lr=2e-3",
        "finetune.propagation_channels=[64,64]", "finetune.seg_head_channels=[64,32]",
    ])  # fmt: skip
    result = run_finetune("partseg", recipe, parts, None, tmp_path / "run", progress=False)
    train, test = load_partseg_cache(parts, "trainval"), load_partseg_cache(parts, "test")
    counts = torch.zeros(train.num_categories, train.num_parts)
    for i in range(len(train)):
        counts[int(train.categories[i])] += torch.bincount(
            train.shape(i)[1], minlength=train.num_parts
        )
    baseline = PartSegMeter(test.category_parts, test.category_names)
    for i in range(len(test)):
        labels = test.shape(i)[1]
        majority = counts[int(test.categories[i])].argmax().expand_as(labels)
        baseline.update(majority[None], labels[None], test.categories[i : i + 1])
    base = baseline.compute()["instance_miou"]
    print("partseg", result.metrics, "majority baseline", base)
    assert result.metrics["instance_miou"] > base + 0.1, (result.metrics, base)
    loaded = Cd2pForPartSegmentation.from_pretrained(tmp_path / "run" / "model")
    assert loaded.category_names == test.category_names


def test_interrupted_finetune_resumes_to_the_same_model(tmp_path, shapes):
    sets = [*TINY_SETS, "data.batch_size=8", "schedule.epochs=2", "run.eval_every=1",
            "run.checkpoint_every=6", "finetune.votes=1", "finetune.head_channels=[32]",
            "data.num_workers=0"]  # fmt: skip
    recipe = load_recipe("finetune-synthetic-shapes", sets)
    whole = run_finetune("classification", recipe, shapes, None, tmp_path / "whole", progress=False)
    stopped = run_finetune(
        "classification", recipe, shapes, None, tmp_path / "part", progress=False, stop_after=6
    )
    assert not stopped.run.completed and stopped.run.step == 6
    args = ["finetune", "classification", "--resume", str(tmp_path / "part"), "--no-progress"]
    cli = CliRunner().invoke(main, args)
    assert cli.exit_code == 0, cli.output
    ref = Cd2pForClassification.from_pretrained(tmp_path / "whole" / "model").state_dict()
    got = Cd2pForClassification.from_pretrained(tmp_path / "part" / "model").state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    saved = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert saved["oa"] == whole.metrics["oa"]


def test_a_finished_finetune_is_extended_and_inconsistent_sets_are_refused(tmp_path, shapes):
    sets = [*TINY_SETS, "data.batch_size=16", "schedule.epochs=1", "schedule.warmup_epochs=0",
            "finetune.votes=1", "finetune.head_channels=[32]", "data.num_workers=0"]  # fmt: skip
    recipe = load_recipe("finetune-synthetic-shapes", sets)
    first = run_finetune("classification", recipe, shapes, None, tmp_path / "run", progress=False)
    assert first.run.completed and first.run.step == 6
    runner = CliRunner()
    args = ["finetune", "classification", "--resume", str(tmp_path / "run"), "--no-progress"]
    refused = runner.invoke(main, [*args, "--set", "optim.lr=0.1"])
    assert refused.exit_code != 0 and "cannot change optim.lr" in refused.output
    assert "Traceback" not in refused.output
    extended = runner.invoke(main, [*args, "--set", "schedule.epochs=3"])
    assert extended.exit_code == 0, extended.output
    steps = [r["step"] for r in read_metrics(tmp_path / "run", "train")]
    assert steps[-1] == 18 and "schedule.epochs: 1 -> 3" in extended.output
    assert "epochs: 3" in (tmp_path / "run" / "recipe.yaml").read_text()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["best_step"] in (6, 12, 18)


def test_sigterm_during_finetune_leaves_a_checkpoint_and_prints_the_resume_command(
    tmp_path, shapes
):
    """A cluster's time limit (SIGTERM) in the middle of `cd2p finetune`: the step finishes, a
    checkpoint is written, the exact --resume command is printed, and it resumes exactly."""
    import os
    import signal
    import threading
    import time

    sets = [*TINY_SETS, "data.batch_size=8", "schedule.epochs=4", "finetune.votes=1",
            "finetune.head_channels=[32]", "data.num_workers=0", "run.log_every=1"]  # fmt: skip
    recipe = load_recipe("finetune-synthetic-shapes", sets)
    whole = run_finetune("classification", recipe, shapes, None, tmp_path / "whole", progress=False)
    run = tmp_path / "run"
    log = run / "metrics.jsonl"

    def send_sigterm_after_the_first_steps():
        deadline = time.time() + 60
        while time.time() < deadline:
            if log.is_file() and log.read_text().count('"train"') >= 2:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.005)

    late = []  # a signal outside training must fail this test, not kill pytest
    previous = signal.signal(signal.SIGTERM, lambda *_: late.append(True))
    watcher = threading.Thread(target=send_sigterm_after_the_first_steps, daemon=True)
    watcher.start()
    args = ["finetune", "classification", "--recipe", "finetune-synthetic-shapes",
            *[a for s in sets for a in ("--set", s)], "--data", str(shapes), "--out", str(run),
            "--no-progress"]  # fmt: skip
    try:
        stopped = CliRunner().invoke(main, args)
        watcher.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not late
    assert stopped.exit_code == 143, stopped.output
    assert f"cd2p finetune classification --resume {run}" in stopped.output
    step = max(r["step"] for r in read_metrics(run, "train"))
    assert 2 <= step < 48 and (run / "checkpoints" / f"step-{step:08d}").is_dir()
    resumed = CliRunner().invoke(main, ["finetune", "classification", "--resume", str(run),
                                        "--no-progress"])  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    ref = Cd2pForClassification.from_pretrained(tmp_path / "whole" / "model").state_dict()
    got = Cd2pForClassification.from_pretrained(run / "model").state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert json.loads((run / "metrics.json").read_text())["oa"] == whole.metrics["oa"]
