"""``cd2p demo``: synthetic scenes -> pairs -> teacher targets -> pre-training -> export."""

from __future__ import annotations

from pathlib import Path

import click

from cd2p.cli._common import EXISTING_FILE, OUTPUT_DIR, console, overrides_option, user_errors


@click.command()
@click.option(
    "--workdir",
    type=OUTPUT_DIR,
    default=Path("cd2p-demo"),
    show_default=True,
    help="Where the demo writes everything (a previous demo's directory is replaced).",
)
@click.option("--quick", is_flag=True, help="Tiny sizes: checks the pipeline in seconds.")
@click.option(
    "--clip-weights",
    type=EXISTING_FILE,
    help="Local open_clip ViT-B-32-quickgelu weights for the real teacher.",
)
@click.option(
    "--clipcap-weights",
    type=EXISTING_FILE,
    help="Local ClipCap conceptual_weights.pt for the real teacher.",
)
@click.option("--random-teacher", is_flag=True, help="Use the random teacher even if CLIP is here.")
@overrides_option("Override recipes/demo.yaml, e.g. --set schedule.epochs=5.")
@user_errors
def demo(
    workdir: Path,
    quick: bool,
    clip_weights: Path | None,
    clipcap_weights: Path | None,
    random_teacher: bool,
    overrides: tuple[str, ...],
) -> None:
    """Run the whole pre-training pipeline offline on a synthetic ScanNet (a few minutes on
    2 CPU cores): scenes, pairs, teacher targets, a small student, export and reload.

    Uses the real CLIP + ClipCap teacher when its weights are already on this machine
    (Hugging Face cache, or --clip-weights/--clipcap-weights), otherwise a RANDOM teacher.
    """
    from cd2p.demo import run_demo

    run_demo(
        workdir,
        quick=quick,
        clip_weights=clip_weights,
        clipcap_weights=clipcap_weights,
        random_teacher=random_teacher,
        overrides=overrides,
        console=console,
    )
