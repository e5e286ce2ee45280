"""``cd2p embed --model M CLOUDS... --out FEATURES``: pre-trained features of your own clouds."""

from __future__ import annotations

from pathlib import Path

import click

from cd2p._text import styled
from cd2p.cli._common import OUTPUT_DIR, console, key_value_table, resolve_device, user_errors


@click.command()
@click.argument("clouds", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--model",
    "model_id",
    required=True,
    help="A backbone (a pre-training RUN/backbone, a Hub id) or any task model (its backbone "
    "is used).",
)
@click.option("--out", required=True, type=OUTPUT_DIR, help="New dataset directory.")
@click.option(
    "--points",
    "num_points",
    type=click.IntRange(min=1),
    default=None,
    help="Points per cloud (farthest point sampling) [default: the task model's, else 1024].",
)
@click.option(
    "--tokens", is_flag=True, help="Also store the per-patch tokens (G, dim) and their centers."
)
@click.option(
    "--normalize",
    type=click.Choice(["unit-sphere", "center", "none"]),
    default="unit-sphere",
    show_default=True,
    help="unit-sphere: centred and scaled as ModelNet40 / ScanObjectNN objects; center: only "
    "centred (scenes in metres); none: as in the file.",
)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@user_errors
def embed(
    clouds: tuple[Path, ...],
    model_id: str,
    out: Path,
    num_points: int | None,
    tokens: bool,
    normalize: str,
    batch_size: int,
    device: str,
) -> None:
    """Write pooled backbone features of CLOUDS (files or directories of them) as a dataset.

    \b
    CLOUDS: PLY, PCD, .npy/.npz, .txt/.xyz/.csv (x y z, optional colours / normals).
    OUT is a Hugging Face dataset on disk, one row per cloud: file, num_points, pooled
    (max- and mean-pooled final tokens, 2 x dim float32) and, with --tokens, tokens (G, dim)
    and centers (G, 3). Load it with datasets.load_from_disk(OUT).

    \b
    Examples:
      cd2p embed --model runs/distill/backbone scans/*.ply --out features
      cd2p embed --model org/cd2p-modelnet40 my_objects/ --out features --tokens
    """
    import cd2p
    from cd2p.engine.embed import embed_clouds, expand_cloud_paths
    from cd2p.engine.progress import progress_reporter

    model = cd2p.from_pretrained(model_id).to(resolve_device(device))
    files = expand_cloud_paths(clouds)
    with progress_reporter(console, "embed", len(files), "clouds") as advance:
        result = embed_clouds(
            model, files, out, num_points=num_points, tokens=tokens, normalize=normalize,
            batch_size=batch_size, model_name=model_id, progress=advance,
        )  # fmt: skip
    table = key_value_table(f"cd2p embed: {result.clouds} clouds")
    table.add_row("features", f"pooled ({result.feature_dim} floats per cloud)"
                  + (" + tokens, centers" if tokens else ""))  # fmt: skip
    table.add_row("wrote", str(result.out))
    console.print(table)
    console.print(styled("load it with [bold]datasets.load_from_disk({path})",
                         path=repr(str(result.out))))
