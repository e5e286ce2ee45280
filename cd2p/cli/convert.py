"""``cd2p convert``: foreign checkpoints (Point-MAE / Point-BERT, ClipCap) -> safe cd2p formats."""

from __future__ import annotations

from pathlib import Path

import click

from cd2p.cli._common import EXISTING_FILE, OUTPUT_DIR, console, key_value_table, user_errors


@click.group()
def convert() -> None:
    """Convert foreign checkpoints (read with torch.load(weights_only=True) only)."""


@convert.command("point-mae")
@click.argument("checkpoint", type=EXISTING_FILE)
@click.argument("out", type=OUTPUT_DIR)
@click.option("--num-heads", default=6, show_default=True, help="Attention heads (not in weights).")
@click.option("--num-groups", default=64, show_default=True, help="Patches per cloud.")
@click.option("--group-size", default=32, show_default=True, help="Points per patch.")
@click.option("--drop-path-rate", default=0.1, show_default=True, help="Stochastic depth.")
@user_errors
def point_mae(
    checkpoint: Path, out: Path, num_heads: int, num_groups: int, group_size: int,
    drop_path_rate: float,
) -> None:
    """Point-MAE / Point-BERT-style encoder CHECKPOINT -> cd2p backbone directory OUT.

    Pre-trained (MAE_encoder.*) and fine-tuned (encoder.*, blocks.blocks.N.*, module.*)
    layouts are recognised; decoders, class tokens and heads are dropped and listed. Width
    and depth come from the weights; heads and patch settings from the options.
    """
    from cd2p.convert import convert_point_mae, summarise_keys

    report = convert_point_mae(
        checkpoint, out, num_heads=num_heads, num_groups=num_groups, group_size=group_size,
        drop_path_rate=drop_path_rate,
    )
    table = key_value_table(f"{checkpoint.name} ({report.layout}) -> {out}")
    for key, value in report.config.items():
        table.add_row(key, f"{value:g}" if isinstance(value, float) else str(value))
    table.add_row("tensors kept", str(report.kept))
    table.add_row("dropped", ", ".join(summarise_keys(report.dropped)) or "nothing")
    console.print(table)
    console.print(f'load it with [bold]Cd2pBackbone.from_pretrained("{out}")[/]')


@convert.command("clipcap")
@click.argument("checkpoint", type=EXISTING_FILE)
@click.argument("out", type=OUTPUT_DIR)
@click.option("--n-head", type=int, default=None, help="GPT-2 heads (default: width / 64).")
@user_errors
def clipcap(checkpoint: Path, out: Path, n_head: int | None) -> None:
    """ClipCap's conceptual_weights.pt CHECKPOINT -> OUT/clipcap_mapper.safetensors + OUT/gpt2/.

    The legacy GPT-2 attention-mask buffers (attn.bias, attn.masked_bias) are dropped;
    lm_head is tied to the token embedding.
    """
    from cd2p.convert import convert_clipcap

    with console.status(f"converting {checkpoint.name}"):
        report = convert_clipcap(checkpoint, out, n_head=n_head)
    console.print(f"mapper: {report.mapper} ({report.mapper_keys} tensors)")
    console.print(
        f"GPT-2: {report.gpt2} ({report.gpt2_keys} tensors; "
        + ", ".join(f"{k} {v}" for k, v in report.gpt2_config.items())
        + ")"
    )
    console.print(f"dropped {len(report.dropped)} legacy buffers / other keys")
    console.print(f"use it with --clipcap-weights {report.mapper}")
