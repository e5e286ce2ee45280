"""``cd2p predict TASK --model M INPUT OUT``: run a fine-tuned model on a user's own file."""

from __future__ import annotations

import inspect
from pathlib import Path

import click

from cd2p.cli._common import EXISTING_FILE, console, key_value_table, resolve_device, user_errors


def _predict_tasks() -> list[str]:
    from cd2p.tasks import all_tasks

    return [spec.name for spec in all_tasks() if spec.predict is not None]


@click.command()
@click.argument("task", type=click.Choice(_predict_tasks()))
@click.argument("scan", type=EXISTING_FILE)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--model",
    "model_id",
    required=True,
    help="A fine-tuned model of the task (RUN/model of `cd2p finetune`) or a Hub id.",
)
@click.option(
    "--votes",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="segmentation: how many times every point is scored (scores summed); detection: how "
    "many random draws of points are detected and pooled (then NMS).",
)
@click.option(
    "--labels",
    type=EXISTING_FILE,
    default=None,
    help="segmentation: ground truth to show beside the prediction, a PLY with a per-vertex "
    "nyu40 'label' (ScanNet's _vh_clean_2.labels.ply) [default: the scan's own 'label'].",
)
@click.option(
    "--min-score",
    type=click.FloatRange(0, 1),
    default=None,
    help="detection: leave out boxes scored below this [default: 0.3].",
)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@user_errors
def predict(
    task: str,
    scan: Path,
    out: Path,
    model_id: str,
    votes: int,
    labels: Path | None,
    min_score: float | None,
    batch_size: int,
    device: str,
) -> None:
    """Predict on your own scan and write the result and a picture.

    \b
    segmentation: SCAN is a PLY (ScanNet's _vh_clean_2.ply or any PLY with vertices; ASCII
                  or binary), a PCD (ascii, binary, binary_compressed), .npy/.npz or
                  .txt/.xyz/.csv (x y z [r g b]), with z up, in metres.
                  OUT (.ply) gets every vertex coloured by its predicted class (ScanNet's
                  colours), a per-vertex 'label' property holding the predicted nyu40 id and
                  the scan's faces; OUT with .png is a top-down picture, beside the ground truth
                  when labels are known (then the scan's mIoU is printed too).

    \b
    detection:    SCAN as above. OUT (.json) lists every box (class, score, centre, size in
                  the scan's coordinates), best first; OUT with .png shows the scan from above
                  with the boxes.

    \b
    Examples:
      cd2p predict segmentation --model runs/scannet-seg/model \\
          scans/scene0011_00/scene0011_00_vh_clean_2.ply scene0011_00-pred.ply
      cd2p predict detection --model runs/scannet-det/model \\
          scans/scene0011_00/scene0011_00_vh_clean_2.ply scene0011_00-boxes.json
    """
    from cd2p.tasks import get_task

    spec = get_task(task)
    assert spec.predict is not None
    options = {"labels": labels, "min_score": min_score}
    given = {k: v for k, v in options.items() if v is not None}
    accepted = inspect.signature(spec.predict).parameters
    for key in given:
        if key not in accepted:
            raise click.UsageError(f"--{key.replace('_', '-')} does not apply to {task}")
    model = spec.model_class.from_pretrained(model_id).to(resolve_device(device))
    summary = spec.predict(model, scan, out, votes=votes, batch_size=batch_size, **given)
    table = key_value_table(f"cd2p predict {task}: {scan.name}")
    table.add_row("vertices", str(summary["vertices"]))
    if "boxes" in summary:
        table.add_row("boxes", str(summary["boxes"]))
    if "miou" in summary:
        table.add_row("mIoU (against the labels)", f"{100 * summary['miou']:.2f} %")
    unit = "boxes" if "boxes" in summary else "points"
    for name, count in list(summary.get("classes", {}).items())[:8]:
        table.add_row(f"  {name}", f"{count} {unit}")
    table.add_row("wrote", ", ".join(summary["files"]))
    console.print(table)
