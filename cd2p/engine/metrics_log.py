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

from cd2p._atomic import atomic_output, atomic_write_text, finite_json

METRICS = "metrics.jsonl"
_SPARK = "▁▂▃▄▅▆▇█"


class MetricsLog:
    """Append-only writer of ``RUN/metrics.jsonl`` (line-buffered so a crash loses nothing)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / METRICS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(finite_json(record), allow_nan=False) + "\n")

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
    lines = (json.dumps(finite_json(r), allow_nan=False) + "\n" for r in kept)
    atomic_write_text(path, "".join(lines))


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


def _run_title(run_dir: Path) -> tuple[str, bool]:
    """``"<run> · recipe <name> · <task>"`` from the run's records, and whether its teacher
    was random."""
    info: dict[str, Any] = {}
    if (run_dir / "run.json").is_file():
        try:
            info = json.loads((run_dir / "run.json").read_text())
        except json.JSONDecodeError:
            info = {}
    parts = [f"cd2p run {run_dir.resolve().name}"]
    recipe = info.get("recipe_name")
    if not recipe and (run_dir / "recipe.yaml").is_file():
        import yaml

        try:
            recipe = (yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}).get(
                "description"
            )
        except yaml.YAMLError:
            recipe = None
    if recipe:
        parts.append(f"recipe {recipe}")
    task = info.get("task") or ("pretrain" if "pairs" in info else None)
    if task:
        parts.append(str(task) + (f" ({info['method']})" if info.get("method") else ""))
    return " · ".join(parts), bool(info.get("random_teacher"))


def _readable_log_axis(ax: Any) -> None:
    """Log-scale ticks that read: 1, 2 and 5 of every decade, written as plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_metrics(
    run_dir: str | Path, out: str | Path | None = None, title: str | None = None
) -> Path:
    """Write a PNG of a run's curves: losses (log scale), learning rate and throughput vs step,
    and one panel per evaluation metric (fractions in percent). The title names the run and
    its recipe; a run whose teacher was random says so on the picture. Returns the PNG's path
    (default ``RUN/metrics.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train = read_metrics(run_dir, "train")
    evals = read_metrics(run_dir, "eval")
    if not train:
        raise ValueError(f"{run_dir / METRICS} has no training records to plot yet")
    out = Path(out) if out is not None else run_dir / "metrics.png"
    loss_keys = ["loss"] + sorted({k for r in train for k in r if k.startswith("loss_")})
    side = [
        (key, label, color)
        for key, label, color in (
            ("lr", "learning rate", "tab:orange"),
            ("samples_per_s", "samples / s", "tab:green"),
        )
        if any(key in r for r in train)
    ]
    eval_keys = [
        k
        for k in dict.fromkeys(k for r in evals for k in r if k not in ("kind", "step", "epoch"))
        if any(isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool) for r in evals)
    ]
    panels = 1 + len(side) + len(eval_keys)
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2.3 * panels + 0.6), sharex=True,
                             squeeze=False)  # fmt: skip
    axes = axes[:, 0]
    ax = axes[0]
    for key in loss_keys:
        points = [(r["step"], r[key]) for r in train if key in r]
        style = {"linewidth": 2.0} if key == "loss" else {"linewidth": 1.2, "linestyle": "--"}
        ax.plot(*zip(*points, strict=True), label=key, **style)
    if all(r["loss"] > 0 for r in train):
        _readable_log_axis(ax)
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3, which="both")
    for axis, (key, label, color) in zip(axes[1:], side, strict=False):
        points = [(r["step"], r[key]) for r in train if key in r]
        axis.plot(*zip(*points, strict=True), color=color)
        axis.set_ylabel(label)
        if key == "lr":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        axis.grid(alpha=0.3)
    for axis, key in zip(axes[1 + len(side) :], eval_keys, strict=True):
        points = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), int | float)]
        values = [v for _, v in points]
        percent = all(0.0 <= v <= 1.0 for v in values)
        shown = [(s, 100 * v if percent else v) for s, v in points]
        axis.plot(*zip(*shown, strict=True), marker="o", color="tab:purple")
        best = max(shown, key=lambda p: p[1])
        axis.annotate(f"{best[1]:.2f}", best, textcoords="offset points", xytext=(4, 4),
                      fontsize=8)  # fmt: skip
        axis.set_ylabel(f"eval {key}" + (" (%)" if percent else ""))
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("optimiser step")
    run_title, random_teacher = _run_title(run_dir)
    fig.suptitle(title or run_title, fontsize=11)
    if random_teacher:
        fig.text(0.5, 0.005, "RANDOM teacher (not CLIP): these curves test the pipeline, "
                 "not the method", ha="center", va="bottom", color="tab:red", fontsize=10,
                 weight="bold")  # fmt: skip
    fig.tight_layout(rect=(0, 0.03 if random_teacher else 0, 1, 1))
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
