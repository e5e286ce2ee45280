"""``cd2p evaluate classification|partseg``: metrics, per-class table, confusion matrix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
from rich.table import Table

from cd2p._atomic import atomic_write_json
from cd2p.cli._common import (
    EXISTING_DIR,
    OUTPUT_DIR,
    console,
    resolve_device,
    task_argument,
    user_errors,
)


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


@click.command()
@task_argument
@click.option(
    "--model",
    "model_id",
    required=True,
    help="A saved task model (RUN/model of `cd2p finetune`) or a Hub id.",
)
@click.option(
    "--data",
    required=True,
    type=EXISTING_DIR,
    help="Prepared dataset (`cd2p prepare ...` OUT).",
)
@click.option("--split", default="test", show_default=True, help="Split of the prepared data.")
@click.option(
    "--votes",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Also report metrics averaged over this many augmented views (10: the paper).",
)
@click.option(
    "--points",
    "num_points",
    default=None,
    type=click.IntRange(min=1),
    help="Points per shape [default: what the model was trained on].",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option(
    "--out",
    type=OUTPUT_DIR,
    default=None,
    help="Write metrics.json (and confusion_matrix.png) here.",
)
@user_errors
def evaluate(
    task: str,
    model_id: str,
    data: Path,
    split: str,
    votes: int,
    num_points: int | None,
    batch_size: int,
    device: str,
    out: Path | None,
) -> None:
    """Evaluate a classification or part-segmentation model on a prepared benchmark.

    \b
    classification: overall accuracy (OA) and mean class accuracy (mAcc), with and without
                    voting, a per-class table and a confusion-matrix PNG.
    partseg:        instance and class mIoU (ShapeNetPart protocol) and a per-category table.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from cd2p.engine.finetune import evaluate as run_evaluate
    from cd2p.engine.finetune import load_task_split
    from cd2p.engine.metrics import plot_confusion_matrix
    from cd2p.models.classification import Cd2pForClassification
    from cd2p.models.partseg import Cd2pForPartSegmentation

    cls = Cd2pForClassification if task == "classification" else Cd2pForPartSegmentation
    config = Path(model_id) / "config.json"
    if config.is_file():
        kind = json.loads(config.read_text()).get("model_kind")
        if kind != cls.model_kind:
            raise click.UsageError(
                f"{model_id} holds a {kind!r} model, not a {cls.model_kind!r} one"
            )
    model = cls.from_pretrained(model_id).to(resolve_device(device))
    loaded = load_task_split(task, data, split)
    with Progress(
        TextColumn("[bold]evaluate"), BarColumn(), MofNCompleteColumn(), console=console
    ) as bar:
        job = bar.add_task("", total=len(loaded))
        report = run_evaluate(
            task,
            model,
            loaded,
            votes,
            num_points=num_points,
            batch_size=batch_size,
            progress=lambda n: bar.advance(job, n),
        )

    voted = votes > 1
    if task == "classification":
        table = Table(title=f"{model_id} on {data} ({split})", title_justify="left")
        for col in ("class", "shapes", "acc %") + (("acc % (vote)",) if voted else ()):
            table.add_column(col, justify="left" if col == "class" else "right")
        for row in report.per_class:
            cells = [row["name"], str(row["support"]), _pct(row["acc"])]
            table.add_row(*cells, *([_pct(row["acc_vote"])] if voted else []))
        console.print(table)
        lines = [f"OA {_pct(report.metrics['oa'])} %   mAcc {_pct(report.metrics['macc'])} %"]
        if voted:
            lines.append(
                f"OA {_pct(report.metrics['oa_vote'])} %   mAcc "
                f"{_pct(report.metrics['macc_vote'])} %   ({votes} votes)"
            )
    else:
        table = Table(title=f"{model_id} on {data} ({split})", title_justify="left")
        for col in ("category", "shapes", "mIoU %") + (("mIoU % (vote)",) if voted else ()):
            table.add_column(col, justify="left" if col == "category" else "right")
        for row in report.per_class:
            cells = [row["name"], str(row["shapes"]), _pct(row["miou"])]
            table.add_row(*cells, *([_pct(row["miou_vote"])] if voted else []))
        console.print(table)
        m = report.metrics
        lines = [
            f"instance mIoU {_pct(m['instance_miou'])} %   class mIoU {_pct(m['class_miou'])} %"
        ]
        if voted:
            lines.append(
                f"instance mIoU {_pct(m['instance_miou_vote'])} %   class mIoU "
                f"{_pct(m['class_miou_vote'])} %   ({votes} votes)"
            )
    for line in lines:
        console.print(f"[bold]{line}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {**report.to_json(), "model": model_id, "data": str(data), "split": split}
        atomic_write_json(out / "metrics.json", payload)
        written = [out / "metrics.json"]
        if report.confusion is not None:
            title = f"{model_id} on {data.name} ({split}, " + (
                f"{votes} votes)" if voted else "no voting)"
            )
            written.append(
                plot_confusion_matrix(
                    report.confusion, report.class_names, out / "confusion_matrix.png", title
                )
            )
        console.print("wrote " + ", ".join(str(p) for p in written))
