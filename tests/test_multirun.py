"""Baselines through one protocol: multi-seed fine-tuning with mean ± std, `cd2p evaluate` over
such a run, `cd2p compare` (and its refusal of runs on different data), and the provenance in
metrics.json and the model cards; on a tiny synthetic dataset written in the real format."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard

from cd2p.cli import main
from cd2p.data.modelnet40 import prepare_modelnet40
from cd2p.data.synthetic_shapes import synthetic_modelnet40
from cd2p.provenance import data_fingerprint

TINY_SETS = [
    "model.dim=32", "model.depth=2", "model.num_heads=2", "model.num_groups=8",
    "model.group_size=8", "data.num_points=64", "data.batch_size=4", "run.log_every=1",
    "run.checkpoint_every=1000", "finetune.head_channels=[32]", "finetune.votes=2",
    "schedule.epochs=2", "schedule.warmup_epochs=0",
]  # fmt: skip
SETS = [a for s in TINY_SETS for a in ("--set", s)]

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result, " ".join(result.output.split())  # rich wraps long lines


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """4 classes, 6 training and 3 test shapes each, prepared with 96 FPS points."""
    root = tmp_path_factory.mktemp("multirun")
    raw = synthetic_modelnet40(root / "raw", num_classes=4, train_per_class=6, test_per_class=3,
                               num_points=200, seed=2, show_progress=False)  # fmt: skip
    return prepare_modelnet40(raw, root / "prep", num_points=96, show_progress=False)


@pytest.fixture(scope="module")
def three_seeds(shapes, tmp_path_factory):
    """A 3-seed fine-tune through the CLI, and its terminal output."""
    out = tmp_path_factory.mktemp("seeds") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared machine: one thread is faster
    result, text = invoke("finetune", "classification", "--recipe", "finetune-synthetic-shapes",
                          "--data", str(shapes), "--out", str(out), "--seeds", "0,1,2",
                          "--no-progress", *SETS)  # fmt: skip
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return out, text


def test_three_seeds_report_mean_std_min_max_equal_to_a_hand_computation(three_seeds, shapes):
    out, text = three_seeds
    summary = json.loads((out / "summary.json").read_text())
    per_seed = [json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in range(3)]
    assert [m["provenance"]["seeds"] for m in per_seed] == [[0], [1], [2]]
    assert "seed: 2" in (out / "seed-2" / "recipe.yaml").read_text()
    group = summary["groups"]["3 seeds"]
    assert group["n"] == 3 and group["members"] == ["seed-0", "seed-1", "seed-2"]
    assert set(group["metrics"]) == {"oa", "macc", "oa_vote", "macc_vote"}  # with and without
    for metric, stats in group["metrics"].items():
        values = [m[metric] for m in per_seed]
        assert stats["values"] == values
        assert stats["mean"] == pytest.approx(sum(values) / 3, abs=1e-12)
        assert stats["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
        assert (stats["min"], stats["max"]) == (min(values), max(values))
    assert summary["selection_split"] == summary["evaluation_split"] == "test"
    assert summary["complete"] and summary["provenance"]["seeds"] == [0, 1, 2]
    oa = group["metrics"]["oa"]
    assert f"{100 * oa['mean']:.2f} ± {100 * oa['std']:.2f}" in text
    assert "selected on test; evaluated on test" in text

    # Every member's card: the summary over the seeds and the provenance, in metadata that
    # huggingface_hub's card classes parse.
    card = ModelCard.load(out / "seed-1" / "model" / "README.md")
    assert card.data.cd2p_runs["member"] == "seed-1" and card.data.cd2p_runs["members"] == 3
    runs_oa = card.data.cd2p_runs["groups"]["3 seeds"]["metrics"]["oa"]
    assert runs_oa["mean"] == pytest.approx(oa["mean"]) and "values" not in runs_oa
    prov = card.data.cd2p_provenance
    assert prov["data"]["sha256"] == data_fingerprint(shapes)["sha256"]
    assert prov["data"]["path"] == shapes.name  # no local paths in a public card
    assert prov["seeds"] == [1] and prov["torch"] == str(torch.__version__)
    assert prov["samples_per_s"] > 0 and prov["peak_memory_mb"] > 0 and prov["wall_time_s"] > 0
    assert prov["gpu_hours"] == 0.0 and prov["hardware"]["device"] == "cpu"
    for section in ("## Over 3 seeds", "## Provenance", "| oa | "):
        assert section in card.text


def test_evaluate_over_the_run_gives_the_same_numbers(three_seeds, shapes, tmp_path):
    out, _ = three_seeds
    result, text = invoke("evaluate", "classification", "--model", str(out), "--data",
                          str(shapes), "--votes", "2", "--out", str(tmp_path / "eval"))  # fmt: skip
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    trained = json.loads((out / "summary.json").read_text())
    for metric, stats in trained["groups"]["3 seeds"]["metrics"].items():
        assert evaluated["groups"]["3 seeds"]["metrics"][metric]["values"] == stats["values"]
    assert evaluated["split"] == "test" and evaluated["provenance"]["data"]["sha256"]
    assert "3 seeds" in text and "±" in text


def test_resume_trains_only_the_missing_seed(three_seeds, tmp_path):
    out, _ = three_seeds
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    before = json.loads((copy / "summary.json").read_text())
    shutil.rmtree(copy / "seed-2")
    (copy / "summary.json").unlink()
    result, text = invoke("finetune", "classification", "--resume", str(copy), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "seed-0 (done, kept)" in text and "seed-2 (training)" in text
    after = json.loads((copy / "summary.json").read_text())
    assert after["groups"] == before["groups"]  # CPU training is a pure function of the seed


def test_compare_tabulates_same_data_and_refuses_other_data(three_seeds, shapes, tmp_path):
    out, _ = three_seeds
    single = tmp_path / "single"
    result, _ = invoke("finetune", "classification", "--recipe", "finetune-synthetic-shapes",
                       "--data", str(shapes), "--out", str(single), "--no-progress",
                       *SETS, "--set", "optim.lr=3e-3")  # fmt: skip
    assert result.exit_code == 0, result.output
    png = tmp_path / "cmp.png"
    result, text = invoke("compare", str(out), str(single), "--label", "seeds", "--label", "one",
                          "--out", str(png), "--json", str(tmp_path / "cmp.json"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((tmp_path / "cmp.json").read_text())
    assert table["metrics"] == ["oa", "macc", "oa_vote", "macc_vote"]
    assert [(r["label"], r["metrics"]["oa"]["n"]) for r in table["rows"]] == [("seeds", 3),
                                                                               ("one", 1)]
    assert "seeds (3" in text and "±" in text

    # The same data copied elsewhere (and its report rewritten) keeps its fingerprint; one
    # changed shape label changes it, and compare refuses the pair.
    other = tmp_path / "other-data"
    shutil.copytree(shapes, other)
    (other / "prepare_report.json").write_text('{"seconds": 12.5}')
    assert data_fingerprint(other) == data_fingerprint(shapes)
    meta = json.loads((other / "meta.json").read_text())
    meta["splits"]["test"]["shape_ids"][0] = "renamed_0001"
    (other / "meta.json").write_text(json.dumps(meta))
    assert data_fingerprint(other)["sha256"] != data_fingerprint(shapes)["sha256"]
    moved = tmp_path / "moved"
    result, _ = invoke("finetune", "classification", "--recipe", "finetune-synthetic-shapes",
                       "--data", str(other), "--out", str(moved), "--no-progress", *SETS)
    assert result.exit_code == 0, result.output
    result, text = invoke("compare", str(out), str(moved), "--out", str(tmp_path / "no.png"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "read different prepared data" in text and not (tmp_path / "no.png").exists()
    result, text = invoke("compare", str(out), "--out", str(tmp_path / "no.png"))
    assert result.exit_code == 1 and "at least two runs" in text
