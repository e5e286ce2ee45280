"""Damaged checkpoints never block a resume nor cost the good ones; nothing non-finite is kept.

The engine's in-test regression problem (as in test_engine.py): a run "killed" after its
checkpoint at step 12 of 24 whose newest checkpoint is then damaged resumes from the previous
intact one and still ends bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console
from torch import nn

from cd2p._atomic import atomic_directory, remove_stale_temporaries
from cd2p.cli import main
from cd2p.config import Recipe, apply_overrides, load_recipe
from cd2p.engine import Trainer, seed_everything
from cd2p.engine.checkpoint import (
    CheckpointDamaged,
    NoIntactCheckpoint,
    NonFiniteCheckpoint,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from cd2p.engine.trainer import TrainingDiverged

# The toy problem of the trainer's own tests (a resume there is already bit-exact).
from test_engine import Clouds, TinyNet, augment, recipe


def train(run_dir: Path, r: Recipe, resume: bool = False, stop_after: int | None = None, **kw):
    seed_everything(r.run.seed)
    model = TinyNet()
    kw.setdefault("prepare_batch", augment)
    trainer = Trainer(model, Clouds(), r, run_dir, progress=False, **kw)
    return model, trainer.fit(resume=resume, stop_after=stop_after)


def quiet_console() -> tuple[Console, io.StringIO]:
    text = io.StringIO()
    return Console(file=text, width=80, force_terminal=False), text


def warnings_of(text: io.StringIO) -> list[str]:
    return [line for line in text.getvalue().splitlines() if line.startswith("warning:")]


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of the uninterrupted 24-step run."""
    model, result = train(tmp_path_factory.mktemp("full") / "run", recipe())
    assert result.completed and result.step == 24
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory) -> Path:
    """A run stopped after step 12: checkpoints at steps 4, 8 and 12, ``latest`` = step 12."""
    run_dir = tmp_path_factory.mktemp("cut") / "run"
    train(run_dir, recipe(), stop_after=12)
    return run_dir


@pytest.fixture
def cut(cut_run: Path, tmp_path: Path) -> Path:
    """A fresh copy of the stopped run for one test to damage."""
    shutil.copytree(cut_run, tmp_path / "run")
    return tmp_path / "run"


def assert_same_weights(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == full.keys()
    for key, value in state.items():
        assert torch.equal(value, full[key]), key


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


DAMAGES = {
    "truncated model": ("model.safetensors", truncate, "truncated or corrupt"),
    "zero-byte model": ("model.safetensors", lambda f: f.write_bytes(b""), "empty (0 bytes)"),
    "empty state.json": ("state.json", lambda f: f.write_text(""), "empty"),
    "corrupt state.json": (
        "state.json",
        lambda f: f.write_text('{"step": 12, "ep'),
        "not valid JSON",
    ),  # fmt: skip
    "state.json without its keys": (
        "state.json",
        lambda f: f.write_text('{"step": 12}'),
        "has no 'epoch'",
    ),  # fmt: skip
    "truncated optimizer": ("optimizer.safetensors", truncate, "truncated or corrupt"),
    "corrupt optimizer.json": (
        "optimizer.json",
        lambda f: f.write_text("[1, 2]"),
        "not an object",
    ),  # fmt: skip
    "corrupt rng": ("rng.safetensors", lambda f: f.write_bytes(b"\xff" * 64), "truncated"),
    "missing recipe": ("recipe.yaml", lambda f: f.unlink(), "missing"),
    "corrupt recipe": ("recipe.yaml", lambda f: f.write_text("run: [unclosed"), "not valid YAML"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_falls_back_and_the_run_ends_bit_identical(
    damage: str, cut: Path, full: dict[str, torch.Tensor]
) -> None:
    name, spoil, problem = DAMAGES[damage]
    damaged = cut / "checkpoints" / "step-00000012" / name
    spoil(damaged)
    with pytest.raises(CheckpointDamaged, match=re.escape(problem)):
        verify_checkpoint(damaged.parent)

    console, text = quiet_console()
    model, result = train(cut, recipe(), resume=True, console=console)
    assert result.resumed_from == 8 and result.completed and result.step == 24
    assert_same_weights(model, full)
    lines = warnings_of(text)
    assert len(lines) == 2, text.getvalue()
    # one line naming the file and what is wrong, then where the run continues from
    assert str(damaged) in lines[0] and problem in lines[0]
    assert "falling back to" in lines[1] and lines[1].endswith("step-00000008, the newest "
                                                              "intact checkpoint")  # fmt: skip
    # the damaged checkpoint was written again when the run got there
    verify_checkpoint(damaged.parent)
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step-00000024"


def test_no_intact_checkpoint_is_one_error_naming_the_run(cut: Path) -> None:
    for step in (4, 8, 12):
        (cut / "checkpoints" / f"step-{step:08d}" / "state.json").write_text("")
    console, text = quiet_console()
    with pytest.raises(NoIntactCheckpoint, match=f"{cut} has no intact checkpoint") as info:
        train(cut, recipe(), resume=True, console=console)
    assert isinstance(info.value, FileNotFoundError)  # the CLI prints it as one line
    assert "step-00000012, step-00000008, step-00000004" in str(info.value)
    assert len(warnings_of(text)) == 3  # one per damaged checkpoint


@pytest.mark.parametrize(
    "pointer",
    ["../../elsewhere/step-00000004", "ABSOLUTE", "step-8", "step-00000012/../../x", ""],
)
def test_latest_cannot_point_outside_the_run(pointer: str, cut: Path, tmp_path: Path) -> None:
    # A valid checkpoint elsewhere, which a followed pointer would load.
    elsewhere = tmp_path / "elsewhere" / "step-00000004"
    shutil.copytree(cut / "checkpoints" / "step-00000004", elsewhere)
    pointer = str(elsewhere) if pointer == "ABSOLUTE" else pointer
    (cut / "checkpoints" / "latest").write_text(pointer + "\n")
    messages: list[str] = []
    assert latest_checkpoint(cut, warn=messages.append) == cut / "checkpoints" / "step-00000012"
    assert "not the name of a checkpoint of this run" in messages[0]
    assert "falling back to" in messages[1] and len(messages) == 2


def test_latest_naming_a_link_out_of_the_run_and_a_missing_latest(cut: Path, tmp_path: Path):
    root = cut / "checkpoints"
    shutil.copytree(root / "step-00000004", tmp_path / "outside")
    (root / "step-00000099").symlink_to(tmp_path / "outside")
    (root / "latest").write_text("step-00000099\n")
    messages: list[str] = []
    assert latest_checkpoint(cut, warn=messages.append) == root / "step-00000012"
    assert "a link out of" in messages[0] and "falling back to" in messages[1]
    assert len(messages) == 2  # the link is no candidate either
    (root / "latest").unlink()  # a run killed between renaming a checkpoint and `latest`
    messages.clear()
    assert latest_checkpoint(cut, warn=messages.append) == root / "step-00000012"
    assert "is missing" in messages[0]
    assert latest_checkpoint(tmp_path / "new-run") is None  # no checkpoint yet: not an error


def inject_inf_at(model_ref: list[nn.Module], at_step: int):
    """A ``prepare_batch`` that makes one weight infinite before step ``at_step`` (0-based)."""

    def prepare(batch, ctx):
        if ctx.step == at_step:
            model_ref[0].head[1].weight[0, 0] = math.inf
        return augment(batch, ctx)

    return prepare


@pytest.mark.parametrize(
    ("keep", "log_every", "caught_at"),
    [(1, 100, 12), (2, 100, 12), (1, 2, 10), (2, 2, 10)],
    ids=["keep1-at-checkpoint", "keep2-at-checkpoint", "keep1-at-log", "keep2-at-log"],
)
def test_a_diverging_run_stops_and_keeps_its_finite_checkpoints(
    keep: int, log_every: int, caught_at: int, tmp_path: Path
) -> None:
    r = recipe(f"run.keep_checkpoints={keep}", f"run.log_every={log_every}")
    run_dir = tmp_path / "run"
    seed_everything(r.run.seed)
    model = TinyNet()
    trainer = Trainer(model, Clouds(), r, run_dir, progress=False,
                      prepare_batch=inject_inf_at([model], at_step=9))  # fmt: skip
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FloatingPointError)
    assert message.startswith(f"training diverged at step {caught_at}: ")
    assert f"the last finite checkpoint is {run_dir / 'checkpoints' / 'step-00000008'}" in message
    assert "optim.lr" in message
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert kept == ["step-00000004", "step-00000008"][-keep:]
    for name in kept:  # all finite (verify_checkpoint checks the tensors)
        verify_checkpoint(run_dir / "checkpoints" / name)
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-00000008"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in logged)


def test_a_run_diverging_before_its_first_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged, match="no checkpoint was written before it"):
        train(tmp_path / "run", recipe("optim.lr=1e30", "optim.name=sgd"))
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))


def test_save_checkpoint_refuses_non_finite_state_and_keeps_the_others(tmp_path: Path) -> None:
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model({"points": torch.randn(4, 8, 3), "target": torch.randn(4, 2)})["loss"].backward()
    opt.step()
    kw = dict(model=model, optimizer=opt, recipe=Recipe(), rng_states=[capture_rng_state()])
    for step in (1, 2):
        save_checkpoint(tmp_path, step=step, epoch=0, keep=1, **kw)
    with torch.no_grad():
        model.point[0].bias[3] = math.nan
    with pytest.raises(NonFiniteCheckpoint, match=r"model's weights .*point\.0\.bias"):
        save_checkpoint(tmp_path, step=3, epoch=0, keep=1, **kw)
    with torch.no_grad():
        model.point[0].bias[3] = 0.0
        next(iter(opt.state.values()))["exp_avg_sq"].fill_(math.inf)
    with pytest.raises(NonFiniteCheckpoint, match="optimiser state .*exp_avg_sq"):
        save_checkpoint(tmp_path, step=3, epoch=0, keep=1, **kw)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step-00000002",
    ]
    verify_checkpoint(tmp_path / "checkpoints" / "step-00000002")
    # Rotation counts the history up to the step written, not a later checkpoint left by a
    # run that resumed from an earlier one.
    opt.state.clear()
    save_checkpoint(tmp_path, step=5, epoch=0, **kw)
    save_checkpoint(tmp_path, step=3, epoch=0, keep=2, **kw)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [
        "step-00000002",
        "step-00000003",
        "step-00000005",
    ]


def test_checkpoint_json_never_holds_nan_and_a_null_best_resumes(
    cut: Path, full: dict[str, torch.Tensor]
) -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    best = {"metric": "acc", "value": math.nan, "step": 3, "acc": math.nan, "other": [math.inf]}
    path = save_checkpoint(cut / "elsewhere", step=3, epoch=0, model=model, optimizer=opt,
                           recipe=Recipe(), rng_states=[capture_rng_state()],
                           trainer_state={"best": best})  # fmt: skip

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))

    state = strict((path / "state.json").read_text())
    assert state["trainer"]["best"] == {"metric": "acc", "value": None, "step": 3, "acc": None,
                                        "other": [None]}  # fmt: skip
    strict((path / "optimizer.json").read_text())

    # A checkpoint whose best value is null (NaN before) resumes, and a NaN is never best.
    state_file = cut / "checkpoints" / "step-00000012" / "state.json"
    state = json.loads(state_file.read_text())
    state["trainer"]["best"] = {"metric": "score", "value": None, "step": 6, "score": None}
    state_file.write_text(json.dumps(state))
    scores = iter([math.nan, 0.5])  # evaluations at steps 18 and 24 (the ends of epochs 3, 4)
    exported = []
    model, result = train(cut, recipe(), resume=True, evaluate=lambda m: {"score": next(scores)},
                          best_metric="score", on_best=lambda m, metrics: exported.append(
                              metrics["score"]))  # fmt: skip
    assert result.completed and exported == [0.5] and result.best["value"] == 0.5
    assert_same_weights(model, full)  # evaluating does not change the run


def test_stale_temporaries_are_removed_and_live_ones_kept(cut: Path) -> None:
    root = cut / "checkpoints"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()  # alive, and not us
    me = os.getpid()
    stale = [
        root / f".step-00000016.{dead.pid}-0123abcd.tmp",  # a half-written checkpoint
        root / f".step-00000012.{dead.pid}-89abcdef.tmp.old",  # atomic_directory's trash
        root / f".step-00000016.{me}-00000000.tmp",  # ours, from an earlier failed save
        cut / f".metrics.jsonl.{dead.pid}-deadbeef.tmp",  # a half rewrite of metrics.jsonl
    ]
    for path in stale[:3]:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    stale[3].write_text("{")
    kept = [root / f".step-00000016.{live}-feedf00d.tmp", root / ".step-00000012.half-written"]
    for path in kept:
        path.mkdir()
    train(cut, recipe(), resume=True)
    assert not any(p.exists() for p in stale)
    assert all(p.is_dir() for p in kept)
    # The saves of the resumed run left no temporaries of their own.
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == sorted(
        p.name for p in kept
    )


def test_remove_stale_temporaries_spares_a_write_in_flight(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
        assert remove_stale_temporaries(tmp_path) == []  # ours, but still being written
        assert tmp.is_dir()
    assert (tmp_path / "out" / "x").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_load_checkpoint_reports_a_damaged_file_by_name(cut: Path) -> None:
    path = cut / "checkpoints" / "step-00000012"
    truncate(path / "model.safetensors")
    with pytest.raises(CheckpointDamaged, match="model.safetensors: truncated or corrupt"):
        load_checkpoint(path, TinyNet(), restore_rng=False)


# -- the CLI ---------------------------------------------------------------------------------

TINY = (
    "model.dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "model.num_groups=8",
    "model.group_size=16",
    "model.drop_path_rate=0.0",
    "data.num_points=256",
    "data.batch_size=4",
    "data.num_workers=0",
    "schedule.max_steps=6",
    "schedule.warmup_epochs=0",
    "run.log_every=1",
    "run.checkpoint_every=2",
    "run.keep_checkpoints=null",
    "pretrain.objective=mae",
)


@pytest.fixture(scope="module")
def stopped_pretrain(tmp_path_factory) -> Path:
    """A tiny MAE pre-training run stopped after step 4 of 6 (checkpoints at 2 and 4)."""
    from cd2p.data.scannet_pairs import prepare_scannet
    from cd2p.data.synthetic import generate_synthetic_scannet
    from cd2p.engine.pretrain import run_pretrain

    root = tmp_path_factory.mktemp("pretrain")
    generate_synthetic_scannet(
        root / "scannet", num_scenes=2, frames_per_scene=5, seed=0,
        color_size=(64, 48), depth_size=(64, 48),
    )  # fmt: skip
    prepare_scannet(
        root / "scannet", root / "pairs", frame_skip=1, num_points=256, split="all",
        min_valid_points=128, progress=False,
    )  # fmt: skip
    r = apply_overrides(load_recipe("demo"), list(TINY))
    result = run_pretrain(r, [root / "pairs"], root / "run", progress=False, stop_after=4)
    assert not result.run.completed and result.run.step == 4
    return root / "run"


def test_cli_resume_falls_back_past_a_damaged_checkpoint(
    stopped_pretrain: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_pretrain, run_dir)
    (run_dir / "checkpoints" / "step-00000004" / "model.safetensors").write_bytes(b"")
    result = CliRunner().invoke(main, ["pretrain", "--resume", str(run_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "step-00000004/model.safetensors: empty (0 bytes)" in out
    assert "falling back to" in out and "step-00000002" in out and "6 / 6" in out


def test_cli_resume_with_every_checkpoint_damaged_is_one_error_line(
    stopped_pretrain: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_pretrain, run_dir)
    for step in (2, 4):
        truncate(run_dir / "checkpoints" / f"step-{step:08d}" / "optimizer.safetensors")
    result = CliRunner().invoke(main, ["pretrain", "--resume", str(run_dir), "--no-progress"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{run_dir} has no intact checkpoint" in errors[0]
    assert "Traceback" not in result.output
