"""``cd2p pretrain``: distil the 2D teacher into a point-cloud student (also under torchrun)."""

from __future__ import annotations

from pathlib import Path

import click

from cd2p._text import styled
from cd2p.cli._common import (
    EXISTING_DIR,
    console,
    interruptible,
    is_main_process,
    key_value_table,
    new_run_output,
    overrides_option,
    resume_option,
    resumed_run_dir,
    run_out_option,
    user_errors,
)


@click.command()
@click.option(
    "--recipe",
    "recipe_arg",
    default=None,
    help="Recipe YAML path or shipped name [default: pretrain-scannet; with --resume the run's].",
)
@click.option(
    "--data",
    "data",
    multiple=True,
    type=EXISTING_DIR,
    help="Prepared pairs (`cd2p prepare scannet` OUT, with `cd2p prepare teacher` targets); "
    "repeat for several parts.",
)
@run_out_option
@overrides_option()
@resume_option
@click.option(
    "--no-progress", is_flag=True, help="No progress bar (logs still go to metrics.jsonl)."
)
@user_errors
@interruptible
def pretrain(
    recipe_arg: str | None,
    data: tuple[Path, ...],
    out: Path | None,
    overrides: tuple[str, ...],
    resume: Path | None,
    no_progress: bool,
) -> None:
    """Pre-train a student backbone on prepared RGB/point pairs; export it to RUN/backbone.

    \b
    Examples:
      cd2p pretrain --recipe pretrain-scannet --data pairs/ --out runs/distill
      torchrun --nproc_per_node 8 -m cd2p pretrain --data pairs/ --out runs/distill
      cd2p pretrain --resume runs/distill
      cd2p pretrain --resume runs/distill --set schedule.epochs=300   # extend a run

    Ctrl-C or SIGTERM (a cluster's time limit) finishes the current step, writes a checkpoint
    and prints the --resume command. A resumed run may change only its length
    (schedule.epochs, schedule.max_steps), what it records and how it runs (run.*,
    data.num_workers); the learning rate then follows the cosine of the new length.
    """
    from cd2p.config import load_recipe
    from cd2p.engine import distributed as D
    from cd2p.engine.pretrain import run_pretrain

    if resume is not None:
        if recipe_arg:
            raise click.UsageError(
                "--resume continues with the run's saved recipe: drop --recipe "
                "(--set may change the run's length, e.g. --set schedule.epochs=300)"
            )
        recipe, name, out = None, None, resumed_run_dir(out, resume)
    else:
        if out is None or not data:
            raise click.UsageError("a new run needs --data PAIRS and --out RUN (or --resume RUN)")
        name = recipe_arg or "pretrain-scannet"
        recipe = load_recipe(name, overrides)
    with new_run_output(out, resume is not None):
        result = run_pretrain(
            recipe,
            list(data) or None,
            out,
            resume=resume is not None,
            progress=not no_progress,
            recipe_name=name,
            overrides=overrides if resume is not None else (),
        )
    if is_main_process():
        run = result.run
        table = key_value_table(f"cd2p pretrain: {out}")
        table.add_row("steps", f"{run.step} / {run.total_steps} ({run.epoch} epochs)")
        table.add_row("pairs", str(result.pairs))
        if run.final_loss is not None:
            table.add_row("final loss", f"{run.final_loss:.5g}")
        for key, value in run.final_components.items():
            table.add_row(key, f"{value:.5g}")
        # The stored description of a random teacher already says so; flag only the others.
        flag = result.random_teacher and "RANDOM" not in result.teacher
        table.add_row("teacher", styled("{teacher}" + (" [bold red](RANDOM)" if flag else ""),
                                         teacher=result.teacher))
        table.add_row("backbone", str(result.backbone_dir) if result.backbone_dir else "(not yet)")
        if result.student_dir:
            table.add_row("student", f"{result.student_dir} (cd2p caption / cd2p zeroshot)")
        console.print(table)
        if result.backbone_dir:
            console.print(styled("load it with [bold]Cd2pBackbone.from_pretrained({path})",
                                 path=repr(str(result.backbone_dir))))
    D.cleanup()
