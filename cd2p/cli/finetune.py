"""``cd2p finetune TASK``: fine-tune (or linearly probe) a backbone on a task of the task table."""

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
    multirun_table,
    new_run_output,
    overrides_option,
    resume_option,
    resumed_run_dir,
    run_out_option,
    task_argument,
    user_errors,
)

FEW_SHOT_RECIPE = "finetune-modelnet40-fewshot"


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
@click.option(
    "--seeds",
    callback=lambda ctx, param, value: parse_seeds(value),
    default=None,
    metavar="LIST",
    help="Train one model per seed (e.g. 0,1,2,3,4 or 0-4), one after another, into "
    "RUN/seed-<s>/; report every metric as mean ± std with min and max (RUN/summary.json).",
)
@click.option(
    "--few-shot-protocol",
    is_flag=True,
    help="Classification: Point-BERT's few-shot benchmark: N-way K-shot episodes (--ways, "
    "--shots), --folds folds each, --queries test shapes per class; mean ± std over the folds "
    f"[default recipe: {FEW_SHOT_RECIPE}].",
)
@click.option("--ways", default="5,10", show_default=True, metavar="LIST",
              help="--few-shot-protocol: the N of the N-way episodes.")
@click.option("--shots", default="10,20", show_default=True, metavar="LIST",
              help="--few-shot-protocol: the K training shapes per class.")
@click.option("--folds", default=10, show_default=True, type=click.IntRange(min=1),
              help="--few-shot-protocol: episodes per setting.")
@click.option("--queries", default=20, show_default=True, type=click.IntRange(min=1),
              help="--few-shot-protocol: test shapes per class of an episode.")
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
    seeds: list[int] | None,
    few_shot_protocol: bool,
    ways: str,
    shots: str,
    folds: int,
    queries: int,
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
      cd2p finetune classification --data prepared/modelnet40 --init runs/distill \\
          --seeds 0,1,2,3,4 --out runs/mn40-5seeds        # mean ± std over 5 models
      cd2p finetune classification --data prepared/modelnet40 --init runs/distill \\
          --few-shot-protocol --out runs/mn40-fewshot     # 5/10-way x 10/20-shot x 10 folds

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
    from cd2p.engine.multirun import is_multirun
    from cd2p.tasks import get_task

    spec = get_task(task)
    if seeds is not None and few_shot_protocol:
        raise click.UsageError(
            "--few-shot-protocol already repeats over --folds episodes; it is not combined "
            "with --seeds (the folds are drawn with run.seed: --set run.seed=S)"
        )
    if few_shot_protocol and few_shot is not None:
        raise click.UsageError("--few-shot-protocol sets the shots itself (--shots); drop "
                               "--few-shot")  # fmt: skip
    if resume is not None:
        if (recipe_arg or linear_probe or init or few_shot is not None
                or seeds is not None or few_shot_protocol):  # fmt: skip
            raise click.UsageError(
                "--resume continues with the run's saved settings: drop "
                "--recipe/--init/--linear-probe/--few-shot/--seeds/--few-shot-protocol "
                "(--set may change the run's length, e.g. --set schedule.epochs=400)"
            )
        recipe, name, out = None, None, resumed_run_dir(out, resume)
        if is_multirun(resume):
            _run_many(task, None, data, None, out, None, "", name, resume=True,
                      progress=not no_progress)  # fmt: skip
            return
    else:
        if out is None or data is None:
            raise click.UsageError("a new run needs --data PREPARED and --out RUN (or --resume)")
        # The few-shot protocol has its own standard settings (Point-MAE's cfgs/fewshot.yaml).
        name = recipe_arg or (FEW_SHOT_RECIPE if few_shot_protocol else spec.default_recipe)
        extra = ["finetune.linear_probe=true"] if linear_probe else []
        if few_shot is not None:
            extra.append(f"finetune.few_shot={few_shot}")
        recipe = load_recipe(name, [*overrides, *extra])
        if seeds is not None or few_shot_protocol:
            from cd2p.engine.multirun import few_shot_members, seed_members

            if seeds is not None:
                members = seed_members(seeds)
                kind = "seeds"
                command = f"cd2p finetune {task} --seeds {','.join(map(str, seeds))}"
            else:
                way_list, shot_list = parse_int_list(ways, "--ways"), parse_int_list(shots,
                                                                                    "--shots")
                members = few_shot_members(way_list, shot_list, folds, queries)
                kind = "few-shot-protocol"
                command = (f"cd2p finetune {task} --few-shot-protocol --ways {ways} "
                           f"--shots {shots} --folds {folds} --queries {queries}")
            with new_run_output(out, False):
                _run_many(task, recipe, data, init, out, members, kind, name, command=command,
                          progress=not no_progress)  # fmt: skip
            return
    with new_run_output(out, resume is not None):
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
        if facts.get("few_shot_way") is not None:
            table.add_row("few-shot", f"{facts['few_shot_way']}-way {facts['few_shot']}-shot, "
                          f"fold {facts['few_shot_fold']}")  # fmt: skip
        elif facts.get("few_shot") is not None:
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


def parse_int_list(value: str, option: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` (or a mix, ``"0-2,7"``) -> a list of integers."""
    items: list[int] = []
    try:
        for part in value.split(","):
            part = part.strip()
            if "-" in part[1:]:
                low, high = part.split("-", 1) if not part.startswith("-") else (part, part)
                items += list(range(int(low), int(high) + 1))
            elif part:
                items.append(int(part))
    except ValueError:
        raise click.BadParameter(f"expected integers such as 0,1,2 or 0-4, got {value!r}",
                                 param_hint=option) from None  # fmt: skip
    if not items:
        raise click.BadParameter("no value given", param_hint=option)
    return items


def parse_seeds(value: str | None) -> list[int] | None:
    """``--seeds`` -> the seeds (``None`` when not given)."""
    return None if value is None else parse_int_list(value, "--seeds")


def _run_many(
    task: str,
    recipe,
    data: Path | None,
    init: str | None,
    out: Path,
    members,
    kind: str,
    name: str | None,
    *,
    command: str = "",
    resume: bool = False,
    progress: bool = True,
) -> None:
    """A multi-seed or few-shot-protocol run, with a line per member and the summary table."""
    from cd2p.engine import distributed as D
    from cd2p.engine.multirun import run_multi

    def announce(index: int, count: int, member, state: str) -> None:
        what = {"done": "done, kept", "resume": "resuming", "new": "training"}[state]
        console.rule(styled("[bold]{i}/{n}[/] {name} ({what})", i=index + 1, n=count,
                            name=member.name, what=what))

    result = run_multi(task, recipe, data, init, out, members, kind=kind, command=command,
                       resume=resume, progress=progress, recipe_name=name,
                       on_member=announce)  # fmt: skip
    if is_main_process():
        console.print(multirun_table(result.summary, f"cd2p finetune {task}: {out}"))
        console.print(f"wrote {out / 'summary.json'}")
    D.cleanup()
