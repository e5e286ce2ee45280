"""``cd2p compare``: several finished runs on the same prepared data side by side.

A run is a fine-tuning run (``RUN/metrics.json``, one model) or a multi-seed / few-shot-protocol
run (``RUN/summary.json``, :mod:`cd2p.engine.multirun`). Runs are compared only when they are
comparable: the same task, the same prepared data (the fingerprints recorded with the runs,
:func:`cd2p.provenance.data_fingerprint`), the same evaluation split, and few-shot runs only
with few-shot runs. The result is a table of every common metric (mean ± std, min, max, n) and
a PNG with one panel per metric: a bar per run at the mean, the standard deviation as an error
bar and every model's value as a dot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cd2p.engine.multirun import (
    MULTIRUN_INFO,
    SUMMARY,
    describe,
    is_multirun,
    metric_values,
)

FEW_SHOT_KIND = "few-shot-protocol"


@dataclass
class ComparedRun:
    """One run as ``cd2p compare`` sees it: per group (``seeds``, ``5-way 10-shot``...), every
    metric's statistics (:func:`cd2p.engine.multirun.describe`)."""

    label: str
    path: Path
    task: str | None
    kind: str
    fingerprint: dict[str, Any] | None
    evaluation_split: str | None
    groups: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def sha256(self) -> str | None:
        return (self.fingerprint or {}).get("sha256")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def load_run(path: str | Path, label: str | None = None) -> ComparedRun:
    """A finished run's results: a multi-run's ``summary.json`` or a run's ``metrics.json``."""
    path = Path(path)
    label = label or path.resolve().name
    if is_multirun(path):
        info = _read_json(path / MULTIRUN_INFO)
        if not (path / SUMMARY).is_file():
            raise ValueError(f"{path} has no {SUMMARY} yet: finish it with `cd2p finetune "
                             f"{info.get('task')} --resume {path}`")  # fmt: skip
        summary = _read_json(path / SUMMARY)
        if not summary.get("complete", True):
            raise ValueError(f"{path} is not finished (missing: {', '.join(summary['missing'])}); "
                             f"finish it with --resume {path}")  # fmt: skip
        groups = {g: block["metrics"] for g, block in summary["groups"].items()}
        return ComparedRun(label, path, info.get("task"), info.get("kind", "seeds"),
                           info.get("data_fingerprint"), summary.get("evaluation_split"),
                           groups)  # fmt: skip
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a finished cd2p run: no metrics.json (a fine-tuning run) nor "
            f"{MULTIRUN_INFO} (a multi-seed or few-shot run)"
        )
    metrics = _read_json(metrics_path)
    fingerprint = (metrics.get("provenance") or {}).get("data")
    if fingerprint is None and (path / "run.json").is_file():
        fingerprint = _read_json(path / "run.json").get("data_fingerprint")
    values = metric_values(metrics)
    group = "1 model"
    return ComparedRun(label, path, metrics.get("task"), "single", fingerprint,
                       metrics.get("evaluated_on") or metrics.get("split"),
                       {group: {k: describe([v]) for k, v in values.items()}})  # fmt: skip


def check_comparable(runs: Sequence[ComparedRun]) -> None:
    """Refuse (``ValueError`` with the reason) runs that are not comparable."""
    if len(runs) < 2:
        raise ValueError("compare needs at least two runs")
    tasks = {r.task for r in runs}
    if len(tasks) > 1:
        raise ValueError("the runs are of different tasks: "
                         + ", ".join(f"{r.label} {r.task}" for r in runs))  # fmt: skip
    unknown = [r.label for r in runs if not r.sha256]
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: no data fingerprint recorded (a run made before cd2p "
            "recorded provenance), so it cannot be checked to have read the same data; run it "
            "again with this cd2p"
        )
    if len({r.sha256 for r in runs}) > 1:
        lines = "; ".join(
            f"{r.label}: {r.sha256[:12]}... ({(r.fingerprint or {}).get('path', '?')})"
            for r in runs
        )
        raise ValueError(
            f"the runs read different prepared data (fingerprints {lines}); results on "
            "different data are not comparable: prepare the data once and run every backbone "
            "on it"
        )
    splits = {r.evaluation_split for r in runs}
    if len(splits) > 1:
        raise ValueError("the runs are evaluated on different splits: "
                         + ", ".join(f"{r.label} {r.evaluation_split}" for r in runs))  # fmt: skip
    few_shot = {r.kind == FEW_SHOT_KIND for r in runs}
    if len(few_shot) > 1:
        raise ValueError("few-shot protocol runs are compared only with other few-shot "
                         "protocol runs (their test shapes are the episodes')")  # fmt: skip


def common_metrics(runs: Sequence[ComparedRun], wanted: Sequence[str] = ()) -> list[str]:
    """The metrics every run reports (in the first run's order), or ``wanted`` when each run
    has them all."""
    def names(run: ComparedRun) -> list[str]:
        return [m for block in run.groups.values() for m in block]

    if wanted:
        for run in runs:
            missing = [m for m in wanted if m not in names(run)]
            if missing:
                raise ValueError(f"{run.label} has no metric {', '.join(missing)}; it has "
                                 f"{', '.join(dict.fromkeys(names(run)))}")  # fmt: skip
        return list(wanted)
    first = list(dict.fromkeys(names(runs[0])))
    common = [m for m in first if all(m in names(r) for r in runs[1:])]
    if not common:
        raise ValueError("the runs have no metric in common")
    return common


def comparison_rows(
    runs: Sequence[ComparedRun], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per run and group: ``label``, ``group``, ``path`` and each metric's stats (or
    ``None`` when the group lacks it)."""
    rows = []
    for run in runs:
        for group, block in run.groups.items():
            rows.append({"label": run.label, "group": group, "path": str(run.path),
                         "metrics": {m: block.get(m) for m in metrics}})  # fmt: skip
    return rows


def plot_comparison(
    rows: Sequence[dict[str, Any]], metrics: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """A PNG with one panel per metric: per row a bar at the mean (in %), the standard
    deviation as an error bar, and every model's value as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cd2p.engine.metrics_log import save_figure

    count = len(metrics)
    columns = min(count, 3)
    lines = (count + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines), squeeze=False)
    labels = [r["label"] if r["group"] == "1 model" or len({x["group"] for x in rows}) == 1
              else f"{r['label']}\n{r['group']}" for r in rows]  # fmt: skip
    colors = plt.get_cmap("tab10").colors
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for i, row in enumerate(rows):
            stats = row["metrics"].get(metric)
            if not stats:
                continue
            color = colors[i % len(colors)]
            ax.bar(i, 100 * stats["mean"], color=color, alpha=0.55, width=0.7)
            if stats.get("std") is not None:
                ax.errorbar(i, 100 * stats["mean"], yerr=100 * stats["std"], color="black",
                            capsize=5, linewidth=1.2)  # fmt: skip
            values = [100 * v for v in stats.get("values", [])]
            offsets = [0.0] if len(values) == 1 else [
                -0.18 + 0.36 * k / (len(values) - 1) for k in range(len(values))]  # fmt: skip
            ax.scatter([i + o for o in offsets], values, color=color, edgecolor="black",
                       zorder=3, s=18)  # fmt: skip
        ax.set_title(metric)
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylabel("%")
        lows = [100 * r["metrics"][metric]["min"] for r in rows if r["metrics"].get(metric)]
        highs = [100 * r["metrics"][metric]["max"] for r in rows if r["metrics"].get(metric)]
        if lows:
            span = max(max(highs) - min(lows), 1.0)
            ax.set_ylim(max(0.0, min(lows) - 0.6 * span), min(100.0, max(highs) + 0.4 * span))
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    fig.suptitle(title or "cd2p compare: mean ± std, dots = each model")
    fig.tight_layout()
    return save_figure(fig, Path(path), dpi=110)


def compare_runs(
    paths: Sequence[str | Path],
    labels: Sequence[str] = (),
    metrics: Sequence[str] = (),
    png: str | Path | None = None,
) -> dict[str, Any]:
    """Load, check and tabulate runs (and draw the PNG when ``png`` is given); returns
    ``{"task", "data", "split", "metrics", "rows", "png"}``."""
    if labels and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
    runs = [load_run(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    seen: dict[str, int] = {}
    for run in runs:  # two runs named alike (a/seeds, b/seeds): their paths tell them apart
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1 and not labels:
            run.label = str(run.path)
    check_comparable(runs)
    names = common_metrics(runs, metrics)
    rows = comparison_rows(runs, names)
    out = {
        "task": runs[0].task,
        "data": runs[0].fingerprint,
        "split": runs[0].evaluation_split,
        "metrics": names,
        "rows": rows,
        "png": None,
    }
    if png is not None:
        out["png"] = str(plot_comparison(rows, names, png, f"{runs[0].task} on "
                                         f"{(runs[0].fingerprint or {}).get('source', 'data')} "
                                         f"({runs[0].evaluation_split}): mean ± std, dots = "
                                         "each model"))  # fmt: skip
    return out


__all__ = [
    "ComparedRun",
    "check_comparable",
    "common_metrics",
    "compare_runs",
    "comparison_rows",
    "load_run",
    "plot_comparison",
]
