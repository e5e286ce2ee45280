"""Converters from foreign checkpoints to cd2p's safe formats.

``convert_point_mae``: a Point-MAE or Point-BERT checkpoint -> the cd2p model that computes the
same outputs (docs/method.md#point-mae-compatibility), detected from the keys:

    source                                              cd2p model
    Point-MAE pre-trained (MAE_encoder.*)               Cd2pBackbone
    Point-BERT pre-trained (transformer_q.*)            Cd2pBackbone(patch_dim, class_token=True)
    a bare encoder (encoder.*, blocks.blocks.N.*, norm.*)  Cd2pBackbone
    Point-MAE fine-tuned classifier (cls_token,         Cd2pForClassification
        cls_pos, cls_head_finetune.* with BatchNorms)
    Point-BERT fine-tuned classifier (+ reduce_dim,     Cd2pForClassification(backbone with
        cls_head_finetune.* without BatchNorms)             patch_dim, head_norm=False)
    Point-MAE part segmentation (model_state_dict:      Cd2pForPartSegmentation
        label_conv.*, propagation_0.*, convs1.*)

The architectures match, so this is renaming (``blocks.blocks.N`` -> ``blocks.N``, the encoder
under ``backbone.`` in task models, heads to cd2p's head names). Every source key is accounted
for: renamed, or dropped because it takes no part in the source's outputs (decoders, mask
tokens, Point-BERT's momentum encoder, dVAE and pre-training heads) and listed. A key the
converter does not know, or a part cd2p does not compute (Point-BERT's DGCNN part-segmentation
head, a qkv projection with a bias, a patch encoder narrower than the transformer without
``reduce_dim``), refuses the conversion with the reason: a converted model computes what the
source computes, or there is none. Settings that the weights cannot tell (attention heads,
patches, points per cloud) come from the options, from the source's own config file
(``--config cfgs/....yaml``), or are assumed and named as such in the report and the card.

``convert_clipcap``: ClipCap's ``conceptual_weights.pt`` (pickled state dict) ->
``clipcap_mapper.safetensors`` (the ``clip_project.*`` MLP mapper) and ``gpt2/`` (a GPT-2
directory for ``transformers.GPT2LMHeadModel.from_pretrained``), without the legacy attention
mask buffers. Foreign files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file, save_model
from torch import nn

from cd2p._atomic import atomic_directory
from cd2p.hub import CONVERTED_FROM_KEY
from cd2p.models.hub import WEIGHTS_NAME

_BLOCK_KEY = re.compile(r"^blocks\.blocks\.(\d+)\.(.+)$")
_ENCODER_PARTS = ("encoder.", "pos_embed.", "norm.", "reduce_dim.")
# The settings that change a converted model's outputs but are not stored in the weights.
OUTPUT_SETTINGS = ("num_heads", "num_groups", "group_size", "num_points")
# Point-MAE's part-segmentation model reads the outputs of blocks 4, 8 and 12 (its fetch_idx
# [3, 7, 11], hard-coded in segmentation/models/pt.py).
POINT_MAE_PARTSEG_BLOCKS = (4, 8, 12)


@dataclass(frozen=True)
class Layout:
    """A source checkpoint layout: what it becomes and which of its keys take no part in its
    outputs.

    target: the cd2p model kind it becomes. head: the source's task head (``none`` for an
    encoder, ``cls_head_finetune`` for a classifier, ``propagation`` for Point-MAE's part
    segmentation). encoder_prefix: where the encoder's keys live. dropped: keys (or key
    prefixes, matched up to a ``.``) dropped and listed. defaults: the group settings assumed
    when neither an option nor a config file gives them, taken from ``defaults_from``.
    """

    name: str
    target: str
    head: str
    encoder_prefix: str
    dropped: tuple[str, ...]
    defaults: dict[str, int]
    defaults_from: str


POINT_MAE_PRETRAINED = Layout(
    "point-mae (pre-trained)", "backbone", "none", "MAE_encoder.",
    ("mask_token", "decoder_pos_embed", "MAE_decoder", "increase_dim"),
    {"num_heads": 6, "num_groups": 64, "group_size": 32}, "Point-MAE's cfgs/pretrain.yaml",
)  # fmt: skip
POINT_BERT_PRETRAINED = Layout(
    "point-bert (pre-trained)", "backbone", "none", "transformer_q.",
    ("transformer_k", "dvae", "queue", "queue_ptr", "transformer_q.mask_token",
     "transformer_q.lm_head", "transformer_q.cls_head"),
    {"num_heads": 6, "num_groups": 64, "group_size": 32},
    "Point-BERT's cfgs/Mixup_models/Point-BERT.yaml",
)  # fmt: skip
ENCODER = Layout(
    "point-mae / point-bert encoder", "backbone", "none", "", (),
    {"num_heads": 6, "num_groups": 64, "group_size": 32}, "Point-MAE's cfgs/pretrain.yaml",
)  # fmt: skip
POINT_MAE_CLASSIFIER = Layout(
    "point-mae (fine-tuned classifier)", "classification", "cls_head_finetune", "", (),
    {"num_heads": 6, "num_groups": 64, "group_size": 32, "num_points": 1024},
    "Point-MAE's cfgs/finetune_modelnet.yaml (its ScanObjectNN configs use 128 groups and "
    "2048 points)",
)  # fmt: skip
POINT_BERT_CLASSIFIER = Layout(
    "point-bert (fine-tuned classifier)", "classification", "cls_head_finetune", "", (),
    {"num_heads": 6, "num_groups": 64, "group_size": 32, "num_points": 1024},
    "Point-BERT's cfgs/ModelNet_models/PointTransformer.yaml",
)  # fmt: skip
POINT_MAE_PARTSEG = Layout(
    "point-mae (part segmentation)", "partseg", "propagation", "", (),
    {"num_heads": 6, "num_groups": 128, "group_size": 32, "num_points": 2048},
    "Point-MAE's segmentation/models/pt.py and main.py, where they are hard-coded",
)  # fmt: skip


@dataclass
class ConversionReport:
    """What a conversion kept, renamed and dropped, and where every setting came from.

    target: the cd2p model kind written (``backbone``, ``classification``, ``partseg``).
    settings: name -> ``{"value", "source"}`` for the settings not stored in the weights.
    assumed: the output-changing settings that no option or config file gave.
    """

    source: Path
    out: Path
    layout: str
    target: str = "backbone"
    config: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    assumed: list[str] = field(default_factory=list)
    kept: int = 0
    dropped: list[str] = field(default_factory=list)
    dropped_summary: list[str] = field(default_factory=list)
    sha256: str = ""
    notes: list[str] = field(default_factory=list)


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


# Containers the projects save their weights in: Point-MAE / Point-BERT ``{"base_model": ...}``,
# Point-MAE's part segmentation ``{"model_state_dict": ...}``, and the usual others.
_CONTAINERS = ("base_model", "model_state_dict", "model", "state_dict")


def _state_dict(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor state dict inside a Point-MAE / Point-BERT checkpoint, with the ``module.``
    (DDP) and ``base_model.`` prefixes removed as the projects' own loaders do."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    for key in _CONTAINERS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    bad = sorted(str(k) for k, v in checkpoint.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(
            f"{path}: the state dict holds non-tensor values (keys: {', '.join(bad[:10])}); "
            "expected {'base_model': {name: tensor}} or a flat {name: tensor} dict"
        )
    out = {}
    for key, value in checkpoint.items():
        key = key.replace("module.", "", 1) if key.startswith("module.") else key
        out[key.removeprefix("base_model.")] = value
    return out


def _has(state: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def detect_layout(state: Mapping[str, torch.Tensor], source: Path | str = "") -> Layout:
    """The :class:`Layout` of a state dict, or a ``ValueError`` saying why none fits."""
    if _has(state, "MAE_encoder.blocks.blocks."):
        return POINT_MAE_PRETRAINED
    if _has(state, "transformer_q.blocks.blocks."):
        return POINT_BERT_PRETRAINED
    if _has(state, "blocks.blocks."):
        if _has(state, "propagation_2.") or _has(state, "dgcnn_pro_"):
            raise ValueError(
                f"{source}: a Point-BERT part-segmentation model (DGCNN propagation over three "
                "levels of FPS centers, propagation_2.* / dgcnn_pro_*.*); cd2p's part "
                "segmentation is Point-MAE's head, so these outputs cannot be reproduced and "
                "the checkpoint is not converted"
            )
        if _has(state, "propagation_0.") and _has(state, "convs1."):
            return POINT_MAE_PARTSEG
        if _has(state, "cls_head_finetune."):
            return POINT_BERT_CLASSIFIER if _has(state, "reduce_dim.") else POINT_MAE_CLASSIFIER
        return ENCODER
    raise ValueError(
        f"{source}: no Point-MAE / Point-BERT encoder found: expected keys such as "
        "'MAE_encoder.blocks.blocks.0.attn.qkv.weight', 'transformer_q.blocks.blocks.0...' or "
        f"'blocks.blocks.0...'; first keys: {', '.join(list(state)[:5])}"
    )


# -- renaming ----------------------------------------------------------------------------------

_DROP = object()  # the key takes no part in the source's outputs

_PARTSEG_HEAD: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (re.compile(r"^label_conv\.0\.(.+)$"), lambda m: f"label_embed.0.{m[1]}"),
    (re.compile(r"^label_conv\.1\.(.+)$"), lambda m: f"label_embed.1.{m[1]}"),
    # PointNetFeaturePropagation: mlp_convs[i], mlp_bns[i] -> point_mlp's Conv, BN (ReLU).
    (re.compile(r"^propagation_0\.mlp_convs\.(\d+)\.(.+)$"),
     lambda m: f"propagation.{3 * int(m[1])}.{m[2]}"),
    (re.compile(r"^propagation_0\.mlp_bns\.(\d+)\.(.+)$"),
     lambda m: f"propagation.{3 * int(m[1]) + 1}.{m[2]}"),
    # convs1 - bns1 - ReLU - dp1 - convs2 - bns2 - ReLU - convs3
    (re.compile(r"^convs1\.(.+)$"), lambda m: f"head.0.{m[1]}"),
    (re.compile(r"^bns1\.(.+)$"), lambda m: f"head.1.{m[1]}"),
    (re.compile(r"^convs2\.(.+)$"), lambda m: f"head.4.{m[1]}"),
    (re.compile(r"^bns2\.(.+)$"), lambda m: f"head.5.{m[1]}"),
    (re.compile(r"^convs3\.(.+)$"), lambda m: f"head.7.{m[1]}"),
)  # fmt: skip


def _is_dropped(layout: Layout, key: str) -> bool:
    return any(key == d or key.startswith(d + ".") for d in layout.dropped)


def rename_key(layout: Layout, key: str) -> str | object | None:
    """The cd2p name of a source key, ``_DROP`` for a key that takes no part in the outputs,
    or ``None`` for a key the converter does not know."""
    if _is_dropped(layout, key):
        return _DROP
    if layout.head == "cls_head_finetune":
        head = re.match(r"^cls_head_finetune\.(.+)$", key)
        if head:
            return f"head.{head[1]}"
    if layout.head == "propagation":
        for pattern, name in _PARTSEG_HEAD:
            match = pattern.match(key)
            if match:
                return name(match)
    if not key.startswith(layout.encoder_prefix):
        return None
    rest = key[len(layout.encoder_prefix) :]
    into = _encoder_into(layout)
    block = _BLOCK_KEY.match(rest)
    if block:
        return f"{into}blocks.{block[1]}.{block[2]}"
    if rest.startswith(_ENCODER_PARTS):
        return into + rest
    if rest in ("cls_token", "cls_pos"):
        # A fine-tuned classifier's class token, or the one Point-BERT's pre-trained encoder
        # prepends: top-level names in both cd2p models.
        return rest
    return None


def _encoder_into(layout: Layout) -> str:
    """Where the encoder's weights go: the model itself (a backbone) or its ``backbone.``."""
    return "" if layout.head == "none" else "backbone."


def rename_state(
    layout: Layout, state: Mapping[str, torch.Tensor], source: Path | str = ""
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every key renamed to cd2p's; returns ``(renamed, dropped keys)``. Unknown keys refuse
    the conversion (their effect on the outputs is unknown)."""
    renamed: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in state.items():
        new = rename_key(layout, key)
        if new is _DROP:
            dropped.append(key)
        elif new is None:
            unknown.append(key)
        else:
            renamed[str(new)] = value
    if unknown:
        raise ValueError(
            f"{source} ({layout.name}): keys with no counterpart in cd2p: "
            f"{', '.join(summarise_keys(unknown)[:10])}; cd2p cannot reproduce what they "
            "compute, so the checkpoint is not converted"
        )
    return renamed, dropped


# -- architecture from the weights ---------------------------------------------------------------


def infer_backbone_config(
    state: Mapping[str, torch.Tensor], prefix: str = "", source: Path | str = ""
) -> dict[str, Any]:
    """``dim``, ``depth``, ``mlp_ratio`` (and Point-BERT's ``patch_dim`` / ``class_token``)
    from the shapes of renamed (cd2p) backbone weights under ``prefix``."""
    try:
        dim = int(state[prefix + "pos_embed.2.weight"].shape[0])
        hidden = int(state[prefix + "blocks.0.mlp.fc1.weight"].shape[0])
        patch_out = int(state[prefix + "encoder.second_conv.3.weight"].shape[0])
    except KeyError as exc:
        raise ValueError(
            f"{source}: encoder weight {exc.args[0]!r} is missing from the checkpoint"
        ) from None
    config: dict[str, Any] = {}
    reduce = state.get(prefix + "reduce_dim.weight")
    if reduce is not None:
        if tuple(reduce.shape) != (dim, patch_out):
            raise ValueError(
                f"{source}: reduce_dim maps {tuple(reduce.shape[::-1])} but the patch encoder "
                f"outputs {patch_out} channels and the transformer is {dim} wide"
            )
        config["patch_dim"] = patch_out
    elif patch_out != dim:
        raise ValueError(
            f"{source}: the patch encoder outputs {patch_out} channels but the transformer is "
            f"{dim} wide, with no reduce_dim projection between them; cd2p cannot reproduce "
            "such a model"
        )
    if any(k.startswith(prefix + "blocks.") and k.endswith(".attn.qkv.bias") for k in state):
        raise ValueError(
            f"{source}: the attention's qkv projection has a bias (qkv_bias=True); cd2p's has "
            "none, as Point-MAE's and Point-BERT's, so its outputs cannot be reproduced"
        )
    indices = sorted({int(k[len(prefix) :].split(".")[1]) for k in state
                      if k.startswith(prefix + "blocks.")})  # fmt: skip
    if indices != list(range(len(indices))):
        raise ValueError(f"{source}: transformer blocks are not numbered 0..N-1: {indices}")
    if prefix == "" and "cls_token" in state:
        config["class_token"] = True
    return {"dim": dim, "depth": len(indices), "mlp_ratio": hidden / dim, **config}


def _classifier_head(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``num_classes``, ``head_channels`` and ``head_norm`` of a renamed ``head.*``."""
    linears = sorted(
        (int(k.split(".")[1]), v) for k, v in state.items()
        if k.startswith("head.") and k.endswith(".weight") and v.dim() == 2
    )  # fmt: skip
    if not linears:
        raise ValueError("the classification head cls_head_finetune.* has no Linear layer")
    norm = any(k.startswith("head.") and k.endswith("running_mean") for k in state)
    return {
        "num_classes": int(linears[-1][1].shape[0]),
        "head_channels": [int(w.shape[0]) for _, w in linears[:-1]],
        "head_norm": norm,
    }


def _partseg_head(state: Mapping[str, torch.Tensor], dim: int, depth: int, source: Path | str):
    """The sizes of Point-MAE's part-segmentation model, from its renamed weights."""
    if depth < max(POINT_MAE_PARTSEG_BLOCKS):
        raise ValueError(
            f"{source}: Point-MAE's part segmentation reads blocks 4, 8 and 12, but this encoder "
            f"has {depth} blocks"
        )
    label = state["label_embed.0.weight"]
    props = sorted((int(k.split(".")[1]), v) for k, v in state.items()
                   if k.startswith("propagation.") and k.endswith(".weight") and v.dim() == 3)
    first_in = int(props[0][1].shape[1]) if props else -1
    if first_in != 3 * dim + 3:
        raise ValueError(
            f"{source}: propagation_0 reads {first_in} channels; Point-MAE's head reads three "
            f"blocks of {dim} plus xyz ({3 * dim + 3})"
        )
    return {
        "num_parts": int(state["head.7.weight"].shape[0]),
        "num_categories": int(label.shape[1]),
        "label_channels": int(label.shape[0]),
        "propagation_channels": [int(w.shape[0]) for _, w in props],
        "head_channels": [int(state["head.0.weight"].shape[0]),
                          int(state["head.4.weight"].shape[0])],
        "feature_blocks": list(POINT_MAE_PARTSEG_BLOCKS),
    }  # fmt: skip


# -- settings the weights cannot tell --------------------------------------------------------------

# Keys of the projects' config files (their `model:` section, nested or not; `npoints` at the
# top) -> cd2p's names.
_CONFIG_KEYS = {
    "num_heads": "num_heads",
    "num_group": "num_groups",
    "group_size": "group_size",
    "drop_path_rate": "drop_path_rate",
    "trans_dim": "dim",
    "depth": "depth",
    "encoder_dims": "patch_out",
    "cls_dim": "num_classes",
}


def _find(tree: Any, key: str) -> Any:
    """The value of ``key`` in a nested mapping, breadth first (the ``model`` section before
    its ``transformer_config`` / ``dvae_config``)."""
    queue = [tree]
    while queue:
        node = queue.pop(0)
        if isinstance(node, Mapping):
            if key in node and not isinstance(node[key], Mapping):
                return node[key]
            queue.extend(v for v in node.values() if isinstance(v, Mapping))
    return None


def read_source_config(path: str | Path) -> dict[str, Any]:
    """The settings in a Point-MAE / Point-BERT config file (``cfgs/*.yaml``), in cd2p names:
    ``num_heads``, ``num_groups``, ``group_size``, ``num_points``, ``drop_path_rate`` and, to
    check that the file belongs to the checkpoint, ``dim``, ``depth``, ``patch_out``,
    ``num_classes``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    model = data.get("model") if isinstance(data, Mapping) else None
    if not isinstance(model, Mapping):
        raise ValueError(
            f"{path} has no 'model:' section: not a Point-MAE / Point-BERT config (cfgs/*.yaml)"
        )
    found = {ours: _find(model, theirs) for theirs, ours in _CONFIG_KEYS.items()}
    found["num_points"] = data.get("npoints")
    return {k: v for k, v in found.items() if v is not None}


def _check_config_matches(
    config_file: Path, found: Mapping[str, Any], facts: Mapping[str, Any]
) -> None:
    """The config must describe these weights: width, depth, patch width and classes."""
    for key, label in (("dim", "trans_dim"), ("depth", "depth"), ("patch_out", "encoder_dims"),
                       ("num_classes", "cls_dim")):  # fmt: skip
        if key in found and key in facts and int(found[key]) != int(facts[key]):
            raise ValueError(
                f"{config_file} says {label} {found[key]} but the checkpoint's weights have "
                f"{facts[key]}: the config file is not this checkpoint's"
            )


def resolve_settings(
    layout: Layout,
    options: Mapping[str, Any],
    config_file: str | Path | None,
    facts: Mapping[str, Any],
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each setting's value and source: an option, else the config file, else the layout's
    default (assumed). Returns ``(settings, assumed output-changing names)``."""
    found: dict[str, Any] = {}
    if config_file is not None:
        found = read_source_config(config_file)
        _check_config_matches(Path(config_file), found, facts)
    names = ["num_heads", "num_groups", "group_size", "drop_path_rate"]
    if "num_points" in layout.defaults:  # task models record the points they were trained on
        names.append("num_points")
    settings: dict[str, dict[str, Any]] = {}
    assumed: list[str] = []
    for name in names:
        if options.get(name) is not None:
            value, source = options[name], f"--{name.replace('_', '-')}"
        elif name in found:
            value, source = found[name], Path(config_file).name  # type: ignore[arg-type]
        elif name == "drop_path_rate":  # training only: it does not change the outputs
            value, source = 0.1, "default; it only affects training"
        else:
            value, source = layout.defaults[name], f"assumed: {layout.defaults_from}"
            assumed.append(name)
        settings[name] = {"value": float(value) if name == "drop_path_rate" else int(value),
                          "source": source}  # fmt: skip
    return settings, assumed


def _read_class_names(path: str | Path, count: int) -> list[str]:
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(names) != count:
        raise ValueError(f"{path} names {len(names)} classes but the classifier has {count}")
    return names


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out``, renamed to ``out`` when the block completes."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty")
    with atomic_directory(out) as tmp:
        yield tmp


def _build_target(
    layout: Layout,
    renamed: Mapping[str, torch.Tensor],
    backbone: dict[str, Any],
    settings: Mapping[str, dict[str, Any]],
    class_names: Sequence[str] | str | Path | None,
    source: Path,
) -> tuple[nn.Module, list[str]]:
    """The cd2p model of ``layout.target`` sized from the weights; returns it and notes."""
    notes: list[str] = []
    if layout.head == "none":
        from cd2p.models.backbone import Cd2pBackbone

        return Cd2pBackbone(**backbone), notes
    points = settings["num_points"]["value"]
    if layout.head == "cls_head_finetune":
        from cd2p.models.classification import Cd2pForClassification

        head = _classifier_head(renamed)
        names = None
        if class_names is not None:
            names = (list(class_names) if not isinstance(class_names, str | Path)
                     else _read_class_names(class_names, head["num_classes"]))  # fmt: skip
        return Cd2pForClassification(
            backbone=backbone, num_points=points, class_names=names, **head
        ), notes
    from cd2p.data.shapenetpart import STANDARD_PARTS
    from cd2p.models.partseg import Cd2pForPartSegmentation

    head = _partseg_head(renamed, backbone["dim"], backbone["depth"], source)
    extra: dict[str, Any] = {}
    if head["num_categories"] == len(STANDARD_PARTS) and head["num_parts"] == 50:
        extra = {"category_names": list(STANDARD_PARTS),
                 "category_parts": [list(p) for p in STANDARD_PARTS.values()]}  # fmt: skip
        notes.append(
            "16 categories and 50 parts: ShapeNetPart's categories and part ids assumed "
            "(PointNet's seg_classes, the table Point-MAE evaluates with)"
        )
    return Cd2pForPartSegmentation(backbone=backbone, num_points=points, **head, **extra), notes


def convert_point_mae(
    checkpoint: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    num_heads: int | None = None,
    num_groups: int | None = None,
    group_size: int | None = None,
    num_points: int | None = None,
    drop_path_rate: float | None = None,
    class_names: Sequence[str] | str | Path | None = None,
) -> ConversionReport:
    """Convert a Point-MAE / Point-BERT checkpoint into the cd2p model that computes the same
    outputs (a backbone, a classifier or a part segmenter; see the module docstring).

    Width, depth, MLP ratio, Point-BERT's ``reduce_dim`` / class token and the heads' sizes
    come from the weight shapes. ``num_heads``, ``num_groups``, ``group_size`` and
    ``num_points`` are not in the weights: given here, else read from the source's ``config``
    file (``cfgs/*.yaml``), else assumed from the layout's defaults and listed in
    ``report.assumed`` and in the card. ``class_names``: the classifier's classes (a list or a
    file with one name per line). The result loads with ``cd2p.from_pretrained(out)``.
    """
    source, out = Path(checkpoint), Path(out)
    state = _state_dict(load_foreign_checkpoint(source), source)
    layout = detect_layout(state, source)
    renamed, dropped = rename_state(layout, state, source)
    if layout.head == "propagation" and "label_embed.0.weight" in renamed:
        # Point-MAE's category embedding is a Conv1d(16, 64, 1) on a length-1 signal: the same
        # weights as cd2p's Linear(16, 64).
        renamed["label_embed.0.weight"] = renamed["label_embed.0.weight"].flatten(1)
    backbone = infer_backbone_config(renamed, _encoder_into(layout), source)
    facts: dict[str, Any] = {
        "dim": backbone["dim"],
        "depth": backbone["depth"],
        "patch_out": backbone.get("patch_dim", backbone["dim"]),
    }
    if layout.head == "cls_head_finetune":
        facts["num_classes"] = _classifier_head(renamed)["num_classes"]
    options = {"num_heads": num_heads, "num_groups": num_groups, "group_size": group_size,
               "num_points": num_points, "drop_path_rate": drop_path_rate}  # fmt: skip
    settings, assumed = resolve_settings(layout, options, config, facts)
    heads = settings["num_heads"]["value"]
    if backbone["dim"] % heads:
        raise ValueError(f"width {backbone['dim']} is not divisible by num_heads {heads}")
    backbone.update({k: settings[k]["value"] for k in ("num_heads", "num_groups", "group_size",
                                                       "drop_path_rate")})  # fmt: skip
    model, notes = _build_target(layout, renamed, backbone, settings, class_names, source)
    expected = model.state_dict()
    # Very old BatchNorm checkpoints lack the step counter; it does not affect outputs.
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in renamed:
            renamed[key] = torch.zeros_like(value)
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} ({layout.name}) does not map onto {type(model).__name__}: missing "
            f"{missing[:10]}, unexpected {unexpected[:10]}; cd2p cannot reproduce its outputs"
        )
    bad_shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in renamed.items()
        if v.shape != expected[k].shape
    ]
    if bad_shapes:
        raise ValueError(f"{source}: shape mismatches: {'; '.join(bad_shapes[:10])}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in renamed.items()}, strict=True)
    model.eval()
    report = ConversionReport(
        source=source,
        out=out,
        layout=layout.name,
        target=layout.target,
        config=dict(model._hub_mixin_config or {}),
        settings=settings,
        assumed=assumed,
        kept=len(renamed),
        dropped=dropped,
        dropped_summary=summarise_dropped(layout, dropped),
        sha256=_file_sha256(source),
        notes=notes,
    )
    provenance = {
        "file": source.name,
        "sha256": report.sha256,
        "layout": layout.name,
        "kept": report.kept,
        "dropped": report.dropped_summary,
        "settings": settings,
        "assumed": assumed,
        "notes": notes,
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


def summarise_dropped(layout: Layout, keys: list[str]) -> list[str]:
    """Dropped keys grouped by the part of the source they belong to (``transformer_k.* (150
    tensors)``, ``transformer_q.lm_head.* (2 tensors)``, ``mask_token``)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        part = next((d for d in layout.dropped if key == d or key.startswith(d + ".")), key)
        groups.setdefault(part, []).append(key)
    return [
        part if members == [part] else f"{part}.* ({len(members)} tensors)"
        for part, members in groups.items()
    ]


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
