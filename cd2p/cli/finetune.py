"""``cd2p finetune TASK``: fine-tune (or linearly probe) a backbone on a task of the task table."""

from __future__ import annotations

from pathlib import Path

import click

from cd2p.cli._common import (
    EXISTING_DIR,
    console,
    interruptible,
    is_main_process,
    key_value_table,
    overrides_option,
    resume_option,
    resumed_run_dir,
    run_out_option,
    task_argument,
    user_errors,
)


def _task_lines() -> str:
    from cd2p.tasks import all_tasks

    return "\n".join(
        f"  {spec.name:<15} {spec.summary}; data: {spec.prepare_hint}; recipe: "
        f"{spec.default_recipe}"
        for spec in all_tasks()
    )


@click.command(
    epilog="\b\nTasks (TASK, what it is, its data, its default recipe):\n" + _task_lines()
)
@task_argument
@click.option(
    "--recipe",
    "recipe_arg",
    default=None,
    help="Recipe YAML path or shipped name [default: the task's recipe, listed below; with "
    "--resume the run's].",
)
@click.option(
    "--data",
    type=EXISTING_DIR,
    help="Prepared dataset: the OUT of the task's `cd2p prepare ...` (listed below).",
)
@click.option(
    "--init",
    default=None,
    help="Pre-trained backbone: a pre-training RUN, its RUN/backbone, or a Hub id "
    "[default: train from scratch].",
)
@run_out_option
@overrides_option()
@click.option(
    "--linear-probe",
    is_flag=True,
    help="Classification: freeze the backbone and fit a linear classifier on its pooled "
    "features.",
)
@click.option(
    "--few-shot",
    "few_shot",
    type=click.IntRange(min=1),
    default=None,
    metavar="K",
    help="Classification with K labelled training shapes per class, drawn with run.seed "
    "(with fine-tuning or --linear-probe).",
)
@resume_option
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@user_errors
@interruptible
def finetune(
    task: str,
    recipe_arg: str | None,
    data: Path | None,
    init: str | None,
    out: Path | None,
    overrides: tuple[str, ...],
    linear_probe: bool,
    few_shot: int | None,
    resume: Path | None,
    no_progress: bool,
) -> None:
    """Fine-tune a task model on a prepared benchmark; the best model goes to RUN/model.

    \b
    Examples:
      cd2p finetune classification --recipe finetune-modelnet40 --data prepared/modelnet40 \\
          --init runs/distill --out runs/mn40
      cd2p finetune partseg --data prepared/shapenetpart --init org/cd2p-base --out runs/snp
      cd2p finetune segmentation --data prepared/scannet-scenes --init runs/distill \\
          --out runs/scannet-seg
      cd2p finetune classification --data prepared/modelnet40 --init runs/distill \\
          --linear-probe --few-shot 5 --out runs/mn40-5shot

    Under torchrun (`torchrun --nproc-per-node 8 -m cd2p finetune ...`) data.batch_size is
    the global batch; evaluation of scene tasks is split over the processes.

    Ctrl-C or SIGTERM (a cluster's time limit) finishes the current step, writes a checkpoint
    and prints the --resume command. `--resume RUN --set schedule.epochs=N` extends a
    finished or interrupted run; only its length, what it records (run.*) and the final
    evaluation's votes may change.
    """
    from cd2p.config import load_recipe
    from cd2p.engine import distributed as D
    from cd2p.engine.finetune import run_finetune
    from cd2p.tasks import get_task

    spec = get_task(task)
    if resume is not None:
        if recipe_arg or linear_probe or init or few_shot is not None:
            raise click.UsageError(
                "--resume continues with the run's saved settings: drop "
                "--recipe/--init/--linear-probe/--few-shot (--set may change the run's "
                "length, e.g. --set schedule.epochs=400)"
            )
        recipe, name, out = None, None, resumed_run_dir(out, resume)
    else:
        if out is None or data is None:
            raise click.UsageError("a new run needs --data PREPARED and --out RUN (or --resume)")
        name = recipe_arg or spec.default_recipe
        extra = ["finetune.linear_probe=true"] if linear_probe else []
        if few_shot is not None:
            extra.append(f"finetune.few_shot={few_shot}")
        recipe = load_recipe(name, [*overrides, *extra])
    result = run_finetune(
        task,
        recipe,
        data,
        init,
        out,
        resume=resume is not None,
        progress=not no_progress,
        recipe_name=name,
        overrides=overrides if resume is not None else (),
    )
    if is_main_process():
        table = key_value_table(f"cd2p finetune {task}: {out}")
        if result.run is not None:
            run = result.run
            table.add_row("steps", f"{run.step} / {run.total_steps} ({run.epoch} epochs)")
        if result.best:
            table.add_row(
                f"best {result.best['metric']}",
                f"{100 * result.best['value']:.2f} % at step {result.best['step']}",
            )
        for key, value in result.metrics.items():
            table.add_row(key, f"{100 * value:.2f} %")
        facts = spec.run_facts(result.recipe)
        if facts.get("few_shot") is not None:
            table.add_row("few-shot", f"{facts['few_shot']} {spec.item_name} per class")
        for note in result.notes:
            table.add_row("note", note)
        table.add_row(
            "model",
            str(result.model_dir)
            if result.model_dir
            else ("(linear probe: RUN/probe)" if result.run is None else "(not yet)"),
        )
        console.print(table)
    D.cleanup()
