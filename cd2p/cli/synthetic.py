"""``cd2p synthetic ...``: small synthetic datasets written in the real raw formats."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cd2p.cli._common import OUTPUT_DIR, console, user_errors


def parse_size(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, int]:
    """``"160x120"`` -> ``(160, 120)``."""
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT such as 160x120, got {value!r}") from None
    if width < 1 or height < 1:
        raise click.BadParameter(f"sizes must be positive, got {value!r}")
    return width, height


def progress_bar() -> Progress:
    """The progress bar the generators report to."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console,
    )  # fmt: skip


@click.group()
def synthetic() -> None:
    """Write small synthetic datasets in the real raw formats (offline demos and tests)."""


@synthetic.command("scannet")
@click.argument("out", type=OUTPUT_DIR)
@click.option("--scenes", default=3, show_default=True, type=click.IntRange(min=1),
              help="Number of rooms (scene0000_00, ...).")  # fmt: skip
@click.option("--frames", default=60, show_default=True, type=click.IntRange(min=1),
              help="RGB-D frames per scene.")  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=int,
              help="Same seed, identical bytes.")  # fmt: skip
@click.option("--color-size", default="160x120", show_default=True, callback=parse_size,
              help="Colour resolution WxH.")  # fmt: skip
@click.option("--depth-size", default="80x60", show_default=True, callback=parse_size,
              help="Depth resolution WxH (same aspect ratio as colour).")  # fmt: skip
@user_errors
def scannet(
    out: Path,
    scenes: int,
    frames: int,
    seed: int,
    color_size: tuple[int, int],
    depth_size: tuple[int, int],
) -> None:
    """Write a synthetic ScanNet v2 to OUT: rooms rendered to .sens RGB-D videos, meshes,
    labels, splits and the label table, in ScanNet's own layout."""
    from cd2p.data.synthetic import generate_synthetic_scannet  # keeps `cd2p --help` fast

    with progress_bar() as progress:
        task = progress.add_task("rendering scenes", total=scenes)
        summary = generate_synthetic_scannet(
            out, scenes, frames, seed, color_size=color_size, depth_size=depth_size,
            on_scene=lambda _scene: progress.advance(task),
        )  # fmt: skip

    table = Table(title=f"synthetic ScanNet in {summary.root}")
    for column in ("scene", "split", "frames", "-inf poses", "empty depth"):
        table.add_column(column, justify="left" if column in ("scene", "split") else "right")
    split_of = {s: name for name, ids in summary.splits.items() for s in ids}
    for scene in summary.scenes:
        table.add_row(
            scene, split_of[scene], str(summary.frames_per_scene),
            str(len(summary.invalid_pose_frames[scene])),
            str(len(summary.empty_depth_frames[scene])),
        )  # fmt: skip
    console.print(table)
    console.print(
        f"wrote scans/<scene>/ (.sens {color_size[0]}x{color_size[1]} JPEG colour, "
        f"{depth_size[0]}x{depth_size[1]} zlib depth; _vh_clean_2.ply, .labels.ply, segs.json, "
        ".aggregation.json, .txt), scannetv2_train.txt, scannetv2_val.txt, "
        "scannetv2-labels.combined.tsv"
    )
    instances = ", ".join(f"{n} {label}" for label, n in sorted(summary.instances.items()))
    console.print(f"objects: {instances}")


from cd2p.cli import synthetic_shapes as _shapes  # noqa: E402

synthetic.add_command(_shapes.modelnet40)
synthetic.add_command(_shapes.shapenetpart)
