"""Experiment trackers: every record the trainer writes to ``metrics.jsonl`` also goes to
TensorBoard and / or Weights & Biases (``run.loggers``), on rank 0 only.

Both are optional extras (``pip install 'cd2p[tensorboard]'`` / ``'cd2p[wandb]'``); a tracker
named in the recipe but not installed is an error that says what to install, before any step
is taken. Scalars are named ``<kind>/<metric>`` (``train/loss``, ``train/lr``, ``eval/oa``) and
plotted against the optimiser step.

* TensorBoard writes ``RUN/tensorboard/``; a resumed run purges the events after its checkpoint
  step, so the curves hold each step once.
* W&B writes ``RUN/wandb/``. The run is named after its directory and its id is kept in
  ``RUN/wandb-run.json`` so that a resumed run continues the same W&B run. ``WANDB_MODE=offline``
  logs without a network (``wandb sync RUN/wandb/offline-run-*`` uploads it later). W&B
  accepts only increasing steps: the steps a resumed run repeats (between its checkpoint and the
  interruption) keep their first values there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from cd2p._atomic import atomic_write_json

TENSORBOARD_DIR = "tensorboard"
WANDB_STATE = "wandb-run.json"
# Fields of a metrics.jsonl record that are not metrics.
_NOT_METRICS = {"kind", "step", "epoch", "weights_sha256"}


class MetricLogger(Protocol):
    """What the trainer calls: ``log`` every record (a ``metrics.jsonl`` dict), ``close`` once."""

    def log(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric metrics of a record as ``{"<kind>/<name>": value}``."""
    kind = str(record.get("kind", "train"))
    out = {}
    for key, value in record.items():
        if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    return out


class TensorBoardLogger:
    """Scalars to ``RUN/tensorboard/`` (``torch.utils.tensorboard``)."""

    def __init__(self, run_dir: Path, start_step: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            raise ValueError(
                "run.loggers names 'tensorboard' but the tensorboard package is not installed: "
                "pip install 'cd2p[tensorboard]' (or drop it from run.loggers)"
            ) from None
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        # purge_step drops the events a resumed run is about to write again.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step or None)

    def log(self, record: Mapping[str, Any]) -> None:
        step = int(record.get("step", 0))
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbLogger:
    """Scalars to a Weights & Biases run (``RUN/wandb/``), resumed with the training run."""

    def __init__(self, run_dir: Path, project: str, config: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ValueError(
                "run.loggers names 'wandb' but the wandb package is not installed: "
                "pip install 'cd2p[wandb]' (or drop it from run.loggers)"
            ) from None
        run_dir = Path(run_dir)
        state_path = run_dir / WANDB_STATE
        run_id = None
        if state_path.is_file():
            run_id = json.loads(state_path.read_text()).get("id")
        try:
            self.run = wandb.init(
                project=project,
                name=run_dir.resolve().name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                config=dict(config),
                # cd2p prints its own progress; W&B must not capture the terminal.
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as exc:  # noqa: BLE001 (W&B raises its own types for login/network)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"Weights & Biases could not start a run ({first}); log in with `wandb login`, "
                "or set WANDB_MODE=offline to log without a network"
            ) from None
        atomic_write_json(state_path, {"id": self.run.id, "project": project})
        self._pending: dict[str, float] = {}
        self._pending_step = 0

    def log(self, record: Mapping[str, Any]) -> None:
        # One W&B call per step, with increasing steps: the records of a step (training and
        # evaluation) are merged and sent when a later step arrives, or at close. W&B treats
        # several calls for one step, or a call for an earlier step, as an error to drop.
        values = scalars(record)
        if not values:
            return
        step = int(record.get("step", 0))
        if self._pending and step != self._pending_step:
            self._flush()
        self._pending_step = step
        self._pending.update(values)

    def _flush(self) -> None:
        if self._pending:
            self.run.log(dict(self._pending), step=self._pending_step, commit=True)
            self._pending.clear()

    def close(self) -> None:
        self._flush()
        self.run.finish()


def open_loggers(
    names: Sequence[str], run_dir: str | Path, config: Mapping[str, Any], start_step: int = 0
) -> list[MetricLogger]:
    """The trackers ``names`` (``run.loggers``) for a run starting (or resuming) at
    ``start_step``; ``config`` is the recipe as a mapping (W&B records it)."""
    run_dir = Path(run_dir)
    loggers: list[MetricLogger] = []
    try:
        for name in dict.fromkeys(names):
            if name == "tensorboard":
                loggers.append(TensorBoardLogger(run_dir, start_step))
            elif name == "wandb":
                project = str(config.get("run", {}).get("wandb_project", "cd2p"))
                loggers.append(WandbLogger(run_dir, project, config))
            else:
                raise ValueError(f"unknown logger {name!r}; cd2p has tensorboard, wandb")
    except Exception:
        for logger in loggers:
            logger.close()
        raise
    return loggers


__all__ = [
    "TENSORBOARD_DIR",
    "WANDB_STATE",
    "MetricLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "open_loggers",
    "scalars",
]
