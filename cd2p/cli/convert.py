"""``cd2p convert``: foreign checkpoints (Point-MAE / Point-BERT, ClipCap) -> safe cd2p formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cd2p._text import styled
from cd2p.cli._common import EXISTING_FILE, OUTPUT_DIR, console, key_value_table, user_errors


@click.group()
def convert() -> None:
    """Convert foreign checkpoints (read with torch.load(weights_only=True) only)."""


def _point_mae_options(func):
    for option in reversed([
        click.option("--config", "config_file", type=EXISTING_FILE, default=None,
                     help="The source's own config file (Point-MAE / Point-BERT cfgs/*.yaml): "
                     "heads, groups, group size and points are read from it."),
        click.option("--num-heads", type=click.IntRange(min=1), default=None,
                     help="Attention heads [default: --config, else assumed: 6]."),
        click.option("--num-groups", type=click.IntRange(min=1), default=None,
                     help="Patches per cloud [default: --config, else assumed per layout]."),
        click.option("--group-size", type=click.IntRange(min=1), default=None,
                     help="Points per patch [default: --config, else assumed: 32]."),
        click.option("--num-points", type=click.IntRange(min=1), default=None,
                     help="Task models: points per cloud [default: --config (npoints), else "
                     "assumed per layout]."),
        click.option("--drop-path-rate", type=click.FloatRange(min=0), default=None,
                     help="Stochastic depth for later fine-tuning [default: --config, else 0.1]."),
        click.option("--class-names", type=EXISTING_FILE, default=None,
                     help="Classifiers: a text file with one class name per line, in label "
                     "order (e.g. modelnet40_shape_names.txt)."),
    ]):  # fmt: skip
        func = option(func)
    return func


@convert.command("point-mae")
@click.argument("checkpoint", type=EXISTING_FILE)
@click.argument("out", type=OUTPUT_DIR)
@_point_mae_options
@user_errors
def point_mae(checkpoint: Path, out: Path, **options: Any) -> None:
    """Point-MAE / Point-BERT CHECKPOINT -> the cd2p model in OUT that computes its outputs.

    \b
    Detected from the keys:
      Point-MAE pre-trained (MAE_encoder.*)          -> Cd2pBackbone
      Point-BERT pre-trained (transformer_q.*)       -> Cd2pBackbone with reduce_dim + class token
      a bare encoder (encoder.*, blocks.blocks.N.*)  -> Cd2pBackbone
      fine-tuned classifier (cls_head_finetune.*)    -> Cd2pForClassification (same logits)
      Point-MAE part segmentation (model_state_dict) -> Cd2pForPartSegmentation (same outputs)

    Decoders, mask tokens, Point-BERT's momentum encoder, dVAE and pre-training heads take no
    part in the outputs: they are dropped and listed. Anything cd2p cannot compute is refused
    with the reason. Width, depth and head sizes come from the weights; heads, patches and
    points from the options or --config, otherwise they are assumed and said so here and in
    the model card.

    \b
    Example:
      cd2p convert point-mae modelnet_1k.pth baselines/point-mae-mn40 \\
          --config Point-MAE/cfgs/finetune_modelnet.yaml \\
          --class-names modelnet40_shape_names.txt
    """
    _convert_point_mae(checkpoint, out, options)


@convert.command("point-bert")
@click.argument("checkpoint", type=EXISTING_FILE)
@click.argument("out", type=OUTPUT_DIR)
@_point_mae_options
@user_errors
def point_bert(checkpoint: Path, out: Path, **options: Any) -> None:
    """The same as `cd2p convert point-mae` (the layout is detected from the keys)."""
    _convert_point_mae(checkpoint, out, options)


def _convert_point_mae(checkpoint: Path, out: Path, options: dict[str, Any]) -> None:
    from cd2p.convert import convert_point_mae

    with console.status(f"converting {checkpoint.name}"):
        report = convert_point_mae(checkpoint, out, config=options.pop("config_file"), **options)
    table = key_value_table(f"{checkpoint.name} ({report.layout}) -> {out}")
    table.add_row("cd2p model", report.target)
    bb = report.config.get("backbone", report.config)
    for key in ("dim", "depth", "mlp_ratio", "patch_dim", "class_token"):
        if key in bb:
            value = bb[key]
            table.add_row(key, f"{value:g}" if isinstance(value, float) else str(value))
    for key in ("num_classes", "head_channels", "head_norm", "num_parts", "num_categories"):
        if key in report.config:
            table.add_row(key, str(report.config[key]))
    for key, setting in report.settings.items():
        table.add_row(key, f"{setting['value']}  ({setting['source']})")
    table.add_row("tensors kept", str(report.kept))
    table.add_row("dropped", ", ".join(report.dropped_summary) or "nothing")
    table.add_row("source sha256", report.sha256[:16] + "...")
    console.print(table)
    for note in report.notes:
        console.print(styled("[yellow]note:[/] {note}", note=note))
    if report.assumed:
        values = ", ".join(f"{k}={report.settings[k]['value']}" for k in report.assumed)
        console.print(styled(
            "[bold yellow]assumed[/] (not in the weights, no option or --config): {values}; "
            "the model card says so. Pass --config cfgs/....yaml or the options if these are "
            "not the checkpoint's.", values=values
        ))
    console.print(styled('load it with [bold]cd2p.from_pretrained("{out}")[/]', out=out))


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
