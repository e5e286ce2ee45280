"""``cd2p prepare teacher PAIRS``: compute and store the teacher targets of prepared pairs."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cd2p._text import styled
from cd2p.cli._common import (
    EXISTING_DIR,
    EXISTING_FILE,
    console,
    parse_shard,
    resolve_device,
    user_errors,
)


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:.1f} images/s")


def _random_warning(seed: int) -> Panel:
    return Panel(
        f"RANDOM TEACHER (seed {seed}): these targets come from random weights, NOT from CLIP "
        "and ClipCap.\nThey are for tests and the offline demo only; a student pre-trained on "
        "them learns nothing useful. The files are marked random_teacher=true.",
        title="warning",
        style="bold yellow",
    )


@click.command("teacher")
@click.argument("pairs", nargs=-1, required=True, type=EXISTING_DIR)
@click.option(
    "--target",
    default="prefix",
    show_default=True,
    metavar="prefix|clip|prefix,clip",
    help="prefix: CLIP + ClipCap semantic prefix (10, 768); clip: CLIP embedding (1, 512); "
    "prefix,clip: both from one CLIP pass (for the distill+clip objective, zero-shot).",
)
@click.option(
    "--clip-weights",
    type=EXISTING_FILE,
    help="Local open_clip ViT-B-32-quickgelu checkpoint instead of the 'openai' download.",
)
@click.option(
    "--clipcap-weights",
    type=EXISTING_FILE,
    help="Local ClipCap conceptual_weights.pt (or .safetensors) instead of the Hub download.",
)
@click.option(
    "--random-teacher", is_flag=True, help="Seeded RANDOM weights, not CLIP (tests, demo)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --random-teacher.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="JPEG decoding processes [default: min(8, cores - 1) on CUDA, 0 on CPU].",
)
@click.option("--shard", metavar="I/N", help="Only every N-th scene from the I-th (one per GPU).")
@click.option("--overwrite", is_flag=True, help="Recompute scenes that already have targets.")
# Another registered open_clip config with ViT-B/32's interface (tests use a tiny one).
@click.option("--model-name", default=None, hidden=True)
@user_errors
def teacher(
    pairs: tuple[Path, ...],
    target: str,
    clip_weights: Path | None,
    clipcap_weights: Path | None,
    random_teacher: bool,
    seed: int,
    batch_size: int,
    device: str,
    workers: int | None,
    shard: str | None,
    overwrite: bool,
    model_name: str | None,
) -> None:
    """Compute the frozen teacher's targets for every pair under PAIRS (one or more outputs of
    `cd2p prepare scannet`) and store them as PAIRS/targets/<target>/<scene_id>.safetensors.

    Resumable: scenes whose targets are complete are skipped. Targets remember the images
    they were computed from (images_sha256): a scene prepared again with other frames is
    recomputed, and so, once, are targets written before cd2p stored that digest.
    """
    from cd2p.data.teacher_targets import (
        parse_targets,
        plan_teacher_targets,
        write_teacher_targets,
    )
    from cd2p.models.teacher import DEFAULT_MODEL_NAME, Teacher, target_shape

    if random_teacher and (clip_weights or clipcap_weights):
        raise click.UsageError("--random-teacher takes no --clip-weights/--clipcap-weights")
    try:
        targets = parse_targets(target)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--target") from None
    # The mapper is loaded only when a prefix is asked for; CLIP alone gives "clip".
    teacher_target = "prefix" if "prefix" in targets else "clip"
    shard_range = parse_shard(shard)
    model_name = model_name or DEFAULT_MODEL_NAME  # open_clip is imported only when running
    torch_device = resolve_device(device)
    if workers is None:
        workers = min(8, max((os.cpu_count() or 1) - 1, 0)) if torch_device.type == "cuda" else 0

    if random_teacher:
        console.print(_random_warning(seed))
        model = Teacher.random(teacher_target, seed, model_name=model_name, device=torch_device)
    else:
        model = Teacher.from_pretrained(
            teacher_target,
            clip_weights=clip_weights,
            clipcap_weights=clipcap_weights,
            device=torch_device,
            model_name=model_name,
        )
    plan = plan_teacher_targets(
        pairs, model, overwrite=overwrite, shard=shard_range, targets=targets
    )
    shapes = " + ".join(f"{name} {target_shape(name)}" for name in targets)
    console.print(styled("[bold]teacher[/]  {text}", text=model.description))
    console.print(styled(
        "[bold]target[/]   {shapes}, float16   [bold]device[/] {device}   [bold]batch[/] "
        "{batch}   [bold]workers[/] {workers}", shapes=shapes, device=torch_device,
        batch=batch_size, workers=workers,
    ))
    console.print(styled(
        "[bold]scenes[/]   {todo} to compute ({images} images), {done} already done",
        todo=len(plan.to_compute), images=plan.images, done=len(plan.done),
    ))
    if plan.outdated:
        reasons: dict[str, int] = {}
        for why in plan.outdated.values():
            reasons[why] = reasons.get(why, 0) + 1
        for why, count in sorted(reasons.items()):
            verb = "were" if why.startswith("computed") else "have"
            console.print(styled("[yellow]recomputed[/] {count} scene(s) whose targets {verb} "
                                 "{why}", count=count, verb=verb, why=why), soft_wrap=True)

    progress = Progress(
        TextColumn("[bold]teacher"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task("teacher", total=plan.images)
        summary = write_teacher_targets(
            plan,
            model,
            batch_size=batch_size,
            workers=workers,
            on_images=lambda n: progress.advance(task, n),
        )

    table = Table(title=f"teacher targets '{plan.target}'", show_header=False)
    table.add_row("scenes computed", str(len(summary.scenes_done)))
    table.add_row("scenes skipped (already done)", str(len(summary.scenes_skipped)))
    table.add_row("images", str(summary.images))
    table.add_row("seconds", f"{summary.seconds:.1f}")
    table.add_row("images/s", f"{summary.images_per_second:.1f}")
    table.add_row(
        "written to", ", ".join(str(p / "targets" / name) for p in pairs for name in targets)
    )
    table.add_row("teacher", summary.teacher)
    console.print(table)
    if summary.random_teacher:
        console.print(_random_warning(seed))
