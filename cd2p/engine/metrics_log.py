"""``RUN/metrics.jsonl``: one JSON record per logged step; readers, a text sparkline, the PNG.

Records are dicts with a ``kind``: ``"train"`` (``step``, ``epoch``, ``loss`` and its
components ``loss_*``, ``lr``, ``grad_norm``, ``samples_per_s``, ``data_fraction``,
``peak_memory_mb``), ``"eval"`` (``step``, ``epoch`` and the metrics of the evaluation) and
``"final"`` (the end of a run: per-rank weight checksums). Steps count optimiser steps done.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cd2p._atomic import atomic_output, atomic_write_text

METRICS = "metrics.jsonl"
_SPARK = "▁▂▃▄▅▆▇█"


class MetricsLog:
    """Append-only writer of ``RUN/metrics.jsonl`` (line-buffered so a crash loses nothing)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / METRICS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=False) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir_or_file: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (optionally of one ``kind``).

    A torn last line (a run killed mid-write) is ignored; any other bad line is an error.
    """
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a cd2p run directory (no {METRICS})")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not valid JSON: {exc}") from None
    return [r for r in records if kind is None or r.get("kind") == kind]


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run logs those steps again), atomically."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step and r.get("kind") != "final"]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """A one-line text plot of ``values`` (resampled to at most ``width`` characters)."""
    values = [float(v) for v in values]
    if not values:
        return ""
    if len(values) > width:
        # Average consecutive chunks so the shape survives the resampling.
        bounds = [round(i * len(values) / width) for i in range(width + 1)]
        values = [
            sum(values[a:b]) / (b - a)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            if b > a
        ]
    low, high = min(values), max(values)
    span = high - low or 1.0
    return "".join(_SPARK[min(7, int((v - low) / span * 8))] for v in values)


def plot_metrics(
    run_dir: str | Path, out: str | Path | None = None, title: str | None = None
) -> Path:
    """Write a PNG of a run's curves: losses, learning rate and throughput vs step (and
    evaluation metrics when the run has any). Returns the PNG's path (default
    ``RUN/metrics.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train = read_metrics(run_dir, "train")
    evals = read_metrics(run_dir, "eval")
    if not train:
        raise ValueError(f"{run_dir / METRICS} has no training records to plot yet")
    out = Path(out) if out is not None else run_dir / "metrics.png"
    steps = [r["step"] for r in train]
    loss_keys = ["loss"] + sorted({k for r in train for k in r if k.startswith("loss_")})
    eval_keys = sorted({k for r in evals for k in r if k not in ("kind", "step", "epoch")})
    panels = 3 + (1 if eval_keys else 0)
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2.6 * panels), sharex=True)
    ax = axes[0]
    for key in loss_keys:
        points = [(r["step"], r[key]) for r in train if key in r]
        style = {"linewidth": 2.0} if key == "loss" else {"linewidth": 1.2, "linestyle": "--"}
        ax.plot(*zip(*points, strict=True), label=key, **style)
    if all(r["loss"] > 0 for r in train):
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    axes[1].plot(steps, [r["lr"] for r in train], color="tab:orange")
    axes[1].set_ylabel("learning rate")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[1].grid(alpha=0.3)
    axes[2].plot(steps, [r["samples_per_s"] for r in train], color="tab:green")
    axes[2].set_ylabel("samples / s")
    axes[2].grid(alpha=0.3)
    if eval_keys:
        for key in eval_keys:
            points = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), int | float)]
            if points:
                axes[3].plot(*zip(*points, strict=True), marker="o", label=key)
        axes[3].set_ylabel("evaluation")
        axes[3].legend(loc="best")
        axes[3].grid(alpha=0.3)
    axes[-1].set_xlabel("optimiser step")
    fig.suptitle(title or f"cd2p run {run_dir.resolve().name}")
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


def save_figure(fig: Any, path: Path, dpi: int) -> Path:
    """Write a matplotlib figure to ``path`` as PNG atomically, then close it (even on error)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return path
