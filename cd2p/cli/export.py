"""``cd2p export RUN``: the whole student of an existing pre-training run, from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from cd2p._text import styled
from cd2p.cli._common import EXISTING_DIR, OUTPUT_DIR, console, user_errors


@click.command()
@click.argument("run", type=EXISTING_DIR)
@click.option("--out", type=OUTPUT_DIR, default=None, help="[default: RUN/student]")
@click.option(
    "--checkpoint",
    type=EXISTING_DIR,
    default=None,
    help="A checkpoint directory of the run (RUN/checkpoints/step-N) [default: the latest].",
)
@user_errors
def export(run: Path, out: Path | None, checkpoint: Path | None) -> None:
    """Export the whole student of a pre-training run (backbone, concept extractor and
    alignment heads) as a Hub model, from its latest checkpoint.

    New runs export RUN/student themselves; this serves runs made before cd2p did, runs still
    training, and earlier checkpoints. An existing output directory is replaced.

    \b
    Example:
      cd2p export runs/distill            # -> runs/distill/student
      cd2p caption --model runs/distill/student scan.ply
    """
    from cd2p.engine.pretrain import export_run_student

    path = export_run_student(run, out, checkpoint)
    console.print(styled("student exported to [bold]{path}[/]", path=path))
    console.print(styled("load it with [bold]cd2p.from_pretrained({path})", path=repr(str(path))))
