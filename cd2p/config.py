"""Typed recipes: dataclasses loaded from YAML, overridden with ``--set section.key=value``.

A recipe has the sections every run uses (``model``, ``data``, ``optim``, ``schedule``,
``run``) and one section of settings per kind of run: ``pretrain`` for pre-training, and the
section its task declares in the task table (:mod:`cd2p.tasks`) for fine-tuning (``finetune``
for classification and part segmentation, ``segmentation`` for scene segmentation). A saved
``recipe.yaml`` holds only the sections its task uses. Every key is checked: an unknown key is
an error that suggests the closest valid name, and every value is converted to its field's
type (``1e-3`` is a float, ``null`` is None).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from cd2p._atomic import atomic_write_text
from cd2p._resources import recipe_path

T = TypeVar("T")

Objective = Literal[
    "distill", "distill-no-concept", "distill-clip", "distill+clip", "mae", "mae+distill"
]


class RecipeError(ValueError):
    """A recipe that cannot be used as written (unknown key, wrong type, bad value)."""


@dataclass
class ModelConfig:
    """The student backbone (docs/method.md#backbone)."""

    dim: int = 384
    depth: int = 12
    num_heads: int = 6
    num_groups: int = 64
    group_size: int = 32
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1

    def backbone_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`cd2p.Cd2pBackbone`."""
        return dataclasses.asdict(self)


@dataclass
class DataConfig:
    """Where the data is and how batches are made."""

    path: str | None = None
    num_points: int = 4096
    batch_size: int = 128
    num_workers: int = 4
    # Pre-training: read every pair into memory once instead of from the memory-mapped files
    # (100 k pairs of 4096 points take 4.9 GB as float32).
    in_memory: bool = False
    # Point-MAE's PointcloudScaleAndTranslate: per-axis scale in [low, high], shift in +-translate.
    scale_low: float = 2.0 / 3.0
    scale_high: float = 1.5
    translate: float = 0.2


@dataclass
class OptimConfig:
    """Optimizer settings."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 10.0
    # Gradient accumulation: every optimiser step sums the gradients of this many micro-batches
    # of data.batch_size / (processes x accumulate_steps) samples, so data.batch_size stays the
    # batch of one update (the same update as one large batch; BatchNorm statistics excepted).
    accumulate_steps: int = 1


@dataclass
class ScheduleConfig:
    """Per-step linear warm-up then cosine decay; lengths in epochs unless ``max_steps``."""

    epochs: int = 250
    warmup_epochs: int = 10
    min_lr: float = 1e-6
    max_steps: int | None = None


@dataclass
class RunConfig:
    """How a run executes and what it records."""

    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch.compile the network (not the step around it) in place; the mode is torch's:
    # "reduce-overhead" captures CUDA graphs, "max-autotune" also tunes the kernels.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    log_every: int = 10
    checkpoint_every: int = 500
    # Keep only the newest N checkpoints in RUN/checkpoints (null: keep all).
    keep_checkpoints: int | None = 2
    # Run the task's evaluation every N epochs (and at the end); unused by pre-training.
    eval_every: int = 1
    # Experiment trackers fed with every logged metric, on rank 0 (optional extras):
    # "tensorboard" (RUN/tensorboard/) and "wandb" (Weights & Biases; WANDB_MODE=offline
    # works without a network, RUN/wandb/).
    loggers: tuple[Literal["tensorboard", "wandb"], ...] = ()
    # The W&B project runs are logged to (the run is named after its directory).
    wandb_project: str = "cd2p"


@dataclass
class PretrainConfig:
    """The pre-training objective (docs/method.md#objectives)."""

    objective: Objective = "distill"
    num_concepts: int = 32
    # distill+clip: weight of the CLIP-embedding loss (1 - cosine) added to the prefix MSE.
    clip_weight: float = 1.0
    mask_ratio: float = 0.6
    decoder_depth: int = 4
    # "stored": read targets written by `cd2p prepare teacher`; "on-the-fly": run the teacher.
    targets: Literal["stored", "on-the-fly"] = "stored"
    clip_weights: str | None = None
    clipcap_weights: str | None = None
    # On-the-fly targets from a seeded RANDOM teacher (not CLIP): tests and offline demos only.
    random_teacher: bool = False


@dataclass
class FinetuneConfig:
    """Fine-tuning on the object benchmarks: classification and part segmentation
    (docs/method.md#benchmarks).

    The number of classes / parts comes from the prepared dataset.
    """

    # Splits of the prepared dataset to train on and to select the best model on.
    train_split: str = "train"
    val_split: str = "test"
    label_smoothing: float = 0.0
    # Classification head (Point-MAE): hidden widths and dropout.
    head_channels: tuple[int, ...] = (256, 256)
    head_dropout: float = 0.5
    # Part segmentation: 1-based blocks read (null: depth/3-spaced, 4, 8, 12 for depth 12),
    # per-point MLP after interpolation, head widths, category-embedding width.
    feature_blocks: tuple[int, ...] | None = None
    propagation_channels: tuple[int, ...] = (1536, 1024)
    seg_head_channels: tuple[int, ...] = (512, 256)
    label_channels: int = 64
    # Each training view draws data.num_points from the first resample_ratio x num_points
    # FPS points (Point-MAE: 1200 -> 1024).
    resample_ratio: float = 1.2
    # Views averaged by the final evaluation with voting (re-sampled, scaled, translated).
    votes: int = 10
    eval_batch_size: int = 32
    # Frozen backbone + linear classifier on max/mean-pooled tokens instead of fine-tuning.
    linear_probe: bool = False
    # Few-shot classification: train on K shapes per class of train_split, drawn with run.seed
    # (null: the whole split). Works with fine-tuning and with linear_probe.
    few_shot: int | None = None
    # Point-BERT's N-way K-shot protocol: with few_shot_way N, an episode of N classes drawn
    # with run.seed (fold few_shot_fold): few_shot (K) training shapes of each, and the model is
    # selected and evaluated on few_shot_queries shapes of each from val_split.
    few_shot_way: int | None = None
    few_shot_fold: int = 0
    few_shot_queries: int = 20


@dataclass
class SegmentationConfig:
    """ScanNet scene segmentation (docs/method.md#scene-segmentation).

    Every training item is a fresh random draw of ``data.num_points`` vertices of a scene,
    rotated about z, scaled and flipped, then centred; evaluation covers every vertex.
    """

    train_split: str = "train"
    val_split: str = "val"
    label_smoothing: float = 0.0
    # Feed the vertex colours (RGB scaled to [-1, 1]) to the head beside the coordinates.
    use_color: bool = False
    # Widths of the two per-point 1-D convolution blocks before the classifier, and dropout.
    head_channels: tuple[int, ...] = (256, 256)
    head_dropout: float = 0.5
    # Augmentation of each training draw: rotation about z in [-rotate, rotate] radians,
    # isotropic scale in [scale_low, scale_high], mirror in x and in y with probability 0.5.
    rotate: float = 3.141592653589793
    scale_low: float = 0.8
    scale_high: float = 1.2
    flip: bool = True
    # Whole-scene evaluation: every vertex is scored this many times (rounds of disjoint
    # draws covering the scene); per-vertex class probabilities are summed.
    votes: int = 3
    eval_batch_size: int = 8


@dataclass
class DetectionConfig:
    """3D object detection on ScanNet: 3DETR with the cd2p encoder (docs/method.md#detection).

    Defaults are 3DETR's ScanNet settings (its ``main.py`` and ``scripts/scannet_ep1080.sh``).
    """

    train_split: str = "train"
    val_split: str = "val"
    # The decoder: queries (FPS over the encoder centers), layers, width, heads, FFN, dropout;
    # dropout of the box heads.
    num_queries: int = 256
    decoder_depth: int = 8
    decoder_dim: int = 256
    decoder_heads: int = 4
    decoder_ffn_dim: int = 256
    decoder_dropout: float = 0.1
    mlp_dropout: float = 0.3
    # Hungarian matching costs and loss weights ("no object" class weight in the class loss).
    cost_class: float = 1.0
    cost_giou: float = 2.0
    cost_center: float = 0.0
    cost_objectness: float = 0.0
    weight_cls: float = 1.0
    weight_giou: float = 1.0
    weight_center: float = 5.0
    weight_size: float = 1.0
    no_object_weight: float = 0.25
    # Augmentation of every training draw: a random cuboid crop keeping at least
    # crop_min_points vertices and the boxes whose centre stays inside, data.num_points of the
    # vertices, mirrors in x and y, rotation about z within +-rotate radians (boxes become the
    # axis-aligned hull of the rotated box).
    crop: bool = True
    crop_min_points: int = 30_000
    flip: bool = True
    rotate: float = 0.08726646259971647  # 5 degrees
    # Evaluation follows 3DETR's protocol exactly (3D NMS at 0.25 within a class, objectness
    # above 0.05, boxes holding fewer than 5 points dropped); only its batch size is a setting.
    eval_batch_size: int = 8


# Sections that hold one kind of run's settings; the other sections are common to all runs.
TASK_SECTIONS = ("pretrain", "finetune", "segmentation", "detection")
COMMON_SECTIONS = ("task", "description", "model", "data", "optim", "schedule", "run")


@dataclass
class Recipe:
    """A complete run description; saved as ``recipe.yaml`` next to every run's outputs.

    ``task`` is ``pretrain`` or a task of the task table (:func:`cd2p.tasks.task_names`).
    """

    task: str = "pretrain"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)

    def __post_init__(self) -> None:
        valid = run_kinds()
        if self.task not in valid:
            raise RecipeError(
                f"recipe.task must be one of {', '.join(map(repr, valid))}, got {self.task!r}"
                + _suggest(str(self.task), valid)
            )


def run_kinds() -> tuple[str, ...]:
    """What ``recipe.task`` may say: ``pretrain`` and every task of the task table."""
    from cd2p.tasks import task_names  # the table lists names without importing any task

    return ("pretrain", *task_names())


def task_section(task: str) -> str:
    """The recipe section holding the settings of ``task`` (``pretrain`` or a table task)."""
    if task == "pretrain":
        return "pretrain"
    from cd2p.tasks import get_task

    return get_task(task).recipe_section


def used_sections(task: str) -> tuple[str, ...]:
    """The recipe sections a run of ``task`` reads, in the order a recipe lists them."""
    return (*COMMON_SECTIONS, task_section(task))


# -- conversion ------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(name: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits no type")
    if origin is Literal:
        if value not in args:
            raise RecipeError(
                f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}"
                + (_suggest(str(value), [str(a) for a in args]) if isinstance(value, str) else "")
            )
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where} must be a mapping of keys, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise RecipeError(f"{where} must have {len(args)} items, got {len(value)}")
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in pairs)
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{where} must be a string, got {value!r}")
    raise RecipeError(f"{where}: unsupported field type {tp!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "recipe") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and converting types."""
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise RecipeError(f"unknown key {key!r} in {where}{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A recipe (or section) as plain YAML-ready data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def apply_overrides(recipe: Recipe, overrides: Iterable[str]) -> Recipe:
    """Apply ``section.key=value`` strings (values parsed as YAML, then type-checked)."""
    data = to_dict(recipe)
    touched: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node: Any = data
        cls: Any = Recipe
        for depth, part in enumerate(parts):
            hints = _field_types(cls)
            if part not in hints:
                where = ".".join(parts[:depth]) or "recipe"
                raise RecipeError(
                    f"unknown key {part!r} in {where} (from --set {item}){_suggest(part, hints)}"
                )
            if depth == len(parts) - 1:
                node[part] = yaml.safe_load(raw) if raw.strip() else ""
                touched.setdefault(parts[0], item)
            else:
                if not dataclasses.is_dataclass(hints[part]):
                    raise RecipeError(f"{'.'.join(parts[: depth + 1])} is a value, not a section")
                node, cls = node[part], hints[part]
    recipe = from_dict(Recipe, data)
    used = used_sections(recipe.task)
    for section, item in touched.items():
        if section in TASK_SECTIONS and section not in used:
            raise RecipeError(
                f"--set {item}: section {section!r} is not read by task {recipe.task!r}, whose "
                f"settings are in section {task_section(recipe.task)!r}"
            )
    return recipe


# Settings that a resumed run may change (``cd2p pretrain|finetune --resume RUN --set ...``):
# the length of the run, what it records and how it runs. Everything else would make the steps
# already taken and the steps to come belong to two different runs.
RESUMABLE_KEYS = (
    "schedule.epochs",
    "schedule.max_steps",
    "data.num_workers",
    "run.device",
    "run.compile",
    "run.log_every",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.eval_every",
    "run.loggers",
    "run.wandb_project",
)
# Settings of the final evaluation only (after training): a resumed run may change them too.
RESUMABLE_TASK_KEYS = ("votes", "eval_batch_size")


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def resume_changes(saved: Recipe, new: Recipe) -> list[str]:
    """The settings ``new`` changes in a run saved with ``saved`` (``"key: old -> new"``).

    Raises :class:`RecipeError` naming the first change a resumed run cannot make, and why:
    only the run's length (``schedule.epochs``, ``schedule.max_steps``), what it records and
    how it runs (:data:`RESUMABLE_KEYS`), and the final evaluation's ``votes`` /
    ``eval_batch_size`` may change.
    """
    before, after = _flat(to_dict(saved)), _flat(to_dict(new))
    section = task_section(saved.task)
    allowed = set(RESUMABLE_KEYS) | {f"{section}.{k}" for k in RESUMABLE_TASK_KEYS}
    changes = []
    for key in before:
        if before[key] == after.get(key):
            continue
        if key not in allowed:
            raise RecipeError(
                f"--set {key}: a resumed run cannot change {key} ({before[key]!r} -> "
                f"{after.get(key)!r}): the steps already taken used {before[key]!r}, so the "
                "run would no longer be one run. A resumed run may change only "
                + ", ".join(sorted(allowed))
                + "; start a new run for anything else (e.g. --init RUN/model)"
            )
        changes.append(f"{key}: {before[key]!r} -> {after.get(key)!r}")
    return changes


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read a YAML recipe (a path or a shipped name such as ``pretrain-scannet``)."""
    resolved = recipe_path(path)
    try:
        data = yaml.safe_load(resolved.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{resolved} is not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise RecipeError(f"{resolved} must hold a mapping of sections, got {type(data).__name__}")
    try:
        recipe = from_dict(Recipe, data, "recipe")
        check_sections(recipe, data)
    except RecipeError as exc:
        raise RecipeError(f"{resolved}: {exc}") from None
    return apply_overrides(recipe, overrides)


def check_sections(recipe: Recipe, written: Mapping[str, Any]) -> None:
    """Refuse a section that the recipe's task does not read (its settings would be ignored
    silently). A section equal to its defaults is accepted: older cd2p saved every section."""
    used = used_sections(recipe.task)
    defaults = Recipe(task=recipe.task)
    for name in TASK_SECTIONS:
        if name in written and name not in used and getattr(recipe, name) != getattr(
            defaults, name
        ):
            raise RecipeError(
                f"section {name!r} is not read by task {recipe.task!r}, whose settings are in "
                f"section {task_section(recipe.task)!r}"
            )


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML text: the common sections and its task's own section only."""
    data = to_dict(recipe)
    used = used_sections(recipe.task)
    return yaml.safe_dump({k: v for k, v in data.items() if k in used}, sort_keys=False)


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write ``recipe`` as YAML atomically (temporary file, then rename)."""
    path = Path(path)
    atomic_write_text(path, dump_recipe(recipe))
    return path
