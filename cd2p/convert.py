"""Converters from foreign checkpoints to cd2p's safe formats.

``convert_point_mae``: a Point-MAE (pre-trained ``MAE_encoder.*`` or fine-tuned ``encoder.*`` /
``blocks.blocks.N.*`` layouts, optionally under ``module.``) or Point-BERT-style
(``transformer_q.*``) encoder checkpoint -> a cd2p backbone directory (``config.json`` +
``model.safetensors`` + card). The architectures match
(docs/method.md#point-mae-compatibility), so this is renaming:

    Point-MAE                               cd2p
    [MAE_encoder.]encoder.first_conv.0.w    encoder.first_conv.0.w
    [MAE_encoder.]pos_embed.0.w             pos_embed.0.w
    [MAE_encoder.]blocks.blocks.3.attn.qkv  blocks.3.attn.qkv
    [MAE_encoder.]norm.w                    norm.w

Decoders, mask tokens, class tokens and heads are dropped and reported.

``convert_clipcap``: ClipCap's ``conceptual_weights.pt`` (pickled state dict) ->
``clipcap_mapper.safetensors`` (the ``clip_project.*`` MLP mapper) and ``gpt2/`` (a GPT-2
directory for ``transformers.GPT2LMHeadModel.from_pretrained``), without the legacy attention
mask buffers. Foreign files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file, save_model

from cd2p._atomic import atomic_directory
from cd2p.hub import CONVERTED_FROM_KEY
from cd2p.models.backbone import Cd2pBackbone
from cd2p.models.hub import WEIGHTS_NAME

# Where the encoder lives in each layout (after any DDP ``module.`` prefix is removed).
_ENCODER_PREFIXES = {
    "point-mae (pre-trained)": "MAE_encoder.",
    "point-bert": "transformer_q.",
    "point-mae (fine-tuned, base_model.)": "base_model.",
}
_KEPT_AS_IS = ("encoder.first_conv.", "encoder.second_conv.", "pos_embed.", "norm.")
_BLOCK_KEY = re.compile(r"^blocks\.blocks\.(\d+)\.(.+)$")


@dataclass
class ConversionReport:
    """What a conversion kept, renamed and dropped."""

    source: Path
    out: Path
    layout: str
    config: dict[str, Any] = field(default_factory=dict)
    kept: int = 0
    dropped: list[str] = field(default_factory=list)


# -- reading foreign checkpoints ---------------------------------------------------------------


def load_foreign_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses pickles that would build arbitrary Python objects (or run code).
        raise ValueError(
            f"{path} contains pickled Python objects that cd2p refuses to load "
            "(torch.load(weights_only=True) rejected it); re-save only the state dict of tensors. "
            f"Detail: {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc


def _state_dict(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor state dict inside a Point-MAE / Point-BERT checkpoint."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    for key in ("base_model", "model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    bad = sorted(str(k) for k, v in checkpoint.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(
            f"{path}: the state dict holds non-tensor values (keys: {', '.join(bad[:10])}); "
            "expected {'base_model': {name: tensor}} or a flat {name: tensor} dict"
        )
    # DDP checkpoints prefix every key with "module."
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _detect_layout(state: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    for layout, prefix in _ENCODER_PREFIXES.items():
        if any(k.startswith(prefix + "blocks.blocks.") for k in state):
            return layout, prefix
    if any(k.startswith("blocks.blocks.") for k in state):
        return "point-mae (fine-tuned)", ""
    raise ValueError(
        "no Point-MAE / Point-BERT encoder found: expected keys such as "
        "'MAE_encoder.blocks.blocks.0.attn.qkv.weight', 'transformer_q.blocks.blocks.0...' or "
        f"'blocks.blocks.0...'; first keys: {', '.join(list(state)[:5])}"
    )


def point_mae_to_cd2p(
    state: Mapping[str, torch.Tensor], prefix: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an encoder's keys to cd2p's; returns ``(renamed, dropped keys)``."""
    renamed: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        rest = key[len(prefix) :] if key.startswith(prefix) else None
        if rest is None:
            dropped.append(key)
            continue
        block = _BLOCK_KEY.match(rest)
        if block:
            renamed[f"blocks.{block.group(1)}.{block.group(2)}"] = value
        elif rest.startswith(_KEPT_AS_IS):
            renamed[rest] = value
        else:
            dropped.append(key)  # decoder, mask / class tokens, heads, dVAE
    return renamed, dropped


def infer_backbone_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``dim``, ``depth`` and ``mlp_ratio`` from the shapes of renamed (cd2p) weights."""
    try:
        dim = int(state["pos_embed.2.weight"].shape[0])
        hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
        patch_out = int(state["encoder.second_conv.3.weight"].shape[0])
    except KeyError as exc:
        raise ValueError(f"encoder weight {exc.args[0]!r} is missing from the checkpoint") from None
    if patch_out != dim:
        raise ValueError(
            f"the patch encoder outputs {patch_out} channels but the transformer is {dim} wide; "
            "cd2p's patch embedding projects straight to the transformer width"
        )
    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    if indices != list(range(len(indices))):
        raise ValueError(f"transformer blocks are not numbered 0..N-1: {indices}")
    return {"dim": dim, "depth": len(indices), "mlp_ratio": hidden / dim}


@contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out``, renamed to ``out`` when the block completes."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty")
    with atomic_directory(out) as tmp:
        yield tmp


def convert_point_mae(
    checkpoint: str | Path,
    out: str | Path,
    *,
    num_heads: int = 6,
    num_groups: int = 64,
    group_size: int = 32,
    drop_path_rate: float = 0.1,
) -> ConversionReport:
    """Convert a Point-MAE / Point-BERT encoder checkpoint into a cd2p backbone directory.

    ``dim``, ``depth`` and the MLP ratio come from the weight shapes; ``num_heads``,
    ``num_groups`` and ``group_size`` are not stored in the weights and are given (defaults:
    Point-MAE's 6 heads, 64 groups of 32 points). The result loads with
    ``Cd2pBackbone.from_pretrained(out)``.
    """
    source, out = Path(checkpoint), Path(out)
    state = _state_dict(load_foreign_checkpoint(source), source)
    layout, prefix = _detect_layout(state)
    if any(k.startswith(prefix + "reduce_dim.") for k in state):
        # Point-BERT projects the max-pooled patch feature with a Linear (reduce_dim); applying
        # it after the max-pool cannot be folded into cd2p's patch embedding exactly.
        raise ValueError(
            f"{source}: this encoder has a 'reduce_dim' projection after the patch max-pool "
            "(Point-BERT's dVAE-sized encoder); cd2p's patch embedding has no such layer, so the "
            "checkpoint cannot be converted without changing its outputs"
        )
    renamed, dropped = point_mae_to_cd2p(state, prefix)
    inferred = infer_backbone_config(renamed)
    if inferred["dim"] % num_heads:
        raise ValueError(f"width {inferred['dim']} is not divisible by --num-heads {num_heads}")
    config = {
        **inferred,
        "num_heads": num_heads,
        "num_groups": num_groups,
        "group_size": group_size,
        "drop_path_rate": drop_path_rate,
    }
    model = Cd2pBackbone(**config)
    expected = model.state_dict()
    # Very old BatchNorm checkpoints lack the step counter; it does not affect outputs.
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in renamed:
            renamed[key] = torch.zeros_like(value)
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} ({layout}) does not map onto Cd2pBackbone({config}): "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    bad_shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in renamed.items()
        if v.shape != expected[k].shape
    ]
    if bad_shapes:
        raise ValueError(f"{source}: shape mismatches: {'; '.join(bad_shapes[:10])}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in renamed.items()}, strict=True)
    report = ConversionReport(
        source=source, out=out, layout=layout, config=config, kept=len(renamed), dropped=dropped
    )
    provenance = {
        "file": source.name,
        "layout": layout,
        "kept": report.kept,
        "dropped": summarise_keys(dropped),
    }
    with _atomic_dir(out) as tmp:
        model.save_pretrained(tmp, model_card_kwargs={"converted_from": provenance})
        # The provenance also goes inside the weights file, so that `cd2p push` can re-render
        # the card of a converted model truthfully.
        save_model(
            model,
            str(tmp / WEIGHTS_NAME),
            metadata={
                "format": "pt",
                "cd2p_model_kind": model.model_kind,
                CONVERTED_FROM_KEY: json.dumps(provenance),
            },
        )
    return report


def summarise_keys(keys: list[str]) -> list[str]:
    """``['MAE_decoder.blocks.0.x', 'MAE_decoder.norm.w', 'mask_token']`` ->
    ``['MAE_decoder.* (2 tensors)', 'mask_token']``: readable lists of dropped keys."""
    groups: dict[str, int] = {}
    for key in keys:
        head = key.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    return [f"{h}.* ({n} tensors)" if n > 1 else h for h, n in groups.items()]


# -- ClipCap -----------------------------------------------------------------------------------

_GPT_PREFIX = "gpt."
_MAPPER_PREFIX = "clip_project."
# Causal-mask buffers that old transformers versions saved with every GPT-2 attention layer.
_LEGACY_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")
_GPT2_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")


@dataclass
class ClipCapReport:
    """What ``convert_clipcap`` wrote."""

    source: Path
    mapper: Path
    gpt2: Path
    mapper_keys: int
    gpt2_keys: int
    dropped: list[str]
    gpt2_config: dict[str, Any]


def gpt2_config_from_state(state: Mapping[str, torch.Tensor], n_head: int | None = None):
    """A ``transformers.GPT2Config`` matching GPT-2 weights (keys without the ``gpt.`` prefix).

    Heads are not visible in the shapes; every released GPT-2 uses 64-wide heads, the default.
    """
    from transformers import GPT2Config

    vocab, n_embd = state["transformer.wte.weight"].shape
    n_positions = state["transformer.wpe.weight"].shape[0]
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")}
    inner = state["transformer.h.0.mlp.c_fc.weight"].shape[1]  # Conv1D weights are (in, out)
    n_head = n_head or max(1, n_embd // 64)
    if n_embd % n_head:
        raise ValueError(f"GPT-2 width {n_embd} is not divisible by {n_head} heads")
    special = min(50256, vocab - 1)  # GPT-2's <|endoftext|>, kept inside the vocabulary
    return GPT2Config(
        vocab_size=int(vocab),
        n_positions=int(n_positions),
        n_embd=int(n_embd),
        n_layer=len(layers),
        n_head=int(n_head),
        n_inner=None if inner == 4 * n_embd else int(inner),
        bos_token_id=special,
        eos_token_id=special,
        tie_word_embeddings=True,
    )


def _check_keys(
    source: Path, what: str, expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
) -> None:
    """Same names and shapes as the model that will hold them, or an error naming both."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [
        f"{k}: {tuple(found[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source}: the {what} weights do not match: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}, shapes {shapes[:10]}"
        )


def clipcap_gpt2(
    state: Mapping[str, torch.Tensor], source: str | Path, n_head: int | None = None
) -> tuple[Any, int, list[str]]:
    """ClipCap's fine-tuned GPT-2 from the tensors of its checkpoint (``gpt.*`` keys; the
    legacy attention-mask buffers are dropped): ``(GPT2LMHeadModel in eval mode, number of
    GPT-2 tensors, keys that are neither GPT-2 nor mapper)``. Loaded strictly; ``source``
    names the file in errors."""
    from transformers import GPT2LMHeadModel

    source = Path(source)
    gpt, dropped = {}, []
    for key, value in state.items():
        if key.startswith(_GPT_PREFIX) and not _LEGACY_BUFFER.search(key):
            gpt[key[len(_GPT_PREFIX) :]] = value
        elif not key.startswith(_MAPPER_PREFIX):
            dropped.append(key)
    if "transformer.wte.weight" not in gpt:
        raise ValueError(f"{source} has no 'gpt.transformer.wte.weight': no GPT-2 in this file")
    config = gpt2_config_from_state(gpt, n_head)
    head, wte = gpt.get("lm_head.weight"), gpt["transformer.wte.weight"]
    if head is not None and not torch.equal(head, wte):
        config.tie_word_embeddings = False  # a fine-tune that untied them: keep both
    gpt.setdefault("lm_head.weight", wte)
    # Built on the meta device (no random init of ~124 M parameters), then given the weights.
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    _check_keys(source, "gpt.*", model.state_dict(), gpt)
    model.load_state_dict({k: v.float() for k, v in gpt.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), len(gpt), dropped


def convert_clipcap(
    checkpoint: str | Path, out: str | Path, *, n_head: int | None = None
) -> ClipCapReport:
    """Split ClipCap's pickled checkpoint into safetensors: the mapper and a GPT-2 directory.

    Writes ``out/clipcap_mapper.safetensors`` (``clip_project.*`` keys, for the teacher's
    ``load_clipcap_mapper``) and ``out/gpt2/`` (``GPT2LMHeadModel.from_pretrained``), both
    complete or not at all.
    """
    from cd2p.models.teacher import ClipCapMapper, load_clipcap_state

    source, out = Path(checkpoint), Path(out)
    state = load_clipcap_state(source)  # weights_only=True; refuses non-tensor values
    mapper = {k: v.contiguous() for k, v in state.items() if k.startswith(_MAPPER_PREFIX)}
    if not mapper:
        raise ValueError(f"{source} has no '{_MAPPER_PREFIX}*' keys: not a ClipCap checkpoint")
    model, gpt_keys, dropped = clipcap_gpt2(state, source, n_head)
    with torch.device("meta"):
        expected_mapper = ClipCapMapper().state_dict()
    _check_keys(source, "clip_project.*", expected_mapper,
                {k[len(_MAPPER_PREFIX) :]: v for k, v in mapper.items()})  # fmt: skip
    config = model.config
    with _atomic_dir(out) as tmp:
        save_file(mapper, str(tmp / "clipcap_mapper.safetensors"), metadata={"format": "pt"})
        model.save_pretrained(tmp / "gpt2", safe_serialization=True)
    return ClipCapReport(
        source=source,
        mapper=out / "clipcap_mapper.safetensors",
        gpt2=out / "gpt2",
        mapper_keys=len(mapper),
        gpt2_keys=gpt_keys,
        dropped=dropped,
        gpt2_config={k: getattr(config, k) for k in _GPT2_FIELDS},
    )
