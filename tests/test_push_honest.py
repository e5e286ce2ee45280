"""What a push says is true: the card and its metadata state the teacher, the data and the
initialisation; nothing local is published; flagged runs need --force; no network is one line.

Pre-training runs are written here as the engine leaves them (run.json, recipe.yaml,
metrics.jsonl, summary.json, backbone/ with the engine's card facts); fine-tuning runs are real
(`run_finetune` on synthetic shapes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard, constants

from cd2p import Cd2pBackbone
from cd2p.cli import main
from cd2p.config import load_recipe, save_recipe
from cd2p.hub import PushRefused, push
from cd2p.origin import data_origin, model_origin, push_concerns, synthetic_marker
from cd2p.provenance import PublicPaths

# Tiny models train several times faster on one thread of a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(dim=32, depth=2, num_heads=2, num_groups=8, group_size=8)
RANDOM = "RANDOM teacher (seed 0) — not CLIP (ViT-B-32-quickgelu architecture + ClipCap MLP mapper)"
REAL = "CLIP ViT-B-32-quickgelu (open_clip_model.safetensors) + ClipCap MLP mapper (weights.pt)"
# The real home directory, read before any test moves HOME.
HOME = os.path.expanduser("~")
TINY_FINETUNE = [
    "model.dim=32", "model.depth=2", "model.num_heads=2", "model.num_groups=8",
    "model.group_size=8", "data.num_points=64", "data.batch_size=4", "run.log_every=1",
    "run.checkpoint_every=1000", "schedule.epochs=2", "schedule.warmup_epochs=0",
    "finetune.votes=1",
]  # fmt: skip


def pretrain_run(root: Path, *, random_teacher: bool, synthetic: bool, finished: bool = True,
                 source: str = "pairs") -> Path:  # fmt: skip
    """A pre-training run on `prepare scannet` pairs of a raw ScanNet root (synthetic: with
    the generator's marker), as `cd2p pretrain` leaves it."""
    raw = root / "scannet"
    raw.mkdir(parents=True)
    if synthetic:
        marker = {"generator": "cd2p synthetic scannet"}
        (raw / "cd2p_synthetic.json").write_text(json.dumps(marker))
    pairs = root / "pairs"
    (pairs / "scenes").mkdir(parents=True)
    (pairs / "prepare_config.json").write_text(json.dumps({"format_version": 1, "seed": 0}))
    (pairs / "prepare_report.json").write_text(json.dumps({"root": str(raw), "out": str(pairs)}))
    run = root / "run"
    run.mkdir()
    weights = Path.home() / "w" / "clip.pt"  # a local file in the recipe: never published
    recipe = load_recipe("demo", ["model.dim=32", "model.depth=2", "model.num_heads=2",
                                  "schedule.max_steps=6", f"pretrain.clip_weights={weights}"])
    save_recipe(recipe, run / "recipe.yaml")
    teacher = RANDOM if random_teacher else REAL
    fingerprint = {"sha256": "ab" * 32, "files": 3, "bytes": 100, "path": str(pairs),
                   "source": source}  # fmt: skip
    (run / "run.json").write_text(json.dumps({
        "recipe_name": "demo", "data": [str(pairs)], "pairs": 12, "targets": "stored",
        "teacher": teacher, "random_teacher": random_teacher, "data_fingerprint": fingerprint,
    }))  # fmt: skip
    steps = (2, 4, 6) if finished else (2, 4)
    lines = [{"kind": "train", "step": s, "epoch": 0, "loss": 1.0 / s} for s in steps]
    if finished:
        lines.append({"kind": "final", "step": 6, "weights_sha256": ["0" * 64]})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    training = {"recipe": "demo", "objective": "distill", "data": f"{pairs} (12 pairs)",
                "steps": "6 (2 epochs, batch 4)", "final loss": "0.16", "teacher": teacher,
                "random teacher": "yes (NOT CLIP: a pipeline test)" if random_teacher else "no"}
    provenance = {"data": fingerprint, "seeds": [0], "cd2p_version": "0.1.0"}
    Cd2pBackbone(**SMALL).save_pretrained(
        run / "backbone", model_card_kwargs={"training": training, "provenance": provenance}
    )
    if finished:
        (run / "summary.json").write_text(json.dumps({
            "random_teacher": random_teacher, "backbone": str(run / "backbone"),
            "provenance": provenance}))  # fmt: skip
    return run


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from cd2p.data.modelnet40 import prepare_modelnet40
    from cd2p.data.synthetic_shapes import synthetic_modelnet40

    root = tmp_path_factory.mktemp("shapes")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    raw = synthetic_modelnet40(root / "raw", num_classes=3, train_per_class=4, test_per_class=2,
                               num_points=200, seed=1, show_progress=False)  # fmt: skip
    prepared = prepare_modelnet40(raw, root / "prep", num_points=64, show_progress=False)
    torch.set_num_threads(threads)
    return prepared


def finetune(shapes: Path, out: Path, init: Path | None = None, stop_after: int | None = None):
    from cd2p.engine.finetune import run_finetune

    recipe = load_recipe("finetune-synthetic-shapes", TINY_FINETUNE)
    return run_finetune("classification", recipe, shapes, init, out, progress=False,
                        stop_after=stop_after)  # fmt: skip


def dry_run(run: Path, out: Path, *args: str) -> tuple[ModelCard, str]:
    result = CliRunner().invoke(main, ["push", str(run), "org/m", "--dry-run", str(out), *args])
    assert result.exit_code == 0, result.output
    card = ModelCard.load(out / "README.md")
    return card, result.output


def intro(card: ModelCard) -> str:
    """The card from its title to its training section: what a reader sees first."""
    return card.text.split("## Training")[0]


class FakeApi:
    """Stands for HfApi: records what would have been sent."""

    calls: list[str] = []

    def __init__(self, *args, **kwargs) -> None:
        pass

    def create_repo(self, *args, **kwargs) -> None:
        FakeApi.calls.append("create_repo")

    def create_branch(self, *args, **kwargs) -> None:
        FakeApi.calls.append("create_branch")

    def create_commit(self, repo_id, operations, **kwargs):
        FakeApi.calls.append("create_commit")

        class Commit:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc"
            pr_url = None

        return Commit()


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr("cd2p.hub.HfApi", FakeApi)
    return FakeApi


# -- what the card says ------------------------------------------------------------------------


def test_random_teacher_run_says_so_in_the_card_and_its_metadata(tmp_path):
    run = pretrain_run(tmp_path, random_teacher=True, synthetic=True)
    # The local card already says it, before the training section.
    local = ModelCard.load(run / "backbone" / "README.md")
    assert "RANDOM teacher, not CLIP" in intro(local)
    assert local.data.cd2p_origin["teacher"]["kind"] == "random"

    card, output = dry_run(run, tmp_path / "dry")
    head = intro(card)
    assert "**RANDOM teacher, not CLIP.**" in head and RANDOM in head
    assert "pre-trained by distillation from a seeded **RANDOM teacher**" in head
    assert "frozen CLIP ViT-B/32 + ClipCap teacher turns" not in card.text
    assert "- **random teacher**: yes (NOT CLIP: a pipeline test)" in card.text
    origin = card.data.cd2p_origin
    assert origin["teacher"] == {"kind": "random", "description": RANDOM}
    assert origin["made_by"] == "pre-training" and origin["finished"] is True
    assert "random-teacher" in card.data.tags
    assert "needs --force" in output and "RANDOM teacher" in output  # the dry run warns


def test_synthetic_data_is_marked_and_never_declared_as_scannet(tmp_path):
    run = pretrain_run(tmp_path, random_teacher=False, synthetic=True)
    card, _ = dry_run(run, tmp_path / "dry")
    assert not card.data.datasets  # not `datasets: [scannet]`
    data = card.data.cd2p_origin["data"]
    assert data == {"name": "synthetic-scannet-pairs", "synthetic": True, "hub_id": None,
                    "parts": ["pairs"]}  # fmt: skip
    assert "**Synthetic data.**" in intro(card) and "synthetic-data" in card.data.tags
    assert "ScanNetV2" not in card.text.split("## Results")[0]
    # The garbled data line of a pre-training (a list's text cut as a path) is gone.
    assert "- **prepared data**: `<data>/pairs` (12 pairs; sha256 `abababababababab…`)" in (
        card.text)
    assert "pairs']" not in card.text

    # The same run after the raw scans were deleted: the source the run recorded still tells.
    other = tmp_path / "later"
    run = pretrain_run(other, random_teacher=False, synthetic=True,
                       source="synthetic-scannet-pairs")  # fmt: skip
    (other / "scannet" / "cd2p_synthetic.json").unlink()
    assert model_origin(run / "backbone", run, "backbone")["data"]["synthetic"] is True

    # Real ScanNet pairs (no marker anywhere) with the real teacher: declared, nothing flagged.
    real = tmp_path / "real"
    run = pretrain_run(real, random_teacher=False, synthetic=False)
    card, output = dry_run(run, real / "dry")
    assert card.data.datasets == ["scannet"]
    assert card.data.cd2p_origin["teacher"]["kind"] == "clip+clipcap"
    assert "needs --force" not in output and "> **" not in intro(card)
    assert "pre-trained by distilling 2D image knowledge" in intro(card)


def test_every_prepared_dataset_says_whether_it_is_synthetic(tmp_path, shapes):
    from cd2p.origin import pairs_source

    # Classification caches record their source; so do scene caches (prepare_config.json).
    assert synthetic_marker(shapes) == {"source": "synthetic-modelnet40"}
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    (scenes / "prepare_config.json").write_text(json.dumps({"source": "scannet"}))
    assert synthetic_marker(scenes) is False
    assert synthetic_marker(tmp_path / "gone") is None
    # Pairs record nothing themselves: their report's ScanNet root has the marker.
    run = pretrain_run(tmp_path / "p", random_teacher=True, synthetic=True)
    pairs = tmp_path / "p" / "pairs"
    assert synthetic_marker(pairs) == {"generator": "cd2p synthetic scannet"}
    assert pairs_source([pairs]) == "synthetic-scannet-pairs"
    assert run.is_dir()
    # Gone and unrecorded: unknown, never declared as a Hub dataset.
    assert data_origin([tmp_path / "gone"], "pairs") == {
        "name": "scannet-pairs", "synthetic": None, "hub_id": None, "parts": ["gone"]}
    assert data_origin([], "modelnet40")["hub_id"] == "modelnet40"
    assert data_origin([], "synthetic-modelnet40")["hub_id"] is None


def test_from_scratch_fine_tune_does_not_claim_distillation(tmp_path, shapes):
    finetune(shapes, tmp_path / "ft")
    card, _ = dry_run(tmp_path / "ft", tmp_path / "dry", "--force")
    head = intro(card)
    scratch = "started from random weights (trained from scratch: no pre-training, no distillation)"
    assert scratch in head
    assert "pre-trained by distilling" not in card.text and "distilled from" not in card.text
    assert "knowledge-distillation" not in card.data.tags
    origin = card.data.cd2p_origin
    assert origin["init"] == {"kind": "scratch", "source": None}
    assert origin["teacher"]["kind"] == "none" and origin["made_by"] == "fine-tuning"
    assert origin["data"]["name"] == "synthetic-modelnet40" and origin["data"]["synthetic"]
    assert not card.data.datasets  # synthetic shapes are not ModelNet40
    assert "| initialisation | random weights: trained from scratch" in card.text
    # The local card (written by the engine) does not claim it either.
    local = ModelCard.load(tmp_path / "ft" / "model" / "README.md")
    assert "pre-trained by distilling" not in local.text
    assert "started from random weights" in intro(local)


def test_fine_tune_from_a_random_teacher_backbone_names_it(tmp_path, shapes):
    pre = pretrain_run(tmp_path / "pre", random_teacher=True, synthetic=True)
    finetune(shapes, tmp_path / "ft", init=pre)
    card, output = dry_run(tmp_path / "ft", tmp_path / "dry")
    origin = card.data.cd2p_origin
    assert origin["init"]["kind"] == "pre-trained" and origin["init"]["source"] == "run/backbone"
    assert origin["init"]["teacher"]["kind"] == "random" and origin["teacher"]["kind"] == "random"
    assert origin["init"]["data"]["synthetic"] is True
    head = intro(card)
    assert "distilled from a seeded **RANDOM teacher**" in head
    assert "Backbone pre-trained on synthetic data" in head
    assert "- **initialised from**: run/backbone" in card.text
    assert "its backbone was distilled from a seeded RANDOM teacher" in output


def test_fine_tune_from_a_converted_point_mae_checkpoint_says_so(tmp_path, shapes):
    from safetensors.torch import save_model

    from cd2p.hub import CONVERTED_FROM_KEY

    # As `cd2p convert point-mae` writes it: the converter's record inside the weights.
    converted = tmp_path / "point-mae"
    backbone = Cd2pBackbone(**SMALL)
    backbone.save_pretrained(converted)
    record = {"file": "pretrain.pth", "layout": "point-mae", "kept": 10, "dropped": []}
    save_model(backbone, str(converted / "model.safetensors"),
               metadata={"format": "pt", CONVERTED_FROM_KEY: json.dumps(record)})  # fmt: skip
    finetune(shapes, tmp_path / "ft", init=converted)
    card, _ = dry_run(tmp_path / "ft", tmp_path / "dry")
    init = card.data.cd2p_origin["init"]
    assert (init["kind"], init["source"]) == ("converted", "point-mae")
    assert init["file"] == "pretrain.pth"
    assert "converted with `cd2p convert point-mae` (no distillation)" in intro(card)
    assert "knowledge-distillation" not in card.data.tags
    # The converted model pushed alone: a conversion, not a cd2p training run.
    card, output = dry_run(converted, tmp_path / "dry-converted")
    assert card.data.cd2p_origin["made_by"] == "conversion" and "needs --force" not in output


def test_an_init_is_a_hub_model_only_when_the_card_names_it(tmp_path, monkeypatch):
    from cd2p.origin import init_origin

    monkeypatch.chdir(tmp_path)  # "runs/pre" was relative to where the run was started
    assert init_origin("runs/pre")["kind"] == "unknown"
    assert init_origin("org/cd2p-backbone", "org/cd2p-backbone")["kind"] == "hub"
    assert init_origin(None) == {"kind": "scratch", "source": None}
    pre = pretrain_run(tmp_path / "runs", random_teacher=True, synthetic=False)
    found = init_origin("runs/run")  # the same relative path, from the right directory
    assert found["kind"] == "pre-trained" and found["teacher"]["kind"] == "random"
    assert pre.is_dir()


# -- nothing local -----------------------------------------------------------------------------


def test_no_uploaded_file_holds_a_local_path(tmp_path, shapes, monkeypatch):
    # The data and a weights file live in the home directory, as they do for most users.
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    pre = pretrain_run(home / "work", random_teacher=True, synthetic=True)
    (pre / "eval").mkdir()
    (pre / "eval" / "metrics.json").write_text(json.dumps({
        "oa": 0.5, "dataset": "synthetic-modelnet40", "split": "test", "model": str(pre),
        "data": str(shapes), "provenance": {"data": {"sha256": "cd" * 32, "path": str(shapes)}},
        "note": f"evaluated with --data {shapes} --out {pre / 'eval'} from {tmp_path}",
    }))  # fmt: skip
    finetune(shapes, tmp_path / "ft", init=pre / "backbone")
    for run in (pre, tmp_path / "ft"):
        out = tmp_path / f"dry-{run.name}"
        dry_run(run, out)
        uploaded = [p for p in out.rglob("*") if p.is_file()]
        assert {"README.md", "recipe.yaml", "metrics.jsonl"} <= {p.name for p in uploaded}
        for path in uploaded:
            text = path.read_bytes().decode("utf-8", errors="replace")
            for local in {str(tmp_path), str(tmp_path.resolve()), HOME, str(home)}:
                assert local not in text, (path, local)
    # Paths become placeholders; the fingerprint stays.
    recipe = (tmp_path / "dry-run" / "recipe.yaml").read_text()
    assert "clip_weights: ~/w/clip.pt" in recipe
    evaluated = json.loads((tmp_path / "dry-run" / "eval" / "metrics.json").read_text())
    assert evaluated["data"] == "<data>/prep" and evaluated["model"] == "<run>"
    assert evaluated["provenance"]["data"] == {"sha256": "cd" * 32, "path": "<data>/prep"}
    assert evaluated["note"] == ("evaluated with --data <data>/prep --out <run>/eval from "
                                 f"<local>/{tmp_path.name}")  # fmt: skip
    metrics = json.loads((tmp_path / "dry-ft" / "metrics.json").read_text())
    assert metrics["data"] == "<data>/prep" and len(metrics["provenance"]["data"]["sha256"]) == 64


def test_a_local_path_left_in_the_model_files_stops_the_push(tmp_path):
    # config.json holds only the constructor's arguments (anything else is refused on
    # loading), so the place left for a stray path is the weights file's header.
    from safetensors.torch import save_model

    model = tmp_path / "model"
    backbone = Cd2pBackbone(**SMALL)
    backbone.save_pretrained(model)
    save_model(backbone, str(model / "model.safetensors"),
               metadata={"format": "pt", "cd2p_model_kind": "backbone",
                         "note": str(model / "x")})  # fmt: skip
    with pytest.raises(ValueError, match=r"model.safetensors \("):
        push(model, "org/m", dry_run_dir=tmp_path / "dry")
    assert not (tmp_path / "dry").exists()


def test_public_paths_keep_urls_ids_and_ratios():
    public = PublicPaths(data=["/srv/d/mn40"], run="/srv/runs/r1")
    text = public.text("/srv/d/mn40/train.npz, /srv/d/mn40b")
    assert text == "<data>/mn40/train.npz, <local>/mn40b"
    assert public.text("/srv/runs/r1/model") == "<run>/model"
    for kept in ("https://huggingface.co/org/x", "org/name", "ViT-B/32", "samples/s", "a / b",
                 "</details>"):  # fmt: skip
        assert public.text(kept) == kept


# -- --force -----------------------------------------------------------------------------------


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def test_flagged_runs_need_force_and_nothing_is_sent_without_it(tmp_path, shapes, fake_api):
    runner = CliRunner()
    random_run = pretrain_run(tmp_path / "r", random_teacher=True, synthetic=False)
    synthetic_run = tmp_path / "ft"
    finetune(shapes, synthetic_run)
    stopped = tmp_path / "stopped"
    result = finetune(shapes, stopped, stop_after=3)
    assert not result.run.completed and (stopped / "model").is_dir()  # the best so far exists
    unfinished = pretrain_run(tmp_path / "u", random_teacher=False, synthetic=False,
                              finished=False)  # fmt: skip
    cases = [
        (random_run, "distilled from a seeded RANDOM teacher, not CLIP"),
        (synthetic_run, "trained on synthetic data (synthetic-modelnet40)"),
        (stopped, f"its training did not finish (stopped at step 3 of {result.run.total_steps})"),
        (unfinished, "its training did not finish (stopped at step 4 of 6)"),
    ]
    for run, reason in cases:
        res = runner.invoke(main, ["push", str(run), "org/m"])
        assert res.exit_code == 1, res.output
        line = one_error_line(res.output)
        assert reason in line and "--force" in line and "Traceback" not in res.output
        assert fake_api.calls == []
        with pytest.raises(PushRefused, match="--force"):
            push(run, "org/m")
    for run, _ in cases:
        res = runner.invoke(main, ["push", str(run), "org/m", "--force"])
        assert res.exit_code == 0, res.output
    assert fake_api.calls == ["create_repo", "create_commit"] * len(cases)
    # A finished run on real data with the real teacher needs nothing.
    fine = pretrain_run(tmp_path / "ok", random_teacher=False, synthetic=False)
    assert push_concerns(model_origin(fine / "backbone", fine, "backbone")) == []
    res = runner.invoke(main, ["push", str(fine), "org/m"])
    assert res.exit_code == 0, res.output


# -- no network --------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """The Hub at a closed local port, online mode, a fake token and an empty cache."""
    endpoint = "http://127.0.0.1:9"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 2)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    return endpoint


def test_push_and_pull_without_a_network_say_so_in_one_line(tmp_path, no_network):
    run = pretrain_run(tmp_path, random_teacher=False, synthetic=False)
    runner = CliRunner()
    res = runner.invoke(main, ["push", str(run), "org/m"])
    assert res.exit_code == 1
    line = one_error_line(res.output)
    assert line.startswith(f"error: cannot reach the Hugging Face Hub at {no_network} (")
    assert "HF_ENDPOINT" in line and "nothing was pushed" in line
    res = runner.invoke(main, ["pull", "org/m"])
    assert res.exit_code == 1
    line = one_error_line(res.output)
    assert line.startswith(f"error: cannot reach the Hugging Face Hub at {no_network} (")
