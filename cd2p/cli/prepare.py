"""``cd2p prepare ...``: raw datasets -> what training reads. Subcommands add themselves here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from cd2p._text import styled
from cd2p.cli._common import (
    EXISTING_DIR,
    EXISTING_FILE,
    OUTPUT_DIR,
    Cd2pError,
    console,
    parse_shard,
    user_errors,
)
from cd2p.cli.prepare_teacher import teacher


@click.group()
def prepare() -> None:
    """Turn raw datasets into the prepared form training reads (resumable, shardable)."""


@prepare.command("scannet")
@click.argument("root", type=EXISTING_DIR)
@click.argument("out", type=OUTPUT_DIR)
@click.option("--frame-skip", default=25, show_default=True, type=click.IntRange(min=1),
              help="Keep frames 0, K, 2K, ... of every scene.")
@click.option("--points", "num_points", default=4096, show_default=True,
              type=click.IntRange(min=1), help="Points per pair (voxel grid, then sampling).")
@click.option("--split", type=click.Choice(["train", "val", "all"]), default="train",
              show_default=True,
              help="Scenes of scannetv2_<split>.txt (found at ROOT, ROOT/meta or ROOT/..); "
                   "'all' = every scans/<scene>/ with a .sens.")
@click.option("--scenes", "scenes_file", type=EXISTING_FILE, default=None,
              help="Text file of scene ids, one per line (overrides --split).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes over scenes (use the number of cores).")
@click.option("--shard", default=None, metavar="I/N",
              help="Prepare only part I of N of the sorted scene list (one part per machine; "
                   "the parts' OUT directories load together).")
@click.option("--min-valid-points", default=1024, show_default=True,
              type=click.IntRange(min=1),
              help="Skip frames with fewer valid depth pixels than this.")
@click.option("--max-depth", default=6.0, show_default=True, type=click.FloatRange(min=0,
              min_open=True), help="Drop depth beyond this many metres (sensor noise).")
@click.option("--voxel-size", default=0.02, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Voxel edge in metres for evening out the point density before sampling.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Base seed of the per-frame point sampling.")
@user_errors
def scannet(root: Path, out: Path, frame_skip: int, num_points: int, split: str,
            scenes_file: Path | None, workers: int, shard: str | None, min_valid_points: int,
            max_depth: float, voxel_size: float, seed: int) -> None:
    """ScanNet v2 .sens RGB-D videos in ROOT -> RGB/point-cloud pairs in OUT.

    Every --frame-skip-th frame becomes one pair: the colour JPEG as stored in the .sens, and
    the depth back-projected to a gravity-aligned, centred cloud of --points points. Frames
    with a lost-tracking pose or too little depth are skipped and counted; damaged frames (a
    NaN or absurd pose, a colour payload that is not a whole JPEG, points that come out
    non-finite) are skipped, counted and listed with their .sens file and frame index.

    \b
    OUT/scenes/<scene_id>/   one Hugging Face dataset per scene (datasets.load_from_disk)
    OUT/prepare_report.json  scenes, frames read, pairs, skips by reason, damaged frames,
                             errors, speed

    Re-running the same command resumes: finished scenes are kept, half-written ones redone.
    Scenes with missing or corrupt files are skipped, listed in the report, and make the
    command exit with status 1 at the end.
    """
    from cd2p.data.scannet_pairs import prepare_scannet
    from cd2p.data.scene_jobs import report_name

    shard_index = parse_shard(shard)
    report = prepare_scannet(
        root, out, frame_skip=frame_skip, num_points=num_points, split=split,
        scenes_file=scenes_file, workers=workers, shard=shard_index,
        min_valid_points=min_valid_points, max_depth=max_depth, voxel_size=voxel_size,
        seed=seed, progress=True,
    )
    console.print(summary_table(report))
    print_damaged_frames(report["damaged_frames"])
    console.print(f"report: {out / report_name(shard_index)}")
    if report["errors"]:
        for error in report["errors"]:
            console.print(styled("[red]failed[/] {scene}: {error}", scene=error["scene"],
                                 error=error["error"]), soft_wrap=True)
        raise Cd2pError(
            f"{len(report['errors'])} scene(s) failed (listed above and in the report); "
            "the other scenes are complete, fix the files and re-run to add them"
        )


def print_damaged_frames(frames: list[dict[str, Any]], limit: int = 20) -> None:
    """One line per damaged frame (the first ``limit``; the report lists them all)."""
    for frame in frames[:limit]:
        console.print(styled("[yellow]skipped[/] {file} frame {frame}: {reason}: {detail}",
                             file=frame["file"], frame=frame["frame"],
                             reason=frame["reason"].replace("_", " "), detail=frame["detail"]),
                      soft_wrap=True)
    if len(frames) > limit:
        console.print(styled("[yellow]skipped[/] ... and {n} more damaged frames (listed under "
                             "damaged_frames in the report)", n=len(frames) - limit))


def summary_table(report: dict[str, Any]) -> Table:
    """The end-of-run summary of a ``prepare scannet`` report."""
    scenes = report["scenes"]
    table = Table(title="cd2p prepare scannet", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("scenes", str(scenes["total"]))
    table.add_row("  prepared now", str(scenes["prepared"]))
    table.add_row("  already done (resumed)", str(scenes["resumed"]))
    failed = scenes["failed"]
    table.add_row("  failed", styled("[red]{n}[/]", n=failed) if failed else "0")
    table.add_row("frames in files", str(report["frames_in_files"]))
    table.add_row("frames considered (skip)", str(report["frames_considered"]))
    table.add_row("frames read", str(report["frames_read"]))
    for reason, count in report["frames_skipped"].items():
        table.add_row(f"  skipped: {reason.replace('_', ' ')}", str(count))
    table.add_row("pairs written (total)", str(report["pairs_written"]))
    table.add_row("seconds", f"{report['seconds']:.1f}")
    rate = report["pairs_per_second"]
    table.add_row("pairs/s (this run)", "-" if rate is None else f"{rate:.1f}")
    mbps = report["sens_mb_per_second"]
    table.add_row(".sens MB/s (this run)", "-" if mbps is None else f"{mbps:.1f}")
    return table


@prepare.command("scannet-scenes")
@click.argument("root", type=EXISTING_DIR)
@click.argument("out", type=OUTPUT_DIR)
@click.option("--labels", type=EXISTING_FILE, default=None,
              help="ScanNet's label table (raw category -> nyu40 id)  "
                   "[default: ROOT/scannetv2-labels.combined.tsv]")
@click.option("--split", type=click.Choice(["train", "val", "all"]), default="all",
              show_default=True,
              help="Scenes of scannetv2_<split>.txt (found at ROOT, ROOT/meta or ROOT/..); "
                   "'all' = every scans/<scene>/ with a <scene>_vh_clean_2.ply.")
@click.option("--scenes", "scenes_file", type=EXISTING_FILE, default=None,
              help="Text file of scene ids, one per line (overrides --split).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes over scenes (use the number of cores).")
@click.option("--shard", default=None, metavar="I/N",
              help="Prepare only part I of N of the sorted scene list (one part per machine; "
                   "parts may share OUT, each writes prepare_report.shard-I-of-N.json).")
@user_errors
def scannet_scenes(root: Path, out: Path, labels: Path | None, split: str,
                   scenes_file: Path | None, workers: int, shard: str | None) -> None:
    """ScanNet v2 scene meshes in ROOT -> scenes for segmentation and detection in OUT.

    Per scene: the vertices of <scene>_vh_clean_2.ply moved by the scene's axisAlignment,
    their colours, ScanNet's 20-class semantic labels (-1 = ignore) and instance ids from the
    segments and the aggregation, and one axis-aligned box per instance of the 18 detection
    classes (as VoteNet). Each scene's split (train / val) comes from ScanNet's split lists.

    \b
    OUT/scenes/<scene_id>/scene.safetensors  coord, color, semantic, instance, box_*
    OUT/scenes/<scene_id>/cd2p_scene.json    per-scene statistics
    OUT/prepare_report.json                  scenes, vertices, boxes per class, errors

    Re-running the same command resumes: finished scenes are kept, half-written ones redone
    (a different label table is refused). Scenes with missing or inconsistent files are
    skipped, listed in the report, and make the command exit with status 1 at the end.
    """
    from cd2p.data.scannet_scenes import DEFAULT_LABEL_TABLE, prepare_scannet_scenes
    from cd2p.data.scene_jobs import report_name

    if labels is None:
        labels = root / DEFAULT_LABEL_TABLE
        if not labels.is_file():
            raise click.UsageError(
                f"{labels} not found: pass --labels with ScanNet's {DEFAULT_LABEL_TABLE}"
            )
    shard_index = parse_shard(shard)
    report = prepare_scannet_scenes(
        root, out, labels=labels, split=split, scenes_file=scenes_file, workers=workers,
        shard=shard_index, progress=True,
    )
    console.print(scenes_summary_table(report))
    console.print(f"report: {out / report_name(shard_index)}")
    if report["errors"]:
        for error in report["errors"]:
            console.print(styled("[red]failed[/] {scene}: {error}", scene=error["scene"],
                                 error=error["error"]), soft_wrap=True)
        raise Cd2pError(
            f"{len(report['errors'])} scene(s) failed (listed above and in the report); "
            "the other scenes are complete, fix the files and re-run to add them"
        )


def scenes_summary_table(report: dict[str, Any], top_classes: int = 5) -> Table:
    """The end-of-run summary of a ``prepare scannet-scenes`` report."""
    scenes = report["scenes"]
    table = Table(title="cd2p prepare scannet-scenes", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("scenes", str(scenes["total"]))
    table.add_row("  prepared now", str(scenes["prepared"]))
    table.add_row("  already done (resumed)", str(scenes["resumed"]))
    failed = scenes["failed"]
    table.add_row("  failed", styled("[red]{n}[/]", n=failed) if failed else "0")
    splits = ", ".join(f"{name} {count}" for name, count in report["scene_splits"].items())
    table.add_row("  by split", splits or "-")
    unaligned = len(report["scenes_without_axis_alignment"])
    table.add_row("  without axisAlignment",
                  styled("[yellow]{n}[/]", n=unaligned) if unaligned else "0")
    table.add_row("vertices", f"{report['vertices']:,}")
    fraction = report["labelled_fraction"]
    table.add_row("  labelled (20 classes)", "-" if fraction is None else f"{fraction:.1%}")
    table.add_row("instances", str(report["instances"]))
    table.add_row("boxes (18 classes)", str(report["boxes"]))
    ranked = sorted(((n, c) for c, n in report["boxes_per_class"].items() if n),
                    key=lambda item: -item[0])
    for count, name in ranked[:top_classes]:
        table.add_row(f"  {name}", str(count))
    if len(ranked) > top_classes:
        rest = sum(count for count, _ in ranked[top_classes:])
        table.add_row(f"  {len(ranked) - top_classes} other classes", str(rest))
    if report["warnings"]:
        table.add_row("warnings", styled("[yellow]{n}[/] (see the report)",
                                         n=len(report["warnings"])))
    table.add_row("seconds", f"{report['seconds']:.1f}")
    return table


prepare.add_command(teacher)

from cd2p.cli import prepare_benchmarks as _benchmarks  # noqa: E402

prepare.add_command(_benchmarks.modelnet40)
prepare.add_command(_benchmarks.scanobjectnn)
prepare.add_command(_benchmarks.shapenetpart)
