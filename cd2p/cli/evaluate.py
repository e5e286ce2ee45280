"""``cd2p evaluate TASK``: a task model's metrics on prepared data, its per-class table and
plots, through the task table."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
from rich.table import Table

from cd2p._atomic import atomic_write_json
from cd2p._text import styled
from cd2p.cli._common import (
    EXISTING_DIR,
    OUTPUT_DIR,
    console,
    is_main_process,
    resolve_device,
    task_argument,
    user_errors,
)


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


@click.command()
@task_argument
@click.option(
    "--model",
    "model_id",
    required=True,
    help="A saved task model (RUN/model of `cd2p finetune`), a Hub id, or a multi-seed / "
    "few-shot run (`cd2p finetune --seeds` / `--few-shot-protocol`): every model of it.",
)
@click.option(
    "--data",
    required=True,
    type=EXISTING_DIR,
    help="Prepared dataset (the OUT of the task's `cd2p prepare ...`).",
)
@click.option(
    "--split",
    default=None,
    help="Split of the prepared data [default: the task's validation split: test for the "
    "object benchmarks, val for ScanNet scenes].",
)
@click.option(
    "--votes",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Object tasks: also report metrics averaged over this many augmented views (10: the "
    "paper). Segmentation: how many times every vertex is scored (3: the recipe's).",
)
@click.option(
    "--points",
    "num_points",
    default=None,
    type=click.IntRange(min=1),
    help="Points per shape or scene draw [default: what the model was trained on].",
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
    split: str | None,
    votes: int,
    num_points: int | None,
    batch_size: int,
    device: str,
    out: Path | None,
) -> None:
    """Evaluate a fine-tuned model on a prepared benchmark.

    \b
    classification: overall accuracy (OA) and mean class accuracy (mAcc), with and without
                    voting, a per-class table and a confusion-matrix PNG.
    partseg:        instance and class mIoU (ShapeNetPart protocol) and a per-category table.
    segmentation:   ScanNet's benchmark mIoU over 20 classes on every vertex of every scene,
                    point accuracy, per-class IoU table and a confusion-matrix PNG; under
                    torchrun the scenes are split over the processes.

    With --model RUN of a multi-seed or few-shot run, every member's model is evaluated and
    each metric reported as mean ± std with min and max (few-shot folds on their own
    episode's shapes of the split).
    """
    from cd2p.engine import distributed as D
    from cd2p.engine.evaluation import default_split
    from cd2p.engine.evaluation import evaluate as run_evaluate
    from cd2p.engine.progress import progress_reporter
    from cd2p.tasks import get_task

    spec = get_task(task)
    split = split or default_split(task)
    started = time.perf_counter()
    from cd2p.engine.multirun import is_multirun

    if is_multirun(model_id):
        _evaluate_multirun(task, Path(model_id), data, split, votes, num_points, batch_size,
                           device, out)  # fmt: skip
        return
    cls = spec.model_class
    config = Path(model_id) / "config.json"
    if config.is_file():
        kind = json.loads(config.read_text()).get("model_kind")
        if kind != cls.model_kind:
            raise click.UsageError(
                f"{model_id} holds a {kind!r} model, not a {cls.model_kind!r} one"
            )
    D.init_distributed(device)
    model = cls.from_pretrained(model_id).to(resolve_device(device))
    loaded = spec.load_split(data, split)
    # A bar on a terminal, plain progress lines in a log file (a cluster job's output).
    with progress_reporter(
        console, "evaluate", len(loaded), spec.item_name, enabled=is_main_process()
    ) as advance:
        report = run_evaluate(
            task,
            model,
            loaded,
            votes,
            num_points=num_points,
            batch_size=batch_size,
            progress=advance,
        )
    if not is_main_process():
        D.cleanup()
        return

    table = Table(title=f"{model_id} on {data} ({split})", title_justify="left")
    table.add_column("class", justify="left")
    for header, key in spec.per_class_columns:
        table.add_column(header, justify="right")
        if f"{key}_vote" in (report.per_class[0] if report.per_class else {}):
            table.add_column(f"{header} (vote)", justify="right")
    for row in report.per_class:
        cells = [str(row["name"])]
        for _, key in spec.per_class_columns:
            value = row[key]
            cells.append(str(value) if isinstance(value, int) else _pct(value))
            if f"{key}_vote" in row:
                cells.append(_pct(row[f"{key}_vote"]))
        table.add_row(*cells)
    console.print(table)
    per_part = report.extra.get("per_part")
    if per_part:
        parts = Table(title="per-part IoU (mean over the shapes of its category)",
                      title_justify="left")  # fmt: skip
        for header in ("category", "part", "shapes", "IoU %"):
            parts.add_column(header, justify="left" if header == "category" else "right")
        if "iou_vote" in per_part[0]:
            parts.add_column("IoU % (vote)", justify="right")
        for row in per_part:
            cells = [str(row["category"]), str(row["part"]), str(row["shapes"]), _pct(row["iou"])]
            if "iou_vote" in row:
                cells.append(_pct(row["iou_vote"]))
            parts.add_row(*cells)
        console.print(parts)
    plain = [m for m in spec.headline if m.key in report.metrics and not m.key.endswith("_vote")]
    voting = [m for m in spec.headline if m.key in report.metrics and m.key.endswith("_vote")]
    line = "   ".join(f"{m.label} {_pct(report.metrics[m.key])} %" for m in plain)
    if not voting and report.votes > 1:  # scene tasks: every point scored several times
        line += f"   ({report.votes} votes)"
    console.print(styled("[bold]{line}", line=line))
    if voting:
        line = "   ".join(f"{m.label} {_pct(report.metrics[m.key])} %" for m in voting)
        console.print(styled("[bold]{line}   ({votes} votes)", line=line, votes=votes))
    if out is not None:
        from cd2p.engine.finetune import fingerprint_data
        from cd2p.provenance import provenance

        out.mkdir(parents=True, exist_ok=True)
        prov = provenance(data=fingerprint_data(spec, data.resolve()),
                          wall_time_s=time.perf_counter() - started,
                          device=resolve_device(device))  # fmt: skip
        payload = {**report.to_json(), "model": model_id, "data": str(data), "split": split,
                   "evaluated_on": split, "metric_names": list(report.metrics),
                   "provenance": prov}  # fmt: skip
        atomic_write_json(out / "metrics.json", payload)
        written = [out / "metrics.json"]
        title = f"{model_id} on {data.name} ({split}" + (
            f", {report.votes} votes)" if report.votes > 1 else ")"
        )
        written += spec.plots(report, out, title)
        console.print("wrote " + ", ".join(str(p) for p in written))
    D.cleanup()


def _evaluate_multirun(
    task: str,
    run_dir: Path,
    data: Path,
    split: str,
    votes: int,
    num_points: int | None,
    batch_size: int,
    device: str,
    out: Path | None,
) -> None:
    """Every model of a multi-seed / few-shot run: a progress bar per model, then the table of
    mean ± std, min and max."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from cd2p.cli._common import multirun_table
    from cd2p.engine import distributed as D
    from cd2p.engine.finetune import fingerprint_data
    from cd2p.engine.multirun import evaluate_multirun
    from cd2p.provenance import provenance
    from cd2p.tasks import get_task

    spec = get_task(task)
    started = time.perf_counter()
    D.init_distributed(device)  # scene tasks split their scenes over torchrun's processes
    with Progress(TextColumn("[bold]evaluate {task.description}"), BarColumn(),
                  MofNCompleteColumn(), TextColumn(spec.item_name), console=console,
                  disable=not is_main_process()) as bar:

        def on_member(name: str, count: int):
            job = bar.add_task(name, total=count)
            return lambda n: bar.advance(job, n)

        summary = evaluate_multirun(task, run_dir, data, split, votes, num_points=num_points,
                                    batch_size=batch_size, device=resolve_device(device),
                                    on_member=on_member)  # fmt: skip
    if not is_main_process():
        D.cleanup()
        return
    title = f"{run_dir} on {data} ({split}" + (f", {votes} votes)" if votes > 1 else ")")
    console.print(multirun_table(summary, title))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        summary["provenance"] = provenance(
            data=fingerprint_data(spec, data.resolve()), wall_time_s=time.perf_counter() - started,
            device=resolve_device(device))  # fmt: skip
        atomic_write_json(out / "metrics.json", summary)
        console.print(f"wrote {out / 'metrics.json'}")
    D.cleanup()
