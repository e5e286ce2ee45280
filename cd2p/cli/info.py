"""``cd2p info``: what cd2p will run on."""

from __future__ import annotations

import importlib.metadata
import platform

import click
import torch

from cd2p import __version__
from cd2p.cli._common import console, key_value_table
from cd2p.ops import cluster_available, resolve_backend

OPTIONAL_PACKAGES = (
    "torch_cluster", "open_clip_torch", "transformers", "datasets", "trimesh", "tensorboard",
    "wandb",
)  # fmt: skip


def teacher_weights_report() -> dict[str, str]:
    """Whether the teacher's CLIP and ClipCap weights are in the local Hugging Face cache
    (looked up without any network access)."""
    missing = "not in the local cache (`cd2p prepare teacher` downloads it once, online)"
    try:
        from cd2p.demo import local_teacher_weight_files

        clip, clipcap = local_teacher_weight_files()
    except Exception as exc:  # noqa: BLE001 (a broken cache or open_clip must not break info)
        return {"teacher weights": f"cannot check the cache: {exc}"}
    return {
        "CLIP weights": f"cached: {clip}" if clip else missing,
        "ClipCap weights": f"cached: {clipcap}" if clipcap else missing,
    }


def environment_report() -> dict[str, str]:
    """Versions, devices and backends as ``name -> value`` strings."""
    report = {
        "cd2p": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        report["cuda version"] = str(torch.version.cuda)
        report["gpu"] = ", ".join(
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        )
        report["bf16 supported"] = str(torch.cuda.is_bf16_supported())
    else:
        report["gpu"] = "none"
        report["bf16 supported"] = "False (CPU runs in fp32)"
    try:
        backend = resolve_backend()
        if backend == "default":
            from cd2p.ops.fps_triton import triton_available

            fused = "fused Triton FPS on CUDA" if triton_available() else "no Triton"
            backend = f"torch ({fused})"
    except (ValueError, RuntimeError) as exc:
        backend = f"error: {exc}"
    cluster = "present" if cluster_available() else "absent"
    report["ops backend"] = f"{backend} (torch-cluster {cluster})"
    report.update(teacher_weights_report())
    for name in OPTIONAL_PACKAGES:
        try:
            report[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            report[name] = "not installed"
    return report


@click.command()
def info() -> None:
    """Show cd2p, torch, CUDA / bf16, GPU, ops backend, whether the CLIP / ClipCap teacher
    weights are in the local Hugging Face cache, and the optional packages."""
    table = key_value_table("cd2p environment")
    for key, value in environment_report().items():
        table.add_row(key, value)
    console.print(table)
