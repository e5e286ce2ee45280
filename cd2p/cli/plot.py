"""``cd2p plot RUN``: a PNG of a run's training curves."""

from __future__ import annotations

from pathlib import Path

import click

from cd2p.cli._common import EXISTING_DIR, console, user_errors


@click.command()
@click.argument("run", type=EXISTING_DIR)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PNG path [default: RUN/metrics.png].",
)
@user_errors
def plot(run: Path, out: Path | None) -> None:
    """Plot RUN/metrics.jsonl: losses, learning rate and throughput vs step (and evaluations)."""
    from cd2p.engine.metrics_log import plot_metrics, read_metrics, sparkline

    path = plot_metrics(run, out)
    losses = [r["loss"] for r in read_metrics(run, "train")]
    console.print(f"loss {losses[0]:.4g} {sparkline(losses)} {losses[-1]:.4g}")
    console.print(f"wrote {path}")
