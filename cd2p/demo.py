"""``cd2p demo``: the whole pre-training pipeline, offline, on a laptop, in a few minutes.

1. generate a small synthetic ScanNet v2 (rooms with furniture rendered to RGB-D ``.sens``);
2. prepare RGB/point pairs from it (``cd2p prepare scannet``);
3. compute the teacher targets (``cd2p prepare teacher``) with the real CLIP + ClipCap teacher
   when both weight files are already on this machine (Hugging Face cache or given paths;
   nothing is downloaded), otherwise with the seeded RANDOM teacher, and say which;
4. pre-train a small student (``recipes/demo.yaml``) with the real engine;
5. export it to ``RUN/backbone``, reload it with ``Cd2pBackbone.from_pretrained`` and check
   that the reloaded model gives the trained student's outputs;
6. plot the curves and print a summary with the loss curve.

``quick=True`` (``cd2p demo --quick``) shrinks every stage (2 scenes, a handful of pairs, a
few steps of a smaller student) to check the pipeline in well under a minute (the tests).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from cd2p._text import plain_console, styled

MARKER = ".cd2p-demo"


@dataclass(frozen=True)
class DemoSize:
    """How big each stage of the demo is."""

    scenes: int
    frames_per_scene: int
    frame_skip: int
    points: int
    color_size: tuple[int, int]
    depth_size: tuple[int, int]
    overrides: tuple[str, ...] = ()


FULL = DemoSize(
    scenes=4, frames_per_scene=40, frame_skip=2, points=1024,
    color_size=(160, 120), depth_size=(80, 60),
)  # fmt: skip
QUICK = DemoSize(
    scenes=2, frames_per_scene=8, frame_skip=1, points=512,
    color_size=(64, 48), depth_size=(64, 48),
    overrides=(
        "model.dim=64", "model.depth=2", "model.num_heads=4", "model.num_groups=16",
        "model.group_size=16", "pretrain.num_concepts=8", "data.num_points=512",
        "data.batch_size=4", "schedule.max_steps=6", "run.log_every=2",
        "run.checkpoint_every=4",
    ),
)  # fmt: skip


@dataclass
class DemoResult:
    """What the demo made and measured."""

    workdir: Path
    run_dir: Path
    backbone_dir: Path
    plot: Path
    pairs: int
    random_teacher: bool
    teacher: str
    steps: int
    losses: list[float]
    reload_max_abs_diff: float
    seconds: dict[str, float] = field(default_factory=dict)


def find_local_teacher_weights() -> tuple[Path, Path] | None:
    """The CLIP and ClipCap weight files if both are already in the Hugging Face cache.

    Only looks at the local cache (``try_to_load_from_cache``): never touches the network.
    """
    clip, clipcap = local_teacher_weight_files()
    if clip is None or clipcap is None:
        return None
    return clip, clipcap


def local_teacher_weight_files() -> tuple[Path | None, Path | None]:
    """``(CLIP file, ClipCap file)`` found in the local Hugging Face cache, each or None
    (``cd2p info`` reports them). Never touches the network."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    from cd2p.models.teacher import (
        CLIP_PRETRAINED_TAG,
        CLIPCAP_FILENAME,
        CLIPCAP_REPO_ID,
        DEFAULT_MODEL_NAME,
    )

    hub_repo = open_clip.get_pretrained_cfg(DEFAULT_MODEL_NAME, CLIP_PRETRAINED_TAG).get("hf_hub")
    clip = None
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(hub_repo.strip("/"), name) if hub_repo else None
        if isinstance(found, str):
            clip = Path(found)
            break
    clipcap = try_to_load_from_cache(CLIPCAP_REPO_ID, CLIPCAP_FILENAME)
    return clip, (Path(clipcap) if isinstance(clipcap, str) else None)


def _prepare_workdir(workdir: Path) -> None:
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).is_file():
            raise FileExistsError(
                f"{workdir} is not empty and was not made by `cd2p demo`; choose another --workdir"
            )
        shutil.rmtree(workdir)  # a previous demo's outputs: start afresh
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by cd2p demo; safe to delete\n")


def run_demo(
    workdir: str | Path = "cd2p-demo",
    *,
    quick: bool = False,
    clip_weights: str | Path | None = None,
    clipcap_weights: str | Path | None = None,
    random_teacher: bool = False,
    overrides: tuple[str, ...] | list[str] = (),
    console: Console | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run the demo pipeline in ``workdir`` (created; a previous demo's is replaced).

    Args:
        quick: the reduced size (seconds, for tests) instead of the full demo (minutes).
        clip_weights, clipcap_weights: local teacher weight files; default: the Hugging
            Face cache if it has both, else the random teacher.
        random_teacher: use the random teacher even when real weights are available.
        overrides: extra ``section.key=value`` settings for ``recipes/demo.yaml``.
    """
    from cd2p.config import load_recipe
    from cd2p.data.scannet_pairs import prepare_scannet
    from cd2p.data.synthetic import generate_synthetic_scannet
    from cd2p.data.teacher_targets import prepare_teacher_targets
    from cd2p.engine.metrics_log import plot_metrics, read_metrics, sparkline
    from cd2p.engine.pretrain import run_pretrain
    from cd2p.models.backbone import Cd2pBackbone
    from cd2p.models.teacher import Teacher

    console = console or plain_console()
    size = QUICK if quick else FULL
    workdir = Path(workdir)
    _prepare_workdir(workdir)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = now - clock
        clock = now

    console.rule(styled("[bold]cd2p demo"))
    console.print(f"1/5 synthetic ScanNet: {size.scenes} scenes x {size.frames_per_scene} frames")
    generate_synthetic_scannet(
        workdir / "scannet",
        num_scenes=size.scenes,
        frames_per_scene=size.frames_per_scene,
        seed=0,
        color_size=size.color_size,
        depth_size=size.depth_size,
    )
    lap("synthetic scenes")

    console.print(f"2/5 RGB/point pairs: every {size.frame_skip} frame(s), {size.points} points")
    report = prepare_scannet(
        workdir / "scannet",
        workdir / "pairs",
        frame_skip=size.frame_skip,
        num_points=size.points,
        split="all",
        min_valid_points=256,
        progress=progress,
    )
    pairs = int(report["pairs_written"])
    lap("prepare pairs")

    local = None
    if clip_weights is not None or clipcap_weights is not None:
        if clip_weights is None or clipcap_weights is None:
            raise ValueError("give both --clip-weights and --clipcap-weights (or neither)")
        local = (Path(clip_weights), Path(clipcap_weights))
    elif not random_teacher:
        local = find_local_teacher_weights()
    if local is not None and not random_teacher:
        teacher = Teacher.from_pretrained("prefix", clip_weights=local[0], clipcap_weights=local[1])
        console.print(f"3/5 teacher targets from the real teacher: {teacher.description}")
    else:
        teacher = Teacher.random("prefix", seed=0)
        why = "as asked" if random_teacher else "CLIP/ClipCap weights are not on this machine"
        console.print(
            Panel(
                f"3/5 teacher targets from a RANDOM teacher ({why}): the pipeline runs end to "
                "end, but the student distils random features, NOT CLIP. For the real teacher, "
                "run `cd2p prepare teacher` once online (or pass --clip-weights and "
                "--clipcap-weights) and rerun the demo.",
                style="bold yellow",
            )
        )
    prepare_teacher_targets(workdir / "pairs", teacher, batch_size=16)
    del teacher
    lap("teacher targets")

    recipe = load_recipe("demo", [*size.overrides, *overrides])
    console.print(
        f"4/5 pre-training a {recipe.model.dim}-d, {recipe.model.depth}-block student "
        f"({recipe.pretrain.objective}) on {pairs} pairs"
    )
    run_dir = workdir / "run"
    result = run_pretrain(
        recipe, [workdir / "pairs"], run_dir, progress=progress, recipe_name="demo"
    )
    lap("pre-training")

    console.print("5/5 export, reload with Cd2pBackbone.from_pretrained, compare")
    reloaded = Cd2pBackbone.from_pretrained(str(result.backbone_dir))
    trained = result.model.backbone.to("cpu").eval()
    probe = torch.randn(2, recipe.data.num_points, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (reloaded(probe).tokens - trained(probe).tokens).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"the reloaded backbone differs from the trained one by {diff}")
    png = plot_metrics(run_dir)
    lap("export + reload")

    losses = [r["loss"] for r in read_metrics(run_dir, "train")]
    speed = [r["samples_per_s"] for r in read_metrics(run_dir, "train")]
    table = Table(title="cd2p demo summary", show_header=False)
    table.add_column(style="bold cyan")
    table.add_column()
    table.add_row("pairs", f"{pairs} (synthetic ScanNet, {size.scenes} scenes)")
    teacher_row = result.teacher
    if result.random_teacher:
        teacher_row = styled("[bold yellow]{teacher}[/]", teacher=teacher_row)
    table.add_row("teacher", teacher_row)
    table.add_row("student", f"{recipe.model.dim}-d x {recipe.model.depth} blocks, "
                  f"{recipe.model.num_groups} x {recipe.model.group_size} patches")  # fmt: skip
    table.add_row("steps", f"{result.run.step} ({result.run.epoch} epochs)")
    table.add_row("loss", f"{losses[0]:.4g} {sparkline(losses)} {losses[-1]:.4g}")
    table.add_row("speed", f"{sum(speed) / len(speed):.1f} samples/s")
    table.add_row("reload check", f"max |difference| {diff:.1e}: identical outputs")
    table.add_row("time", ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
    table.add_row("backbone", f"{result.backbone_dir}")
    if result.student_dir is not None:
        table.add_row("whole student", f"{result.student_dir} (cd2p caption, cd2p zeroshot)")
    table.add_row("curves", f"{png}")
    console.print(table)
    console.print(styled(
        'Use it: [bold]Cd2pBackbone.from_pretrained("{backbone}")[/]; '
        "plot again with [bold]cd2p plot {run}[/]", backbone=result.backbone_dir, run=run_dir
    ))
    return DemoResult(
        workdir=workdir,
        run_dir=run_dir,
        backbone_dir=result.backbone_dir,
        plot=png,
        pairs=pairs,
        random_teacher=result.random_teacher,
        teacher=result.teacher,
        steps=result.run.step,
        losses=losses,
        reload_max_abs_diff=diff,
        seconds=seconds,
    )
