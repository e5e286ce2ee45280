"""Scene-segmentation speed: training samples/s, peak memory, where a step's time goes, and the
whole-scene evaluation's seconds per scene.

    .venv/bin/python benchmarks/segmentation.py            # small model on CPU (+ paper on CUDA)
    .venv/bin/python benchmarks/segmentation.py --paper    # also the paper's model on CPU (slow)

For every configuration it measures, in one run:

* the time split of one training step, stage by stage with the device synchronised between
  stages: grouping (FPS 8192 -> 256 + kNN), backbone (patch embedding + blocks), 3-NN
  propagation + head + loss, backward, optimiser step (median after a warm-up step);
* end to end through the real ``Trainer`` on prepared synthetic rooms (the real dataset:
  per-epoch draws, augmentation, loading), steady state (the last logged window);
* the whole-scene evaluation (every vertex scored once) in seconds per scene and vertices per
  second, on the prepared rooms and on one ScanNet-sized synthetic scene (150 000 vertices);
* what that means for the paper's schedule: 200 epochs over ScanNet's 1201 training scenes.

The paper's configuration is 8192 points, 256 x 32 patches, 384-d x 12 blocks.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from cd2p.config import apply_overrides, load_recipe
from cd2p.engine.trainer import peak_memory_mb
from cd2p.models.segmentation import Cd2pForSemanticSegmentation
from cd2p.ops import three_nn_interpolate
from cd2p.tasks.segmentation import scene_scores

console = Console(width=150)
SCANNET_TRAIN_SCENES, PAPER_EPOCHS = 1201, 200


@dataclass
class Config:
    name: str
    device: str
    batch: int
    points: int
    overrides: tuple[str, ...]


PAPER = ("model.dim=384", "model.depth=12", "model.num_heads=6", "model.num_groups=256",
         "model.group_size=32", "segmentation.head_channels=[256,256]")  # fmt: skip
SMALL = ("model.dim=96", "model.depth=4", "model.num_heads=4", "model.num_groups=64",
         "model.group_size=16", "segmentation.head_channels=[128,128]")  # fmt: skip


def recipe_for(cfg: Config, *extra: str):
    return apply_overrides(
        load_recipe("finetune-synthetic-scenes"),
        [*cfg.overrides, f"data.num_points={cfg.points}", f"data.batch_size={cfg.batch}",
         f"run.device={cfg.device}", "segmentation.use_color=false", *extra],
    )  # fmt: skip


def build(cfg: Config) -> Cd2pForSemanticSegmentation:
    recipe = recipe_for(cfg)
    return Cd2pForSemanticSegmentation(
        backbone=recipe.model.backbone_kwargs(),
        head_channels=list(recipe.segmentation.head_channels),
        num_points=cfg.points,
    ).to(cfg.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_split(cfg: Config, steps: int) -> dict[str, float]:
    """Seconds per step of each stage (median over ``steps`` after a warm-up step)."""
    device = torch.device(cfg.device)
    model = build(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=0.01)
    points = torch.randn(cfg.batch, cfg.points, 3, device=device) * 2
    labels = torch.randint(0, 20, (cfg.batch, cfg.points), device=device)
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
            backbone = model.backbone
            groups = backbone.group(points)
            mark("grouping (FPS + kNN)")
            tokens, pos = backbone.embed(groups.neighborhoods, groups.centers)
            tokens, _ = backbone.encode(tokens, pos)
            mark("backbone (patches + blocks)")
            per_point = three_nn_interpolate(points, groups.centers, tokens)
            x = torch.cat([per_point, points.to(per_point.dtype)], -1).transpose(1, 2)
            logits = model.head(x).transpose(1, 2)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            mark("3-NN propagation + head + loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        opt.step()
        mark("optimiser step")
        if step == 0:
            continue
        for (_, t0), (name, t1) in zip(marks[:-1], marks[1:], strict=True):
            stages.setdefault(name, []).append(t1 - t0)
    split = {name: sorted(v)[len(v) // 2] for name, v in stages.items()}
    split["peak memory MB"] = peak_memory_mb(device)
    return split


def make_scenes(root: Path, scenes: int) -> Path:
    """Synthetic rooms prepared by ``prepare scannet-scenes`` (about 15 000 vertices each)."""
    from cd2p.data.scannet_scenes import prepare_scannet_scenes
    from cd2p.data.synthetic import generate_synthetic_scannet

    generate_synthetic_scannet(root / "raw", num_scenes=scenes, frames_per_scene=1, seed=0,
                               val_fraction=0.25)  # fmt: skip
    prepare_scannet_scenes(root / "raw", root / "scenes",
                           labels=root / "raw" / "scannetv2-labels.combined.tsv", progress=False)
    return root / "scenes"


def end_to_end(cfg: Config, scenes: Path, steps: int, workers: int) -> dict[str, float]:
    """Samples/s and peak memory of real training steps of the task (the trainer, the task's
    dataset and step, as ``run_finetune`` builds them; the last logged window)."""
    from cd2p.engine.metrics_log import read_metrics
    from cd2p.engine.trainer import Trainer
    from cd2p.tasks import get_task

    extra = [f"schedule.max_steps={steps}", f"run.log_every={max(1, steps // 2)}",
             "run.checkpoint_every=100000", f"data.num_workers={workers}",
             "schedule.warmup_epochs=0", "run.eval_every=100000"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_for(cfg, *extra)
        spec = get_task("segmentation")
        train = spec.load_split(scenes, "train")
        model = spec.build_model(recipe, train, None)
        trainer = Trainer(spec.training_step(model, recipe), spec.train_dataset(recipe, train),
                          recipe, Path(tmp) / "run", progress=False)  # fmt: skip
        trainer.fit()
        last = read_metrics(Path(tmp) / "run", "train")[-1]
    return {"samples/s": last["samples_per_s"], "peak memory MB": last["peak_memory_mb"],
            "data fraction": last["data_fraction"]}  # fmt: skip


def evaluation_speed(cfg: Config, scenes: Path, batch: int) -> list[tuple[str, float, float]]:
    """``(what, seconds per scene, vertices per second)``: the prepared val rooms, and one
    ScanNet-sized cloud of 150 000 vertices, every vertex scored once."""
    from cd2p.data.scannet_scenes import load_scene, load_scene_split

    model = build(cfg).eval()
    rows = []
    val = load_scene_split(scenes, "val")
    coords = [load_scene(val, s)["coord"] for s in val.scene_ids]
    big = torch.from_numpy(np.random.default_rng(0).uniform(0, 6, (150_000, 3)).astype(np.float32))
    for label, clouds in ((f"synthetic rooms ({len(coords[0])} vertices)", coords),
                          ("ScanNet-sized scene (150 000 vertices)", [big])):  # fmt: skip
        scene_scores(model, clouds[0][: cfg.points * 2], None, cfg.points, 1,
                     np.random.default_rng(0), batch)  # warm-up  # fmt: skip
        sync(torch.device(cfg.device))
        start = time.perf_counter()
        for i, coord in enumerate(clouds):
            scene_scores(model, coord, None, cfg.points, 1, np.random.default_rng(i), batch)
        sync(torch.device(cfg.device))
        seconds = (time.perf_counter() - start) / len(clouds)
        rows.append((label, seconds, sum(len(c) for c in clouds) / len(clouds) / seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--paper", action="store_true", help="also the paper's model on CPU")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    args = parser.parse_args()

    configs = [Config("small (96-d x 4, 2048 pts, 64 x 16), CPU", "cpu", 4, 2048, SMALL)]
    if args.paper:
        configs.append(Config("paper (384-d x 12, 8192 pts, 256 x 32), CPU", "cpu", 2, 8192,
                              PAPER))  # fmt: skip
    if torch.cuda.is_available():
        configs.append(Config("paper (384-d x 12, 8192 pts, 256 x 32), CUDA bf16", "cuda", 16,
                              8192, PAPER))  # fmt: skip

    split_table = Table(title="time split of one training step (ms, median)")
    split_table.add_column("configuration")
    rows = []
    for cfg in configs:
        console.print(f"timing {cfg.name}: batch {cfg.batch}")
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

    e2e = Table(title=f"end to end through the Trainer ({args.workers} loader workers)")
    for col in ("configuration", "samples/s", "data share", "peak MB",
                f"{PAPER_EPOCHS} epochs x {SCANNET_TRAIN_SCENES} scenes"):  # fmt: skip
        e2e.add_column(col, justify="left" if col == "configuration" else "right")
    evals = Table(title="whole-scene evaluation (every vertex scored once)")
    for col in ("configuration", "scene", "s / scene", "vertices / s"):
        evals.add_column(col, justify="right" if col.startswith(("s ", "v")) else "left")
    with tempfile.TemporaryDirectory() as tmp:
        scenes = make_scenes(Path(tmp), 8)
        for cfg in configs:
            res = end_to_end(cfg, scenes, args.steps * 2, args.workers)
            hours = PAPER_EPOCHS * SCANNET_TRAIN_SCENES / res["samples/s"] / 3600
            e2e.add_row(f"{cfg.name}, batch {cfg.batch}", f"{res['samples/s']:.1f}",
                        f"{100 * res['data fraction']:.0f} %", f"{res['peak memory MB']:.0f}",
                        f"{hours:.1f} h" if hours >= 1 else f"{60 * hours:.0f} min")  # fmt: skip
            for label, seconds, rate in evaluation_speed(cfg, scenes, 16 if cfg.device ==
                                                         "cuda" else 4):  # fmt: skip
                evals.add_row(cfg.name, label, f"{seconds:.2f}", f"{rate:,.0f}")
    console.print(e2e)
    console.print(evals)


if __name__ == "__main__":
    main()
