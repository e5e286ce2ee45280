"""``cd2p compare RUN...``: finished runs on the same prepared data, side by side."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from cd2p._atomic import atomic_write_json
from cd2p.cli._common import EXISTING_DIR, console, user_errors


def _cell(stats: dict | None) -> str:
    if not stats:
        return "-"
    text = f"{100 * stats['mean']:.2f}"
    if stats.get("std") is not None:
        text += f" ± {100 * stats['std']:.2f}"
    if stats["n"] > 1:
        text += f"\n{100 * stats['min']:.2f}–{100 * stats['max']:.2f}"
    return text


@click.command()
@click.argument("runs", nargs=-1, required=True, type=EXISTING_DIR)
@click.option("--metric", "metrics", multiple=True,
              help="A metric to compare (repeatable) [default: every metric the runs share].")
@click.option("--label", "labels", multiple=True,
              help="A name per run, in order (repeatable) [default: the run directories' names].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("compare.png"), show_default=True,
              help="The PNG: one panel per metric, bars at the mean, the std and every model.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write the table as JSON here.")
@user_errors
def compare(
    runs: tuple[Path, ...],
    metrics: tuple[str, ...],
    labels: tuple[str, ...],
    out: Path,
    json_out: Path | None,
) -> None:
    """Compare finished runs (fine-tuning runs, multi-seed or few-shot runs) on the same data.

    Runs that read different prepared data (their recorded fingerprints differ), are of
    different tasks, or were evaluated on different splits are refused with the reason.
    Values are in %: mean ± std (sample, n - 1) and, below, min–max over the models.

    \b
    Example:
      cd2p finetune classification --data mn40 --seeds 0-4 --out runs/scratch
      cd2p finetune classification --data mn40 --seeds 0-4 --init baselines/point-mae \\
          --out runs/point-mae
      cd2p finetune classification --data mn40 --seeds 0-4 --init runs/distill --out runs/cd2p
      cd2p compare runs/scratch runs/point-mae runs/cd2p --out mn40.png
    """
    from cd2p.compare import compare_runs

    result = compare_runs(runs, labels, metrics, out)
    data = result["data"] or {}
    title = (f"{result['task']} on {data.get('source', 'the data')} ({result['split']}); "
             f"data sha256 {data.get('sha256', '')[:12]}")  # fmt: skip
    table = Table(title=title, title_justify="left", show_lines=True)
    table.add_column("run")
    table.add_column("models", justify="right")
    for metric in result["metrics"]:
        table.add_column(metric, justify="right")
    for row in result["rows"]:
        first = next((s for s in row["metrics"].values() if s), None)
        name = row["label"] if row["group"] in ("1 model",) else f"{row['label']} ({row['group']})"
        table.add_row(name, str(first["n"] if first else 0),
                      *[_cell(row["metrics"][m]) for m in result["metrics"]])  # fmt: skip
    table.caption = "mean ± std (n - 1); min–max below"
    console.print(table)
    console.print(f"wrote {result['png']}")
    if json_out is not None:
        atomic_write_json(json_out, result)
        console.print(f"wrote {json_out}")
