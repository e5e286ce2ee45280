"""Pre-training speed: samples/s, peak memory and where a step's time goes.

    .venv/bin/python benchmarks/pretrain.py            # tiny model on CPU (+ paper model on CUDA)
    .venv/bin/python benchmarks/pretrain.py --paper    # also the paper's model on CPU (slow)

For every configuration it measures

* the time split of one training step, stage by stage with the device synchronised between
  stages: grouping (FPS + kNN), backbone (patch embedding + blocks), concept extraction +
  alignment head + loss, backward, optimiser step;
* the step before and after the GPU work, side by side: the previous patch embedding (one
  512 -> 512 convolution over ``cat([pooled, x])``) and NaN checks in every geometry call
  (device syncs) against the split convolution and sync-free ops: ms per step and operators
  launched per step (torch's profiler);
* data loading per worker, steady state (persistent workers, after a warm-up epoch): row-by-row
  reads (the previous ``PairDataset``), batched reads (``__getitems__``), the in-memory mode,
  and the JPEG decoding + CLIP preprocessing that on-the-fly targets add;
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


class _ConcatenatedPatchEmbed:
    """The previous PatchEmbed.forward: the 512 -> 512 convolution over ``cat([pooled, x])``."""

    @staticmethod
    def forward(self, neighborhoods: torch.Tensor) -> torch.Tensor:
        b, g, k, _ = neighborhoods.shape
        x = self.first_conv(neighborhoods.reshape(b * g, k, 3).transpose(1, 2))
        pooled = x.max(dim=2, keepdim=True).values
        x = self.second_conv(torch.cat([pooled.expand(-1, -1, k), x], dim=1))
        return x.max(dim=2).values.view(b, g, self.dim)


def before_and_after(cfg: Config, steps: int) -> list[dict[str, float]]:
    """ms per step and operators per step of the previous step (concatenated patch embedding,
    NaN checks in the geometry ops) and of the current one. The two models are built from the
    same seed and their steps alternate, so a shared machine's load falls on both alike."""
    import types

    from torch.profiler import ProfilerActivity, profile

    from cd2p.ops import group_points

    def checked_group(self, points, random_start=False):  # the previous Cd2pBackbone.group
        return group_points(points, self.num_groups, self.group_size, random_start=random_start)

    device = torch.device(cfg.device)
    runs = {}
    for label in ("before", "now"):
        torch.manual_seed(0)
        model = build_pretrain_model(recipe_for(cfg)).to(device).train()
        if label == "before":
            encoder = model.backbone.encoder
            encoder.forward = types.MethodType(_ConcatenatedPatchEmbed.forward, encoder)
            model.backbone.group = types.MethodType(checked_group, model.backbone)
        runs[label] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    points = torch.randn(cfg.batch, cfg.points, 3, device=device)
    target = torch.randn(cfg.batch, 10, 768, device=device)

    def step(label: str) -> None:
        model, opt = runs[label]
        loss = model(points, target)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {"before": [], "now": []}
    for label in ("before", "now"):
        step(label)  # warm-up
    for _ in range(steps):
        for label in ("before", "now"):
            sync(device)
            start = time.perf_counter()
            step(label)
            sync(device)
            times[label].append(time.perf_counter() - start)
    rows = []
    for label in ("before", "now"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(label)
        ops = sum(1 for e in prof.events() if e.name.startswith("aten::"))
        ms = 1000 * sorted(times[label])[len(times[label]) // 2]
        rows.append({"label": label, "ms": ms, "ops": ops})
    return rows


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


class _RowByRow(torch.utils.data.Dataset):
    """The previous reading: one row at a time (hides ``PairDataset.__getitems__``)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset.__getitems__([index])[0]


def loader_rates(pairs: Path, batch: int, workers: int) -> dict[str, float]:
    """Samples/s per worker of the data pipeline alone, steady state: persistent workers, the
    first epoch (start-up, first file opens) not counted."""
    from torch.utils.data import DataLoader

    from cd2p.data.pairs import PairDataset
    from cd2p.engine.pretrain import PairCollate

    out = {}
    workers = max(1, workers)
    for label, dataset, collate in (
        ("row by row (before), stored targets", _RowByRow(PairDataset(pairs, target="prefix")),
         PairCollate()),
        ("batched reads, stored targets", PairDataset(pairs, target="prefix"), PairCollate()),
        ("in memory, stored targets", PairDataset(pairs, target="prefix", in_memory=True),
         PairCollate()),
        ("JPEG decode + CLIP preprocess", PairDataset(pairs, with_image=True), PairCollate(True)),
    ):  # fmt: skip
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                            collate_fn=collate, drop_last=True,
                            persistent_workers=True)  # fmt: skip
        for _ in loader:  # warm-up epoch: workers start, files open
            pass
        start, seen = time.perf_counter(), 0
        for _ in range(3):
            for b in loader:
                seen += b["points"].shape[0]
        out[label] = seen / (time.perf_counter() - start) / workers
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

    ba = Table(title="the step before and after the GPU work (same run, same inputs)")
    for col in ("configuration", "before ms", "now ms", "before / now", "ops before", "ops now"):
        ba.add_column(col, justify="left" if col == "configuration" else "right")
    for cfg in configs:
        before, now = before_and_after(cfg, args.steps)
        ba.add_row(f"{cfg.name}, batch {cfg.batch}", f"{before['ms']:.1f}", f"{now['ms']:.1f}",
                   f"{before['ms'] / now['ms']:.2f}x", str(before["ops"]), str(now["ops"]))
    console.print(ba)

    e2e = Table(title="end to end through the Trainer (samples/s, data included)")
    for col in ("configuration", "targets", "samples/s", "peak MB"):
        e2e.add_column(col, justify="right" if col in ("samples/s", "peak MB") else "left")
    data_table = Table(title=f"data pipeline alone, steady state ({args.workers} workers)")
    for col in ("pipeline", "samples/s per worker"):
        data_table.add_column(col)
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs:
            console.print(f"preparing synthetic pairs of {cfg.points} points")
            pairs = make_pairs(Path(tmp) / cfg.name.split()[0], cfg.points, 2 * cfg.batch)
            if cfg is configs[0]:
                # the loader at the paper's batch of 128 (per-batch costs amortised as in a run)
                many = make_pairs(Path(tmp) / "loader", cfg.points, 4 * 128)
                for label, rate in loader_rates(many, 128, args.workers).items():
                    data_table.add_row(f"{label}, {cfg.points} pts, batch 128", f"{rate:.0f}")
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
