"""``cd2p synthetic modelnet40|shapenetpart OUT``: small object benchmarks in the real formats."""

from __future__ import annotations

from pathlib import Path

import click

from cd2p.cli._common import OUTPUT_DIR, console, user_errors


@click.command("modelnet40")
@click.argument("out", type=OUTPUT_DIR)
@click.option(
    "--classes",
    "num_classes",
    default=8,
    show_default=True,
    type=click.IntRange(2, 8),
    help="Primitive classes (sphere, cube, cylinder, ...).",
)
@click.option("--train-per-class", default=40, show_default=True, type=click.IntRange(min=1))
@click.option("--test-per-class", default=10, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--points",
    "num_points",
    default=2048,
    show_default=True,
    type=click.IntRange(min=16),
    help="Points per shape file.",
)
@click.option("--noise", default=0.01, show_default=True, type=click.FloatRange(min=0))
@click.option("--seed", default=0, show_default=True, type=int)
@user_errors
def modelnet40(
    out: Path,
    num_classes: int,
    train_per_class: int,
    test_per_class: int,
    num_points: int,
    noise: float,
    seed: int,
) -> None:
    """Deformed, noisy primitive shapes written as modelnet40_normal_resampled in OUT.

    Prepare them like the real data: cd2p prepare modelnet40 OUT PREPARED
    """
    from cd2p.data.synthetic_shapes import synthetic_modelnet40

    synthetic_modelnet40(out, num_classes, train_per_class, test_per_class, num_points, noise, seed)
    console.print(
        f"wrote {num_classes} classes x ({train_per_class} train + {test_per_class} "
        f"test) shapes to {out}"
    )


@click.command("shapenetpart")
@click.argument("out", type=OUTPUT_DIR)
@click.option("--train-per-category", default=40, show_default=True, type=click.IntRange(min=1))
@click.option("--val-per-category", default=5, show_default=True, type=click.IntRange(min=0))
@click.option("--test-per-category", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--min-points", default=2048, show_default=True, type=click.IntRange(min=16))
@click.option("--max-points", default=2800, show_default=True, type=click.IntRange(min=16))
@click.option("--seed", default=0, show_default=True, type=int)
@user_errors
def shapenetpart(
    out: Path,
    train_per_category: int,
    val_per_category: int,
    test_per_category: int,
    min_points: int,
    max_points: int,
    seed: int,
) -> None:
    """Composite objects with labelled parts (Airplane, Chair, Guitar, Lamp, Mug, Table) written
    as shapenetcore_partanno_segmentation_benchmark_v0_normal in OUT.

    Prepare them like the real data: cd2p prepare shapenetpart OUT PREPARED
    """
    from cd2p.data.synthetic_shapes import COMPOSITES, synthetic_shapenetpart

    if min_points > max_points:
        raise click.BadParameter("--min-points must not exceed --max-points")
    synthetic_shapenetpart(
        out,
        tuple(COMPOSITES),
        train_per_category,
        val_per_category,
        test_per_category,
        (min_points, max_points),
        seed,
    )
    console.print(
        f"wrote {len(COMPOSITES)} categories x ({train_per_category} train + "
        f"{val_per_category} val + {test_per_category} test) shapes to {out}"
    )
