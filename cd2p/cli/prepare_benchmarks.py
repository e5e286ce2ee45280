"""``cd2p prepare modelnet40|scanobjectnn|shapenetpart ROOT OUT``: one-time caches of the
object benchmarks, so that training epochs never re-parse text or h5 files."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cd2p._text import styled
from cd2p.cli._common import EXISTING_DIR, OUTPUT_DIR, console, user_errors

_DEVICE_HELP = "Device for farthest point sampling (cuda is much faster on the full datasets)."


def _summary(out: Path, limit: int = 20) -> None:
    """What was prepared, and every shape left out (the first ``limit``; meta.json has all)."""
    meta = json.loads((out / "meta.json").read_text())
    splits = ", ".join(f"{name} {info['count']}" for name, info in meta["splits"].items())
    names = meta.get("class_names") or meta.get("category_names")
    skipped = meta.get("skipped", [])
    for shape in skipped[:limit]:
        console.print(styled("[yellow]skipped[/] {file} ({split} {id}): {reason}",
                             file=shape["file"], split=shape["split"], id=shape["id"],
                             reason=shape["reason"]), soft_wrap=True)
    if len(skipped) > limit:
        console.print(styled("[yellow]skipped[/] ... and {n} more", n=len(skipped) - limit))
    left_out = ", [yellow]{skipped} skipped[/] (listed in meta.json)" if skipped else ""
    console.print(styled("[green]prepared[/] {out}: {splits} shapes, {classes} classes" + left_out,
                         out=out, splits=splits, classes=len(names), skipped=len(skipped)))


@click.command("modelnet40")
@click.argument("root", type=EXISTING_DIR)
@click.argument("out", type=OUTPUT_DIR)
@click.option(
    "--points",
    "num_points",
    default=2048,
    show_default=True,
    type=click.IntRange(min=1),
    help="FPS points kept per shape, in FPS order (2048 serves views of up to 1706 points).",
)
@click.option("--device", default="cpu", show_default=True, help=_DEVICE_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@user_errors
def modelnet40(root: Path, out: Path, num_points: int, device: str, overwrite: bool) -> None:
    """modelnet40_normal_resampled in ROOT -> classification cache in OUT (safetensors).

    A shape file holding nan or inf is skipped and listed (printed, and in OUT/meta.json).
    """
    from cd2p.data.modelnet40 import prepare_modelnet40

    _summary(prepare_modelnet40(root, out, num_points, device, overwrite))


@click.command("scanobjectnn")
@click.argument("root", type=EXISTING_DIR)
@click.argument("out", type=OUTPUT_DIR)
@click.option(
    "--variant",
    "variants",
    multiple=True,
    type=click.Choice(["objbg", "objonly", "hardest"]),
    help="Variants to prepare (repeatable) [default: all whose files are in ROOT].",
)
@click.option("--device", default="cpu", show_default=True, help=_DEVICE_HELP)
@click.option("--overwrite", is_flag=True, help="Replace existing OUT/<variant> caches.")
@user_errors
def scanobjectnn(
    root: Path, out: Path, variants: tuple[str, ...], device: str, overwrite: bool
) -> None:
    """ScanObjectNN h5_files in ROOT -> OUT/objbg, OUT/objonly, OUT/hardest caches.

    hardest is PB-T50-RS (main_split/*_augmentedrot_scale75.h5). A cloud holding NaN or inf
    is skipped and listed (printed, and in OUT/<variant>/meta.json).
    """
    from cd2p.data.scanobjectnn import prepare_scanobjectnn

    for path in prepare_scanobjectnn(root, out, variants or None, device, overwrite):
        _summary(path)


@click.command("shapenetpart")
@click.argument("root", type=EXISTING_DIR)
@click.argument("out", type=OUTPUT_DIR)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@user_errors
def shapenetpart(root: Path, out: Path, overwrite: bool) -> None:
    """shapenetcore_partanno_segmentation_benchmark_v0_normal in ROOT -> part cache in OUT.

    A shape file holding nan or inf is skipped and listed (printed, and in OUT/meta.json).
    """
    from cd2p.data.shapenetpart import prepare_shapenetpart

    _summary(prepare_shapenetpart(root, out, overwrite))
