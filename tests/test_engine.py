"""The shared training engine on a small in-test regression problem (CPU, seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from cd2p.cli import main
from cd2p.config import Recipe, ScheduleConfig, apply_overrides
from cd2p.engine import (
    EpochBatchSampler,
    StepPlan,
    Trainer,
    latest_checkpoint,
    load_checkpoint,
    lr_at,
    plot_metrics,
    read_metrics,
    scale_and_translate,
    seed_everything,
    sparkline,
)
from cd2p.engine.checkpoint import flatten_optimizer_state, unflatten_optimizer_state


class Clouds(torch.utils.data.Dataset):
    """Small point clouds whose target is a fixed function of their per-axis spread."""

    def __init__(self, n: int = 48, points: int = 32) -> None:
        gen = torch.Generator().manual_seed(1)
        scale = torch.rand(n, 1, 3, generator=gen) * 2 + 0.2
        self.points = torch.randn(n, points, 3, generator=gen) * scale
        self.target = self.points.std(dim=1) @ torch.randn(3, 2, generator=gen)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"points": self.points[i], "target": self.target[i]}


class TinyNet(nn.Module):
    """PointNet-like regressor with BatchNorm and dropout (buffers and RNG use to restore)."""

    def __init__(self) -> None:
        super().__init__()
        self.point = nn.Sequential(nn.Linear(3, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(32, 2))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        b, n, _ = batch["points"].shape
        x = self.point[0](batch["points"]).reshape(b * n, -1)
        x = self.point[2](self.point[1](x)).reshape(b, n, -1).amax(dim=1)
        loss = nn.functional.mse_loss(self.head(x), batch["target"])
        return {"loss": loss, "loss_mse": loss.detach()}


def augment(batch, ctx):
    batch["points"] = scale_and_translate(batch["points"], ctx.generator, 0.9, 1.1, 0.1)
    return batch


def recipe(*overrides: str) -> Recipe:
    base = [
        "data.batch_size=8",
        "data.num_workers=0",
        "schedule.epochs=4",
        "schedule.warmup_epochs=1",
        "run.log_every=2",
        "run.checkpoint_every=4",
        "run.keep_checkpoints=null",
        "optim.lr=0.01",
    ]
    return apply_overrides(Recipe(), [*base, *overrides])


def train(run_dir: Path, r: Recipe, resume: bool = False, stop_after: int | None = None, **kw):
    seed_everything(r.run.seed)
    model = TinyNet()
    trainer = Trainer(model, Clouds(), r, run_dir, prepare_batch=augment, progress=False, **kw)
    return model, trainer.fit(resume=resume, stop_after=stop_after)


def test_schedule_warms_up_then_decays_to_min_lr() -> None:
    lrs = [lr_at(s, 1.0, 0.01, total_steps=100, warmup_steps=10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(0.01)
    plan = StepPlan.from_config(ScheduleConfig(epochs=250, warmup_epochs=10), steps_per_epoch=4)
    assert (plan.total_steps, plan.warmup_steps) == (1000, 40)
    capped = StepPlan.from_config(
        ScheduleConfig(epochs=250, warmup_epochs=10, max_steps=100), steps_per_epoch=4
    )
    assert (capped.total_steps, capped.warmup_steps) == (100, 4)  # warm-up shrinks in proportion


def test_batches_are_a_pure_function_of_seed_and_epoch_and_shard_the_data() -> None:
    ranks = [EpochBatchSampler(10, 2, rank=r, world_size=3, seed=5) for r in range(3)]
    first = [list(s) for s in ranks]
    assert [list(s) for s in ranks] == first  # same epoch, same batches
    assert all(len(batches) == len(s) == 2 for batches, s in zip(first, ranks, strict=True))
    epoch0 = [i for s in ranks for i in s.indices(0)]
    assert len(epoch0) == 12 and set(epoch0) == set(range(10))  # padded to 4 per rank
    for s in ranks:
        s.set_epoch(1)
    assert [list(s) for s in ranks] != first  # a new permutation every epoch
    ranks[0].set_epoch(1, start_batch=1)
    assert list(ranks[0]) == [ranks[0].indices(1)[2:4]]  # resuming mid-epoch skips batches
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochBatchSampler(3, 4)


def test_optimizer_state_round_trips_through_safetensors_and_json() -> None:
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model({"points": torch.randn(4, 8, 3), "target": torch.randn(4, 2)})["loss"].backward()
    opt.step()
    tensors, rest = flatten_optimizer_state(opt.state_dict())
    rest = json.loads(json.dumps(rest))  # what is written to optimizer.json
    restored = unflatten_optimizer_state(tensors, rest)
    original = opt.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for index, entries in original["state"].items():
        for name, value in entries.items():
            assert torch.equal(restored["state"][index][name], value)


def test_killed_run_resumes_to_exactly_the_uninterrupted_weights(tmp_path: Path) -> None:
    r = recipe()
    full_model, full = train(tmp_path / "full", r)
    assert full.completed and full.step == 24 and full.checkpoint.name == "step-00000024"

    # A run "killed" between its checkpoints at steps 8 and 12: it got to step 11, logged
    # metrics up to step 10, and only the step-8 checkpoint is complete.
    cut = tmp_path / "cut"
    train(cut, r, stop_after=11)
    ckpts = cut / "checkpoints"
    shutil.rmtree(ckpts / "step-00000011")
    (ckpts / "latest").write_text("step-00000008\n")
    (ckpts / ".step-00000012.half-written").mkdir()  # a temp dir a kill left behind
    assert latest_checkpoint(cut).name == "step-00000008"

    resumed_model, resumed = train(cut, r, resume=True)
    assert resumed.resumed_from == 8 and resumed.completed
    full_state, resumed_state = full_model.state_dict(), resumed_model.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for key in full_state:
        assert torch.equal(full_state[key], resumed_state[key]), key
    assert resumed.weights_sha256 == full.weights_sha256

    def losses(run_dir):
        return [(m["step"], m["loss"]) for m in read_metrics(run_dir, "train")]

    assert losses(cut) == losses(tmp_path / "full")  # steps 9-10 were logged once, not twice

    # The checkpoint holds only safetensors / JSON / YAML, and loads back bit-exactly.
    files = {p.name for p in (ckpts / "step-00000024").iterdir()}
    assert files == {
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "rng.safetensors",
        "state.json",
        "recipe.yaml",
    }
    fresh = TinyNet()
    ckpt = load_checkpoint(ckpts / "step-00000024", fresh, restore_rng=False)
    assert ckpt.step == 24 and ckpt.epoch == 4
    assert all(torch.equal(v, full_state[k]) for k, v in fresh.state_dict().items())
    assert "rank0.torch_cpu" in load_file(str(ckpts / "step-00000024" / "rng.safetensors"))


def test_training_learns_evaluates_and_tracks_the_best(tmp_path: Path) -> None:
    data = Clouds()
    probe = {"points": data.points, "target": data.target}
    calls, exported = [], []

    def evaluate(model):
        calls.append(model.training)
        return {"mse": model(probe)["loss"].item()}

    r = recipe("schedule.epochs=12", "run.eval_every=3", "run.checkpoint_every=100")
    seed_everything(0)
    model = TinyNet()
    initial = evaluate(model)["mse"]
    calls.clear()
    result = Trainer(
        model,
        data,
        r,
        tmp_path / "run",
        prepare_batch=augment,
        evaluate=evaluate,
        best_metric="mse",
        best_mode="min",
        on_best=lambda m, metrics: exported.append(metrics["mse"]),
        progress=False,
    ).fit()
    evals = read_metrics(tmp_path / "run", "eval")
    assert [e["epoch"] for e in evals] == [3, 6, 9, 12] and calls == [False] * 4
    assert model.training  # back in training mode after evaluating
    best = min(e["mse"] for e in evals)
    assert result.best["value"] == best and exported[-1] == best
    assert best < 0.3 * initial, (initial, best)  # it learnt
    train_records = read_metrics(tmp_path / "run", "train")
    assert {"loss", "loss_mse", "lr", "grad_norm", "samples_per_s", "peak_memory_mb"} <= set(
        train_records[0]
    )
    assert train_records[-1]["step"] == 72 and train_records[-1]["lr"] == pytest.approx(1e-6)
    assert (tmp_path / "run" / "recipe.yaml").is_file()


def test_refuses_to_overwrite_a_run_and_checks_the_batch_split(tmp_path: Path) -> None:
    from cd2p.engine import check_run_dir

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(FileExistsError, match="--resume"):
        check_run_dir(tmp_path / "run", resume=False)
    check_run_dir(tmp_path / "new", resume=False)
    with pytest.raises(FileNotFoundError, match="no such run"):
        check_run_dir(tmp_path / "new", resume=True)


def test_plot_and_sparkline(tmp_path: Path) -> None:
    train(tmp_path / "run", recipe())
    png = plot_metrics(tmp_path / "run")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 400
    result = CliRunner().invoke(
        main, ["plot", str(tmp_path / "run"), "--out", str(tmp_path / "c.png")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.png").is_file() and "wrote" in result.output
    assert sparkline([3, 2, 1, 0]) == "█▆▃▁"
    assert len(sparkline(list(range(100)), width=20)) == 20
    bad = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert bad.exit_code != 0 and "metrics.jsonl" in bad.output


# -- watching a run, interrupts, extensions, accumulation --------------------------------------


def _wandb_history(run_dir: Path) -> list[dict] | None:
    """The ``history`` rows of an offline W&B run, read from its ``.wandb`` transaction log
    (LevelDB's log format: 32 KiB blocks of records with a 7-byte header ``crc, length, type``,
    after W&B's 7-byte file header ``:W&B``, magic, version)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        left = block - offset % block
        if left < 7:  # a block's tail too short for a header is padding
            offset += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if kind == 0 and length == 0:
            offset += left
            continue
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST, MIDDLE/LAST
        if kind in (1, 4):
            records.append(pending)
    rows, finished = [], False
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        finished |= kind == "exit"
        if kind == "history":
            items = record.history.item
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows if finished else None


def _finished_wandb_history(run_dir: Path, seconds: float = 60.0) -> list[dict]:
    """The history once W&B's service has written the run's exit record: in offline mode
    ``wandb.finish()`` returns before its service process has flushed the transaction log
    (it does by the time the process exits), so a test reading it in-process waits."""
    import time

    deadline = time.monotonic() + seconds
    while (rows := _wandb_history(run_dir)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rows is not None, "W&B never wrote the run's exit record"
    return rows


def test_tensorboard_and_offline_wandb_hold_every_logged_metric(tmp_path: Path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = Clouds()
    probe = {"points": data.points, "target": data.target}
    r = recipe("run.loggers=[tensorboard, wandb]", "run.eval_every=2")
    seed_everything(0)
    Trainer(TinyNet(), data, r, tmp_path / "run", prepare_batch=augment, progress=False,
            evaluate=lambda m: {"mse": m(probe)["loss"].item()}).fit()  # fmt: skip
    train = read_metrics(tmp_path / "run", "train")
    evals = read_metrics(tmp_path / "run", "eval")
    assert len(train) == 12 and len(evals) == 2

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for key in ("loss", "loss_mse", "lr", "grad_norm", "samples_per_s"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert logged == [(t["step"], pytest.approx(t[key], rel=1e-6)) for t in train], key
    assert [(e.step, e.value) for e in events.Scalars("eval/mse")] == [
        (e["step"], pytest.approx(e["mse"], rel=1e-6)) for e in evals
    ]

    rows = _finished_wandb_history(tmp_path / "run")
    by_step = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    assert {r["step"] for r in train} <= set(by_step), rows
    for record in train:
        assert by_step[record["step"]]["train/loss"] == pytest.approx(record["loss"])
        assert by_step[record["step"]]["train/lr"] == pytest.approx(record["lr"])
    for record in evals:
        assert by_step[record["step"]]["eval/mse"] == pytest.approx(record["mse"])
    saved_id = json.loads((tmp_path / "run" / "wandb-run.json").read_text())["id"]
    assert saved_id in next((tmp_path / "run" / "wandb").glob("offline-run-*")).name


def test_a_log_file_gets_one_complete_line_per_logged_step(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=40)  # not a terminal, and narrower than a line
    data = Clouds()
    probe = {"points": data.points, "target": data.target}
    seed_everything(0)
    Trainer(TinyNet(), data, recipe("run.eval_every=2"), tmp_path / "run", prepare_batch=augment,
            console=console, evaluate=lambda m: {"mse": m(probe)["loss"].item()}).fit()  # fmt: skip
    lines = out.getvalue().splitlines()
    steps = [r["step"] for r in read_metrics(tmp_path / "run", "train")]
    train_lines = [line for line in lines if line.startswith("train step ")]
    assert [int(line.split()[2].split("/")[0]) for line in train_lines] == steps
    for line in train_lines:  # complete: every field on the one line, never cut at 40 columns
        assert "/24 (" in line and "loss " in line and "lr " in line and line.endswith(
            tuple("0123456789")
        ) and "samples/s" in line and "eta " in line
    eval_lines = [line for line in lines if line.startswith("eval  step ")]
    assert len(eval_lines) == 2 and "mse " in eval_lines[0]
    assert not any("━" in line for line in lines)  # no progress bar in a log file


def test_sigint_writes_a_checkpoint_and_the_run_resumes_bit_identically(tmp_path: Path) -> None:
    import io
    import os
    import signal

    from rich.console import Console

    from cd2p.engine import TrainingInterrupted

    r = recipe()
    full_model, full = train(tmp_path / "full", r)

    def interrupt_at_step_10(batch, ctx):
        if ctx.step == 10:  # Ctrl-C while step 10 is running: it completes, then the run stops
            os.kill(os.getpid(), signal.SIGINT)
        return augment(batch, ctx)

    out = io.StringIO()
    seed_everything(r.run.seed)
    trainer = Trainer(TinyNet(), Clouds(), r, tmp_path / "cut", prepare_batch=interrupt_at_step_10,
                      console=Console(file=out, width=60), resume_hint="cd2p x --resume RUN")
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.fit()
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers are restored
    assert (stopped.value.step, stopped.value.signal_name, stopped.value.exit_code) == (
        11, "SIGINT", 130
    )
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000011"
    assert "Continue with: cd2p x --resume RUN" in out.getvalue()
    resumed_model, resumed = train(tmp_path / "cut", r, resume=True)
    assert resumed.resumed_from == 11 and resumed.completed
    full_state = full_model.state_dict()
    for key, value in resumed_model.state_dict().items():
        assert torch.equal(value, full_state[key]), key
    assert resumed.weights_sha256 == full.weights_sha256


def test_a_finished_run_is_extended_by_a_longer_schedule(tmp_path: Path) -> None:
    r = recipe()
    _, first = train(tmp_path / "run", r)
    assert first.completed and first.step == 24
    longer = apply_overrides(r, ["schedule.epochs=6"])
    model, extended = train(tmp_path / "run", longer, resume=True)
    assert extended.completed and (extended.resumed_from, extended.step) == (24, 36)
    records = read_metrics(tmp_path / "run", "train")
    assert [rec["step"] for rec in records] == list(range(2, 37, 2))
    # The 12 new steps follow the cosine of the 36-step run (warm-up 6 steps), to min_lr.
    for rec in records[12:]:
        expected = lr_at(rec["step"] - 1, 0.01, r.schedule.min_lr, 36, 6)
        assert rec["lr"] == pytest.approx(expected)
    assert records[-1]["lr"] == pytest.approx(r.schedule.min_lr)
    with pytest.raises(ValueError, match="beyond the 36 steps|cannot be shortened"):
        train(tmp_path / "run", apply_overrides(r, ["schedule.epochs=2"]), resume=True)


def test_resume_changes_allow_the_length_and_refuse_the_rest() -> None:
    from cd2p.config import RecipeError, resume_changes

    saved = recipe()
    assert resume_changes(saved, apply_overrides(saved, ["schedule.epochs=9"])) == [
        "schedule.epochs: 4 -> 9"
    ]
    assert resume_changes(saved, apply_overrides(saved, ["run.loggers=[tensorboard]"]))
    with pytest.raises(RecipeError, match="cannot change optim.lr .*steps already taken"):
        resume_changes(saved, apply_overrides(saved, ["optim.lr=0.5"]))
    with pytest.raises(RecipeError, match="cannot change data.batch_size"):
        resume_changes(saved, apply_overrides(saved, ["data.batch_size=4"]))


class LinearNet(nn.Module):
    """A model whose loss is a per-sample mean (no BatchNorm, no dropout): accumulating
    equal micro-batches must give exactly the large batch's gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.net(batch["points"]).mean(dim=1)
        return {"loss": nn.functional.mse_loss(pred, batch["target"])}


def test_accumulated_micro_batches_give_the_large_batch_update(tmp_path: Path) -> None:
    from cd2p.engine.trainer import split_batch

    weights = []
    for accumulate in (1, 4):
        r = recipe(f"optim.accumulate_steps={accumulate}", "schedule.epochs=2")
        seed_everything(0)
        model = LinearNet()
        result = Trainer(model, Clouds(), r, tmp_path / f"acc{accumulate}", prepare_batch=augment,
                         progress=False).fit()  # fmt: skip
        assert result.step == 12
        weights.append(model.state_dict())
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-6)
    losses = [read_metrics(tmp_path / f"acc{a}", "train")[-1]["loss"] for a in (1, 4)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    parts = split_batch({"x": torch.arange(8), "names": list("abcdefgh"), "k": 3}, 4)
    assert [p["names"] for p in parts][1] == ["c", "d"] and parts[3]["x"].tolist() == [6, 7]
    assert parts[0]["k"] == 3
    with pytest.raises(ValueError, match="accumulate_steps"):
        Trainer(LinearNet(), Clouds(), recipe("optim.accumulate_steps=3"), tmp_path / "bad")


def test_cpu_loader_workers_never_exceed_the_cores() -> None:
    from cd2p.engine.trainer import loader_workers, usable_cores

    assert loader_workers(64, torch.device("cpu")) <= usable_cores() - 1
    assert loader_workers(0, torch.device("cpu")) == 0
    assert loader_workers(64, torch.device("cuda")) == 64
