"""``cd2p zeroshot``: zero-shot classification of a prepared benchmark through CLIP's text
space, with a student that predicts the CLIP image embedding (objective ``distill+clip``)."""

from __future__ import annotations

import math
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from cd2p._text import styled
from cd2p.cli._common import (
    EXISTING_DIR,
    EXISTING_FILE,
    OUTPUT_DIR,
    console,
    err_console,
    resolve_device,
    user_errors,
)


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}"


def default_out(model_id: str, source: str, split: str) -> Path | None:
    """``RUN/zeroshot/<source>-<split>`` when the model is a student inside a pre-training run
    (where `cd2p push` finds it for the card); otherwise ``None``."""
    model = Path(model_id)
    run = model.parent
    if model.is_dir() and (run / "recipe.yaml").is_file() and (run / "run.json").is_file():
        return run / "zeroshot" / f"{source}-{split}"
    return None


@click.command()
@click.option(
    "--model",
    "model_id",
    required=True,
    help="A cd2p student predicting the CLIP embedding (RUN/student of a distill+clip run) or "
    "a Hub id.",
)
@click.option(
    "--data",
    required=True,
    type=EXISTING_DIR,
    help="A classification cache: `cd2p prepare modelnet40|scanobjectnn` OUT, or synthetic "
    "shapes prepared the same way.",
)
@click.option("--split", default="test", show_default=True, help="Split of the cache.")
@click.option(
    "--prompts",
    type=EXISTING_FILE,
    help="Prompt templates, one per line with {} for the class name ('#' lines skipped) "
    "[default: cd2p's ensemble of 10, see the README].",
)
@click.option(
    "--clip-weights",
    type=EXISTING_FILE,
    help="Local open_clip ViT-B-32-quickgelu checkpoint (with its text tower) instead of the "
    "'openai' download; the teacher's CLIP.",
)
@click.option(
    "--random-text-tower", is_flag=True, help="Seeded RANDOM text tower, NOT CLIP (tests)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random tower.")
@click.option(
    "--points",
    "num_points",
    type=click.IntRange(min=1),
    default=None,
    help="Points per cloud [default: the student's pre-training number].",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option(
    "--out",
    type=OUTPUT_DIR,
    default=None,
    help="Write metrics.json and confusion_matrix.png here [default: RUN/zeroshot/<data>-<split> "
    "when the model is RUN/student, so that `cd2p push` puts the result on the card].",
)
# Another registered open_clip config with ViT-B/32's interface (tests use a tiny one).
@click.option("--clip-model-name", default=None, hidden=True)
@user_errors
def zeroshot(
    model_id: str,
    data: Path,
    split: str,
    prompts: Path | None,
    clip_weights: Path | None,
    random_text_tower: bool,
    seed: int,
    num_points: int | None,
    batch_size: int,
    device: str,
    out: Path | None,
    clip_model_name: str | None,
) -> None:
    """Zero-shot classification: every cloud gets the class whose CLIP text embedding (a
    prompt ensemble per class name) is closest (cosine) to the student's predicted CLIP image
    embedding. No training on the benchmark's labels.

    Prints OA, mean class accuracy and a per-class table; writes metrics.json and a
    confusion-matrix PNG.

    \b
    Examples:
      cd2p zeroshot --model runs/zeroshot/student --data prepared/modelnet40
      cd2p zeroshot --model runs/zeroshot/student --data prepared/scanobjectnn/objbg \\
          --prompts my-prompts.txt --clip-weights open_clip_model.safetensors
    """
    import cd2p
    from cd2p.data.classification import load_classification_cache
    from cd2p.language.zeroshot import (
        DEFAULT_PROMPTS,
        ClipTextTower,
        evaluate_zeroshot,
        read_prompts,
        write_zeroshot,
    )
    from cd2p.models.teacher import DEFAULT_MODEL_NAME

    if random_text_tower and clip_weights:
        raise click.UsageError("--random-text-tower takes no --clip-weights")
    torch_device = resolve_device(device)
    templates = read_prompts(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    split_data = load_classification_cache(data, split)
    student = cd2p.from_pretrained(model_id)
    if "clip" not in getattr(student, "outputs", ()):
        raise ValueError(
            f"{model_id} predicts no CLIP embedding (model kind "
            f"{getattr(student, 'model_kind', '?')!r}, objective "
            f"{getattr(student, 'objective', '-')!r}): zero-shot needs a student pre-trained "
            "with objective distill+clip (recipe pretrain-scannet-zeroshot) or distill-clip"
        )
    student = student.to(torch_device)
    model_name = clip_model_name or DEFAULT_MODEL_NAME
    if random_text_tower:
        tower = ClipTextTower.random(seed, model_name, device=torch_device)
        err_console.print(styled(
            "[bold yellow]warning:[/] RANDOM text tower (seed {seed}), NOT CLIP: a pipeline "
            "test, the accuracy means nothing", seed=seed
        ))
    else:
        tower = ClipTextTower.from_pretrained(clip_weights, model_name, device=torch_device)
    console.print(styled("[bold]student[/]     {model} ({objective})", model=model_id,
                         objective=student.objective))
    console.print(styled("[bold]text tower[/]  {text}", text=tower.description))
    console.print(styled(
        "[bold]data[/]        {data} ({split}: {shapes} shapes, {classes} classes)   "
        "[bold]prompts[/] {prompts}", data=data, split=split, shapes=len(split_data),
        classes=split_data.num_classes, prompts=len(templates)
    ))
    with Progress(
        TextColumn("[bold]zero-shot"), BarColumn(), MofNCompleteColumn(), TextColumn("shapes"),
        console=console,
    ) as bar:  # fmt: skip
        job = bar.add_task("", total=len(split_data))
        report = evaluate_zeroshot(
            student, split_data, tower, templates, batch_size=batch_size,
            num_points=num_points, progress=lambda n: bar.advance(job, n),
        )  # fmt: skip

    table = Table(title=f"zero-shot: {model_id} on {data} ({split})", title_justify="left")
    table.add_column("class")
    table.add_column("shapes", justify="right")
    table.add_column("acc %", justify="right")
    for row in report.per_class:
        table.add_row(row["name"], str(row["support"]), _pct(row["acc"]))
    console.print(table)
    chance = 100.0 / split_data.num_classes
    console.print(styled(
        "[bold]zero-shot OA {oa} %   mAcc {macc} %[/]   (chance {chance} %)",
        oa=_pct(report.metrics["oa"]), macc=_pct(report.metrics["macc"]), chance=f"{chance:.2f}"
    ))
    out = out or default_out(model_id, split_data.source, split)
    if out is None:
        console.print("(pass --out DIR to save metrics.json and the confusion matrix)")
        return
    facts = {
        "model": model_id, "data": str(data), "dataset": split_data.source, "split": split,
    }  # fmt: skip
    title = f"zero-shot: {Path(model_id).name} on {split_data.source} ({split})"
    written = write_zeroshot(report, out, title, **facts)
    console.print("wrote " + ", ".join(str(p) for p in written))
