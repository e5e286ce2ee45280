"""Benchmark: `cd2p prepare scannet` vs reading and decoding every frame (the official way).

One synthetic scene with many frames is prepared by our pipeline (seek to every
``--frame-skip``-th frame, decode only its depth, never its colour) and, in the same run, by a
baseline written here that follows ScanNet's own reader: read every frame of the file in
order and decode every colour JPEG and depth image, then make pairs from every
``--frame-skip``-th frame with the same geometry code. Both produce the same pairs; the table
shows pairs/s, .sens MB/s (file size / time) and the ratio, then our pipeline's time split.

Rendering full-size frames by ray casting takes seconds each, so a scene of ``--frames``
frames is made by cycling ``--distinct`` rendered frames (a number coprime with the frame
skip, so the kept frames visit all of them); payload sizes, decode and geometry costs are
those of real rendered frames. Generated scenes are cached in ``--workdir``.

    python benchmarks/prepare.py                      # 320x240 / 160x120 and ScanNet size
    python benchmarks/prepare.py --sizes small --frames 2000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import datasets  # noqa: F401  (imported once per process; not a per-pair cost)
import numpy as np
from rich.console import Console
from rich.table import Table

from cd2p.data import scannet_files as sf
from cd2p.data.scannet_pairs import (
    PrepareSettings,
    axis_alignment,
    backproject_depth,
    frame_rng,
    pose_is_valid,
    prepare_scannet,
    reduce_points,
    transform_points,
)
from cd2p.data.sens import SensFrame, SensReader, write_sens
from cd2p.data.synthetic import generate_synthetic_scannet

# (colour WxH, depth WxH, distinct rendered frames). ScanNet records colour at 1296x968 and
# depth at 640x480; the generator needs one aspect ratio, so the colour here is 1296x972.
SIZES = {
    "small": ((320, 240), (160, 120), 41),
    "real": ((1296, 972), (640, 480), 11),
}
SCENE = "scene0000_00"
console = Console()
if not console.is_terminal:
    console = Console(width=120)


def make_root(workdir: Path, name: str, frames: int, distinct: int | None) -> Path:
    """A ScanNet root with one scene of ``frames`` frames cycling rendered ones (cached)."""
    color, depth, default_distinct = SIZES[name]
    distinct = distinct or default_distinct
    root = workdir / f"{name}-{color[0]}x{color[1]}-{depth[0]}x{depth[1]}-{distinct}-{frames}"
    sens_path = root / "scans" / SCENE / f"{SCENE}.sens"
    if sens_path.is_file():
        return root
    rendered = workdir / f"rendered-{name}-{distinct}"
    if not (rendered / "scans" / SCENE / f"{SCENE}.sens").is_file():
        console.print(f"rendering {distinct} frames at {color[0]}x{color[1]} / "
                      f"{depth[0]}x{depth[1]} (cached in {workdir}) ...")
        shutil.rmtree(rendered, ignore_errors=True)
        generate_synthetic_scannet(rendered, 1, distinct, seed=0, color_size=color,
                                   depth_size=depth)
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(rendered, root)
    with SensReader(rendered / "scans" / SCENE / f"{SCENE}.sens") as reader:
        header = reader.header
        source = [reader.frame(i) for i in range(len(reader))]

    def cycled():
        for i in range(frames):
            f = source[i % len(source)]
            yield SensFrame(i, f.camera_to_world, 33_333 * i, 33_333 * i, f.color_bytes,
                            f.depth_bytes)

    write_sens(sens_path, header, cycled())
    meta_path = sens_path.with_suffix(".txt")
    meta = sf.read_scene_meta(meta_path)
    meta["numColorFrames"] = meta["numDepthFrames"] = str(frames)
    sf.write_scene_meta(meta_path, meta)
    return root


def run_ours(root: Path, out: Path, settings: PrepareSettings) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    tic, cpu = time.perf_counter(), time.process_time()
    report = prepare_scannet(root, out, split="all", frame_skip=settings.frame_skip,
                             num_points=settings.num_points, voxel_size=settings.voxel_size,
                             max_depth=settings.max_depth,
                             min_valid_points=settings.min_valid_points, progress=False)
    report["wall"] = time.perf_counter() - tic
    report["cpu"] = time.process_time() - cpu
    return report


def run_baseline(root: Path, settings: PrepareSettings) -> dict:
    """ScanNet's reader's approach: every frame read in order, colour and depth decoded."""
    sens_path = root / "scans" / SCENE / f"{SCENE}.sens"
    meta_path = sens_path.with_suffix(".txt")
    align = axis_alignment(sf.read_scene_meta(meta_path), str(meta_path))
    split = dict.fromkeys(("read", "color_decode", "depth_decode", "pairs"), 0.0)
    pairs = []
    tic = time.perf_counter()
    start, cpu = tic, time.process_time()
    with SensReader(sens_path) as reader:
        shift, k_depth = reader.header.depth_shift, reader.header.intrinsic_depth
        for i in range(len(reader)):
            frame = reader.frame(i)
            toc = time.perf_counter()
            split["read"] += toc - tic
            tic = toc
            frame.decode_color()
            toc = time.perf_counter()
            split["color_decode"] += toc - tic
            tic = toc
            depth = frame.decode_depth(shift)
            toc = time.perf_counter()
            split["depth_decode"] += toc - tic
            tic = toc
            if i % settings.frame_skip or not pose_is_valid(frame.camera_to_world):
                continue
            valid = (depth > 0) & (depth <= settings.max_depth)
            if np.count_nonzero(valid) >= settings.min_valid_points:
                camera = backproject_depth(depth, k_depth)
                chosen = reduce_points(camera, settings.num_points, settings.voxel_size,
                                       frame_rng(settings.seed, SCENE, i), valid)
                world = transform_points(chosen, align @ frame.camera_to_world)
                pairs.append((frame.color_bytes, world - world.mean(axis=0)))
            tic = time.perf_counter()
            split["pairs"] += tic - toc
    return {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu,
            "pairs": len(pairs), "split": split}


def bench(name: str, args: argparse.Namespace) -> dict:
    settings = PrepareSettings(frame_skip=args.frame_skip, num_points=args.points)
    root = make_root(args.workdir, name, args.frames, args.distinct)
    size_mb = (root / "scans" / SCENE / f"{SCENE}.sens").stat().st_size / 1e6
    ours = [run_ours(root, args.workdir / f"out-{name}", settings) for _ in range(args.repeat)]
    base = [run_baseline(root, settings) for _ in range(args.repeat)]
    best_ours = min(ours, key=lambda r: r["wall"])
    best_base = min(base, key=lambda r: r["wall"])
    if best_ours["pairs_written"] != best_base["pairs"]:
        raise RuntimeError(f"pair counts differ: {best_ours['pairs_written']} vs "
                           f"{best_base['pairs']}")
    return {"name": name, "size_mb": size_mb, "ours": best_ours, "base": best_base,
            "color": SIZES[name][0], "depth": SIZES[name][1]}


def print_results(results: list[dict], args: argparse.Namespace) -> None:
    table = Table(title=f"prepare scannet: {args.frames} frames, --frame-skip {args.frame_skip}, "
                        f"--points {args.points}, 1 process")
    for column in ("colour / depth", ".sens MB", "method", "pairs", "wall s", "CPU s",
                   "pairs/s", "pairs/CPU-s", ".sens MB/s", "speed-up (CPU)"):
        table.add_column(column, justify="right")
    for r in results:
        ours, base = r["ours"], r["base"]
        runs = (("cd2p prepare", ours["pairs_written"], ours),
                ("decode every frame", base["pairs"], base))
        for label, pairs, run in runs:
            first = label == "cd2p prepare"
            size = f"{r['color'][0]}x{r['color'][1]} / {r['depth'][0]}x{r['depth'][1]}"
            speedup = f"{base['wall'] / run['wall']:.1f}x"
            speedup += f" ({base['cpu'] / run['cpu']:.1f}x)"
            table.add_row(size if first else "", f"{r['size_mb']:.0f}" if first else "", label,
                          str(pairs), f"{run['wall']:.2f}", f"{run['cpu']:.2f}",
                          f"{pairs / run['wall']:.1f}", f"{pairs / run['cpu']:.1f}",
                          f"{r['size_mb'] / run['wall']:.0f}", speedup)
    console.print(table)

    split = Table(title="time split, ms per pair (wall)")
    split.add_column("step")
    for r in results:
        split.add_column(f"{r['depth'][0]}x{r['depth'][1]}: cd2p", justify="right")
        split.add_column(f"{r['depth'][0]}x{r['depth'][1]}: baseline", justify="right")
    steps = {"read": "read (+ pose check)", "color_check": "JPEG check (1/8-scale decode)",
             "color_decode": "colour decode",
             "depth_decode": "depth decode", "backproject": "back-projection + transform",
             "sampling": "voxel grid + sampling", "pairs": "baseline: all pair geometry",
             "write": "write (datasets)", "other": "other (open, index, report)"}
    rows: dict[str, list[str]] = {s: [] for s in steps}
    for r in results:
        ours, base = r["ours"], r["base"]
        t = dict(ours["time_split_seconds"])
        t["other"] = ours["wall"] - sum(t.values())
        b = dict(base["split"])
        b["other"] = base["wall"] - sum(b.values())
        for step in steps:
            for values, n in ((t, ours["pairs_written"]), (b, base["pairs"])):
                value = values.get(step)
                rows[step].append("-" if value is None else f"{1e3 * value / max(n, 1):.2f}")
    for step, label in steps.items():
        split.add_row(label, *rows[step])
    console.print(split)
    for r in results:
        ours = r["ours"]
        console.print(
            f"{r['depth'][0]}x{r['depth'][1]} depth: {ours['pairs_written'] / ours['cpu']:.1f} "
            f"pairs per CPU-second (target >= 50 pairs/s per core), "
            f"{r['base']['cpu'] / ours['cpu']:.1f}x the baseline's CPU time, "
            f"{r['base']['wall'] / ours['wall']:.1f}x its wall time (target >= 25x)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1000, help="frames in the scene")
    parser.add_argument("--distinct", type=int, default=None,
                        help="rendered frames cycled to make the scene (default per size)")
    parser.add_argument("--sizes", default="small,real",
                        help=f"comma-separated among {', '.join(SIZES)}")
    parser.add_argument("--frame-skip", type=int, default=25)
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=1, help="runs per method (best kept)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cd2p-bench-prepare"))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose among {list(SIZES)}")
    console.print(f"{os.cpu_count()} CPUs visible; load average "
                  f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    results = [bench(name, args) for name in names]
    print_results(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
