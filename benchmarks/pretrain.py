"""Pre-training speed: samples/s, peak memory and where a step's time goes.

    .venv/bin/python benchmarks/pretrain.py            # tiny model on CPU (+ paper model on CUDA)
    .venv/bin/python benchmarks/pretrain.py --paper    # also the paper's model on CPU (slow)

For every configuration it measures

* the time split of one training step, stage by stage with the device synchronised between
  stages: grouping (FPS + kNN), backbone (patch embedding + blocks), concept extraction +
  alignment head + loss, backward, optimiser step;
* data loading: batches per second of the real ``PairDataset`` + DataLoader on prepared
  synthetic pairs (stored targets), and the JPEG decoding + CLIP preprocessing that
  on-the-fly targets add;
* end-to-end training samples/s through the real ``Trainer`` with stored targets and with the
  teacher on the fly (CLIP ViT-B/32 + ClipCap architecture, random weights: same cost);
* peak memory (allocated GPU memory on CUDA, resident set on CPU).

The paper's configuration is batch 128 of 4096 points, 64 x 32 patches, 384-d x 12 blocks.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from cd2p.config import Recipe, apply_overrides
from cd2p.engine.pretrain import build_pretrain_model, run_pretrain
from cd2p.engine.trainer import peak_memory_mb

console = Console(width=150)


@dataclass
class Config:
    name: str
    device: str
    batch: int
    points: int
    overrides: tuple[str, ...]


PAPER = ("model.dim=384", "model.depth=12", "model.num_heads=6", "model.num_groups=64",
         "model.group_size=32", "pretrain.num_concepts=32")  # fmt: skip
TINY = ("model.dim=96", "model.depth=4", "model.num_heads=4", "model.num_groups=32",
        "model.group_size=16", "pretrain.num_concepts=32")  # fmt: skip


def recipe_for(cfg: Config, *extra: str) -> Recipe:
    return apply_overrides(
        Recipe(),
        [
            *cfg.overrides,
            f"data.num_points={cfg.points}",
            f"data.batch_size={cfg.batch}",
            f"run.device={cfg.device}",
            *extra,
        ],
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_split(cfg: Config, steps: int) -> dict[str, float]:
    """Seconds per step of each stage (median over ``steps`` after a warm-up step)."""
    device = torch.device(cfg.device)
    model = build_pretrain_model(recipe_for(cfg)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    points = torch.randn(cfg.batch, cfg.points, 3, device=device)
    target = torch.randn(cfg.batch, 10, 768, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    stages: dict[str, list[float]] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps + 1):
        marks = [("start", time.perf_counter())]

        def mark(name: str, marks: list = marks) -> None:
            sync(device)
            marks.append((name, time.perf_counter()))

        with amp:
            groups = model.backbone.group(points)
            mark("grouping (FPS + kNN)")
            tokens, pos = model.backbone.embed(groups.neighborhoods, groups.centers)
            final, hidden = model.backbone.encode(tokens, pos, output_hidden_states=True)
            mark("backbone (patches + blocks)")
            predicted = model.align(model.concepts((*hidden[:-1], final)))
            loss = F.mse_loss(predicted.float(), target)
            mark("concepts + alignment + loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        opt.step()
        mark("optimiser step")
        if step == 0:
            continue  # warm-up (allocations, kernel selection)
        for (_, t0), (name, t1) in zip(marks[:-1], marks[1:], strict=True):
            stages.setdefault(name, []).append(t1 - t0)
    split = {name: sorted(v)[len(v) // 2] for name, v in stages.items()}
    split["peak memory MB"] = peak_memory_mb(device)
    return split


def make_pairs(root: Path, points: int, min_pairs: int) -> Path:
    """Prepared synthetic pairs (at least ~``min_pairs``) with random stored prefix targets."""
    from datasets import load_from_disk

    from cd2p.data.pairs import scene_dirs, target_file
    from cd2p.data.scannet_pairs import prepare_scannet
    from cd2p.data.synthetic import generate_synthetic_scannet
    from cd2p.data.teacher_targets import write_targets

    scenes = max(2, -(-min_pairs // 14))  # ~14 usable frames of 16 per scene
    generate_synthetic_scannet(root / "scannet", num_scenes=scenes, frames_per_scene=16, seed=0)
    prepare_scannet(
        root / "scannet", root / "pairs", frame_skip=1, num_points=points, split="all",
        progress=False,
    )  # fmt: skip
    for scene in scene_dirs(root / "pairs"):
        rows = len(load_from_disk(str(scene)))
        meta = {"teacher": "benchmark: random numbers", "random_teacher": "true"}
        write_targets(target_file(scene, "prefix"), torch.randn(rows, 10, 768), meta)
    return root / "pairs"


def loader_rates(pairs: Path, batch: int, workers: int) -> dict[str, float]:
    """Samples/s of the data pipeline alone: stored targets, and JPEG decode for on-the-fly."""
    from torch.utils.data import DataLoader

    from cd2p.data.pairs import PairDataset
    from cd2p.engine.pretrain import PairCollate

    out = {}
    for label, dataset, collate in (
        ("stored targets", PairDataset(pairs, target="prefix"), PairCollate()),
        ("JPEG decode + CLIP preprocess", PairDataset(pairs, with_image=True), PairCollate(True)),
    ):
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                            collate_fn=collate, drop_last=True)  # fmt: skip
        start, seen = time.perf_counter(), 0
        for _ in range(2):
            for b in loader:
                seen += b["points"].shape[0]
        out[label] = seen / (time.perf_counter() - start)
    return out


def end_to_end(cfg: Config, pairs: Path, steps: int, on_the_fly: bool) -> dict[str, float]:
    """Samples/s and peak memory of real ``run_pretrain`` steps (last logged window)."""
    from cd2p.engine.metrics_log import read_metrics

    extra = [
        f"schedule.max_steps={steps}",
        f"run.log_every={max(1, steps // 2)}",
        "run.checkpoint_every=100000",
        "data.num_workers=0",
        "schedule.warmup_epochs=0",
    ]
    if on_the_fly:
        extra += ["pretrain.targets=on-the-fly", "pretrain.random_teacher=true"]
    with tempfile.TemporaryDirectory() as tmp:
        run_pretrain(recipe_for(cfg, *extra), [pairs], Path(tmp) / "run", progress=False)
        last = read_metrics(Path(tmp) / "run", "train")[-1]
    return {"samples/s": last["samples_per_s"], "peak memory MB": last["peak_memory_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--paper", action="store_true", help="also the paper's model on CPU")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    args = parser.parse_args()

    configs = [Config("tiny (96-d x 4), CPU", "cpu", 8, 1024, TINY)]
    if args.paper:
        configs.append(Config("paper (384-d x 12), CPU", "cpu", 8, 4096, PAPER))
    if torch.cuda.is_available():
        configs.append(Config("paper (384-d x 12), CUDA bf16", "cuda", 128, 4096, PAPER))

    split_table = Table(title="time split of one step (ms, median)")
    split_table.add_column("configuration")
    rows = []
    for cfg in configs:
        console.print(f"timing {cfg.name}: batch {cfg.batch} x {cfg.points} points")
        rows.append((cfg, time_split(cfg, args.steps)))
    stage_names = [k for k in rows[0][1] if k != "peak memory MB"]
    for name in stage_names:
        split_table.add_column(name, justify="right")
    split_table.add_column("step samples/s", justify="right")
    split_table.add_column("peak MB", justify="right")
    for cfg, split in rows:
        step = sum(split[k] for k in stage_names)
        split_table.add_row(
            f"{cfg.name}, batch {cfg.batch}",
            *[f"{1000 * split[k]:.1f}" for k in stage_names],
            f"{cfg.batch / step:.1f}",
            f"{split['peak memory MB']:.0f}",
        )
    console.print(split_table)

    e2e = Table(title="end to end through the Trainer (samples/s, data included)")
    for col in ("configuration", "targets", "samples/s", "peak MB"):
        e2e.add_column(col, justify="right" if col in ("samples/s", "peak MB") else "left")
    data_table = Table(title=f"data pipeline alone ({args.workers} workers)")
    for col in ("pipeline", "samples/s"):
        data_table.add_column(col)
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs:
            console.print(f"preparing synthetic pairs of {cfg.points} points")
            pairs = make_pairs(Path(tmp) / cfg.name.split()[0], cfg.points, 2 * cfg.batch)
            if cfg is configs[0]:
                for label, rate in loader_rates(pairs, cfg.batch, args.workers).items():
                    data_table.add_row(f"{label}, {cfg.points} pts", f"{rate:.0f}")
            for fly in (False, True):
                if fly and cfg.device == "cpu" and cfg is not configs[0]:
                    continue  # the teacher on CPU only for the tiny configuration
                steps = min(args.steps, 3) if fly and cfg.device == "cpu" else args.steps
                res = end_to_end(cfg, pairs, steps, fly)
                e2e.add_row(
                    f"{cfg.name}, batch {cfg.batch}",
                    "teacher on the fly" if fly else "stored",
                    f"{res['samples/s']:.1f}",
                    f"{res['peak memory MB']:.0f}",
                )
    console.print(data_table)
    console.print(e2e)


if __name__ == "__main__":
    main()
