"""Detection speed: training samples/s, peak memory and where a step's time goes, for 3DETR with
the cd2p encoder.

    .venv/bin/python benchmarks/detection.py            # small model on CPU (+ paper on CUDA)
    .venv/bin/python benchmarks/detection.py --paper    # also the paper's model on CPU (slow)

For every configuration it measures, in one run, the time split of one training step, stage
by stage with the device synchronised between stages (median after a warm-up step):

* grouping: FPS of the encoder centers (40 000 -> 2048 for the paper) and kNN;
* encoder: patch embedding and the 12 blocks over 2048 tokens;
* decoder: projection, FPS queries, Fourier positions, the 8 decoder layers and the box heads;
* matching: the Hungarian assignment of every decoder layer (scipy, on the CPU);
* loss: the set loss of every layer (fp32);
* backward and the optimiser step;

then the real ``Trainer`` end to end on prepared synthetic rooms (per-epoch draws, crops,
loading, collation included), and what the measured rate means for the paper's schedule:
720 epochs over ScanNet's 1201 training scenes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cd2p.config import apply_overrides, load_recipe
from cd2p.engine.trainer import peak_memory_mb
from cd2p.tasks import get_task

console = Console(width=160)
SCANNET_TRAIN_SCENES, PAPER_EPOCHS = 1201, 720


@dataclass
class Config:
    name: str
    device: str
    batch: int
    points: int
    overrides: tuple[str, ...]


PAPER = ("model.dim=384", "model.depth=12", "model.num_heads=6", "model.num_groups=2048",
         "model.group_size=32", "detection.num_queries=256", "detection.decoder_depth=8",
         "detection.decoder_dim=256", "detection.decoder_ffn_dim=256")  # fmt: skip
SMALL = ("model.dim=96", "model.depth=3", "model.num_heads=4", "model.num_groups=128",
         "model.group_size=16", "detection.num_queries=64", "detection.decoder_depth=3",
         "detection.decoder_dim=96", "detection.decoder_ffn_dim=96")  # fmt: skip


def recipe_for(cfg: Config, *extra: str):
    return apply_overrides(
        load_recipe("finetune-synthetic-det"),
        [*cfg.overrides, f"data.num_points={cfg.points}", f"data.batch_size={cfg.batch}",
         f"run.device={cfg.device}", *extra],
    )  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(cfg: Config, boxes: int = 12) -> dict[str, torch.Tensor]:
    """A batch shaped like ScanNet's: points in a 6 x 6 x 3 m room, ``boxes`` boxes each."""
    g = torch.Generator().manual_seed(0)
    points = torch.rand(cfg.batch, cfg.points, 3, generator=g) * torch.tensor([6.0, 6.0, 3.0])
    points = points - points.mean(1, keepdim=True)
    centers = torch.rand(cfg.batch, boxes, 3, generator=g) * 4 - 2
    return {
        "points": points,
        "point_cloud_dims_min": points.amin(1),
        "point_cloud_dims_max": points.amax(1),
        "gt_box_centers": centers,
        "gt_box_sizes": torch.rand(cfg.batch, boxes, 3, generator=g) + 0.3,
        "gt_box_sem_cls_label": torch.randint(0, 18, (cfg.batch, boxes), generator=g),
        "gt_box_present": torch.ones(cfg.batch, boxes),
    }


def time_split(cfg: Config, steps: int) -> dict[str, float]:
    """Seconds per step of each stage (median over ``steps`` after a warm-up step)."""
    from cd2p.models.detection.criterion import num_boxes_across_ranks
    from cd2p.ops import farthest_point_sample, index_points

    device = torch.device(cfg.device)
    spec = get_task("detection")
    recipe = recipe_for(cfg)
    data = type("Split", (), {"det_class_names": [str(i) for i in range(18)]})()
    model = spec.build_model(recipe, data, None).to(device).train()
    step = spec.training_step(model, recipe).to(device)
    criterion = step.criterion
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {k: v.to(device) for k, v in synthetic_batch(cfg).items()}
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    stages: dict[str, list[float]] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 1):
        marks = [("start", time.perf_counter())]

        def mark(name: str, marks: list = marks) -> None:
            sync(device)
            marks.append((name, time.perf_counter()))

        pts, lo, hi = batch["points"], batch["point_cloud_dims_min"], batch["point_cloud_dims_max"]
        with amp:
            groups = model.backbone.group(pts)
            mark("grouping (FPS + kNN)")
            tokens, pos = model.backbone.embed(groups.neighborhoods, groups.centers)
            tokens, _ = model.backbone.encode(tokens, pos)
            mark("encoder (patches + blocks)")
            # The decoder half of Cd2pForDetection.forward, on the encoder output above.
            memory = model.encoder_to_decoder(tokens.transpose(1, 2)).transpose(1, 2)
            centers = groups.centers
            qidx = farthest_point_sample(centers.detach(), model.num_queries)
            query_xyz = index_points(centers, qidx)
            query_pos = model.query_projection(
                model.pos_embedding(query_xyz, lo, hi).transpose(1, 2)).transpose(1, 2)
            memory_pos = model.pos_embedding(centers, lo, hi).to(memory.dtype)
            x, feats = torch.zeros_like(query_pos).to(memory.dtype), []
            for layer in model.decoder:
                x = layer(x, query_pos.to(memory.dtype), memory, memory_pos)
                feats.append(model.decoder_norm(x))
            outputs = []
            for f in feats:
                flat = f.transpose(1, 2)
                box = model.box_coder.decode(model.center_head(flat).transpose(1, 2).float(),
                                             model.size_head(flat).transpose(1, 2).float(),
                                             query_xyz.float(), lo, hi)  # fmt: skip
                outputs.append({"sem_cls_logits": model.class_head(flat).transpose(1, 2), **box})
            mark("decoder + heads")
        targets = criterion._prepare_targets(batch)
        matches = [criterion.matcher(o, targets) for o in outputs]
        mark("matching (scipy)")
        num = num_boxes_across_ranks(targets["gt_box_present"])
        loss = sum(sum(criterion.weights[k] * v for k, v in
                       criterion.layer_losses(o, targets, num).items())
                   for o in outputs)  # fmt: skip
        mark("losses (fp32, includes matching again)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        opt.step()
        mark("optimiser step")
        del matches
        if i == 0:
            continue
        for (_, t0), (name, t1) in zip(marks[:-1], marks[1:], strict=True):
            stages.setdefault(name, []).append(t1 - t0)
    split = {name: sorted(v)[len(v) // 2] for name, v in stages.items()}
    split["peak memory MB"] = peak_memory_mb(device)
    return split


def end_to_end(cfg: Config, steps: int, workers: int) -> dict[str, float]:
    """Samples/s, data share and peak memory of real training steps (the trainer with the
    task's dataset, collation and step, as ``run_finetune`` builds them) on synthetic rooms."""
    from cd2p.data.scannet_scenes import prepare_scannet_scenes
    from cd2p.data.synthetic import generate_synthetic_scannet
    from cd2p.engine.metrics_log import read_metrics
    from cd2p.engine.trainer import Trainer

    spec = get_task("detection")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_synthetic_scannet(root / "raw", num_scenes=max(4, cfg.batch + 2),
                                   frames_per_scene=1, seed=0)  # fmt: skip
        prepare_scannet_scenes(root / "raw", root / "scenes", progress=False,
                               labels=root / "raw" / "scannetv2-labels.combined.tsv")
        recipe = recipe_for(
            cfg, f"schedule.max_steps={steps}", f"run.log_every={steps // 2}",
            "run.checkpoint_every=100000", f"data.num_workers={workers}",
            "schedule.warmup_epochs=0", "run.eval_every=100000", "detection.train_split=all",
            "detection.crop_min_points=3000",
        )
        train = spec.load_split(root / "scenes", "all")
        model = spec.build_model(recipe, train, None)
        Trainer(spec.training_step(model, recipe), spec.train_dataset(recipe, train), recipe,
                root / "run", collate_fn=spec.collate_fn, progress=False).fit()  # fmt: skip
        last = read_metrics(root / "run", "train")[-1]
    return {"samples/s": last["samples_per_s"], "peak memory MB": last["peak_memory_mb"],
            "data fraction": last["data_fraction"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--paper", action="store_true", help="also the paper's model on CPU")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    args = parser.parse_args()

    configs = [Config("small (96-d x 3, 4096 pts, 128 x 16, 64 queries), CPU", "cpu", 2, 4096,
                      SMALL)]  # fmt: skip
    if args.paper:
        configs.append(Config("paper (384-d x 12, 40k pts, 2048 x 32, 256 q.), CPU", "cpu", 1,
                              40_000, PAPER))  # fmt: skip
    if torch.cuda.is_available():
        configs.append(Config("paper (384-d x 12, 40k pts, 2048 x 32, 256 q.), CUDA bf16",
                              "cuda", 8, 40_000, PAPER))  # fmt: skip

    table = Table(title="time split of one training step (ms, median)")
    table.add_column("configuration")
    rows = []
    for cfg in configs:
        console.print(f"timing {cfg.name}: batch {cfg.batch}")
        rows.append((cfg, time_split(cfg, args.steps)))
    names = [k for k in rows[0][1] if k != "peak memory MB"]
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("step samples/s", justify="right")
    table.add_column("peak MB", justify="right")
    for cfg, split in rows:
        step = sum(split[k] for k in names) - split["matching (scipy)"]  # counted in the loss
        table.add_row(
            f"{cfg.name}, batch {cfg.batch}",
            *[f"{1000 * split[k]:.1f}" for k in names],
            f"{cfg.batch / step:.2f}",
            f"{split['peak memory MB']:.0f}",
        )
    console.print(table)

    e2e = Table(title=f"end to end through the Trainer ({args.workers} loader workers)")
    for col in ("configuration", "samples/s", "data share", "peak MB",
                f"{PAPER_EPOCHS} epochs x {SCANNET_TRAIN_SCENES} scenes"):  # fmt: skip
        e2e.add_column(col, justify="left" if col == "configuration" else "right")
    for cfg in configs:
        res = end_to_end(cfg, max(2, args.steps), args.workers)
        hours = PAPER_EPOCHS * SCANNET_TRAIN_SCENES / res["samples/s"] / 3600
        e2e.add_row(f"{cfg.name}, batch {cfg.batch}", f"{res['samples/s']:.2f}",
                    f"{100 * res['data fraction']:.0f} %", f"{res['peak memory MB']:.0f}",
                    f"{hours:.1f} h")  # fmt: skip
    console.print(e2e)


if __name__ == "__main__":
    main()
