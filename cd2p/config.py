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

import contextlib
import dataclasses
import difflib
import math
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


@dataclass(frozen=True)
class Bounds:
    """The range a number (or each number of a tuple) must lie in; ``None`` is always allowed
    where the field's type admits it. ``low`` / ``high`` are inclusive, ``above`` / ``below``
    exclusive."""

    low: float | None = None
    above: float | None = None
    below: float | None = None
    high: float | None = None

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value`` (``"must be >= 1"``), or ``None`` when it fits."""
        if self.low is not None and value < self.low:
            return f"must be >= {_number(self.low)}"
        if self.above is not None and value <= self.above:
            return f"must be > {_number(self.above)}"
        if self.below is not None and value >= self.below:
            return f"must be < {_number(self.below)}"
        if self.high is not None and value > self.high:
            return f"must be <= {_number(self.high)}"
        return None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _check_range(low: float, high: float, low_name: str, high_name: str) -> None:
    if low > high:
        raise RecipeError(f"{low_name} ({low}) must not exceed {high_name} ({high})")


def bounded(
    default: Any,
    *,
    low: float | None = None,
    above: float | None = None,
    below: float | None = None,
    high: float | None = None,
) -> Any:
    """A dataclass field whose value (or every item of its tuple) is checked against
    :class:`Bounds` whenever a recipe is read or overridden."""
    return field(default=default, metadata={"bounds": Bounds(low, above, below, high)})


def _check_bounds(cls: type, name: str, value: Any, where: str) -> None:
    """Raise :class:`RecipeError` when field ``name`` of ``cls`` is outside its bounds."""
    spec = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    bounds = spec.metadata.get("bounds") if spec is not None else None
    if bounds is None or value is None:
        return
    items = value if isinstance(value, tuple | list) else (value,)
    for item in items:
        problem = bounds.problem(item)
        if problem:
            got = f"{value!r}" if items is value else repr(item)
            raise RecipeError(f"{where} {problem}, got {got}")


@dataclass
class ModelConfig:
    """The student backbone (docs/method.md#backbone)."""

    dim: int = bounded(384, low=1)
    depth: int = bounded(12, low=1)
    num_heads: int = bounded(6, low=1)
    num_groups: int = bounded(64, low=1)
    group_size: int = bounded(32, low=1)
    mlp_ratio: float = bounded(4.0, above=0)
    drop_path_rate: float = bounded(0.1, low=0, below=1)

    def backbone_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`cd2p.Cd2pBackbone`."""
        return dataclasses.asdict(self)

    def check(self, where: str = "model") -> None:
        """Attention splits ``dim`` evenly over the heads."""
        if self.dim % self.num_heads:
            raise RecipeError(
                f"{where}.num_heads ({self.num_heads}) must divide {where}.dim ({self.dim})"
            )


@dataclass
class DataConfig:
    """Where the data is and how batches are made."""

    path: str | None = None
    num_points: int = bounded(4096, low=1)
    batch_size: int = bounded(128, low=1)
    num_workers: int = bounded(4, low=0)
    # Pre-training: read every pair into memory once instead of from the memory-mapped files
    # (100 k pairs of 4096 points take 4.9 GB as float32).
    in_memory: bool = False
    # Point-MAE's PointcloudScaleAndTranslate: per-axis scale in [low, high], shift in +-translate.
    scale_low: float = bounded(2.0 / 3.0, above=0)
    scale_high: float = bounded(1.5, above=0)
    translate: float = bounded(0.2, low=0)

    def check(self, where: str = "data") -> None:
        """The scale range is not empty."""
        _check_range(self.scale_low, self.scale_high, f"{where}.scale_low", f"{where}.scale_high")


@dataclass
class OptimConfig:
    """Optimizer settings."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = bounded(1e-3, above=0)
    weight_decay: float = bounded(0.05, low=0)
    betas: tuple[float, float] = bounded((0.9, 0.999), low=0, below=1)
    grad_clip: float | None = bounded(10.0, above=0)
    # Gradient accumulation: every optimiser step sums the gradients of this many micro-batches
    # of data.batch_size / (processes x accumulate_steps) samples, so data.batch_size stays the
    # batch of one update (the same update as one large batch; BatchNorm statistics excepted).
    accumulate_steps: int = bounded(1, low=1)


@dataclass
class ScheduleConfig:
    """Per-step linear warm-up then cosine decay; lengths in epochs unless ``max_steps``."""

    epochs: int = bounded(250, low=1)
    warmup_epochs: int = bounded(10, low=0)
    min_lr: float = bounded(1e-6, low=0)
    max_steps: int | None = bounded(None, low=1)


@dataclass
class RunConfig:
    """How a run executes and what it records."""

    seed: int = bounded(0, low=0)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch.compile the network (not the step around it) in place; the mode is torch's:
    # "reduce-overhead" captures CUDA graphs, "max-autotune" also tunes the kernels.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    log_every: int = bounded(10, low=1)
    checkpoint_every: int = bounded(500, low=1)
    # Keep only the newest N checkpoints in RUN/checkpoints (null: keep all).
    keep_checkpoints: int | None = bounded(2, low=1)
    # Run the task's evaluation every N epochs (and at the end); unused by pre-training.
    eval_every: int = bounded(1, low=1)
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
    num_concepts: int = bounded(32, low=1)
    # distill+clip: weight of the CLIP-embedding loss (1 - cosine) added to the prefix MSE.
    clip_weight: float = bounded(1.0, low=0)
    mask_ratio: float = bounded(0.6, low=0, below=1)
    decoder_depth: int = bounded(4, low=1)
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
    label_smoothing: float = bounded(0.0, low=0, below=1)
    # Classification head (Point-MAE): hidden widths and dropout.
    head_channels: tuple[int, ...] = bounded((256, 256), low=1)
    head_dropout: float = bounded(0.5, low=0, below=1)
    # Part segmentation: 1-based blocks read (null: depth/3-spaced, 4, 8, 12 for depth 12),
    # per-point MLP after interpolation, head widths, category-embedding width.
    feature_blocks: tuple[int, ...] | None = bounded(None, low=1)
    propagation_channels: tuple[int, ...] = bounded((1536, 1024), low=1)
    seg_head_channels: tuple[int, ...] = bounded((512, 256), low=1)
    label_channels: int = bounded(64, low=1)
    # Each training view draws data.num_points from the first resample_ratio x num_points
    # FPS points (Point-MAE: 1200 -> 1024).
    resample_ratio: float = bounded(1.2, low=1)
    # Views averaged by the final evaluation with voting (re-sampled, scaled, translated).
    votes: int = bounded(10, low=1)
    eval_batch_size: int = bounded(32, low=1)
    # Frozen backbone + linear classifier on max/mean-pooled tokens instead of fine-tuning.
    linear_probe: bool = False
    # Few-shot classification: train on K shapes per class of train_split, drawn with run.seed
    # (null: the whole split). Works with fine-tuning and with linear_probe.
    few_shot: int | None = bounded(None, low=1)
    # Point-BERT's N-way K-shot protocol: with few_shot_way N, an episode of N classes drawn
    # with run.seed (fold few_shot_fold): few_shot (K) training shapes of each, and the model is
    # selected and evaluated on few_shot_queries shapes of each from val_split.
    few_shot_way: int | None = bounded(None, low=2)
    few_shot_fold: int = bounded(0, low=0)
    few_shot_queries: int = bounded(20, low=1)


@dataclass
class SegmentationConfig:
    """ScanNet scene segmentation (docs/method.md#scene-segmentation).

    Every training item is a fresh random draw of ``data.num_points`` vertices of a scene,
    rotated about z, scaled and flipped, then centred; evaluation covers every vertex.
    """

    train_split: str = "train"
    val_split: str = "val"
    label_smoothing: float = bounded(0.0, low=0, below=1)
    # Feed the vertex colours (RGB scaled to [-1, 1]) to the head beside the coordinates.
    use_color: bool = False
    # Widths of the two per-point 1-D convolution blocks before the classifier, and dropout.
    head_channels: tuple[int, ...] = bounded((256, 256), low=1)
    head_dropout: float = bounded(0.5, low=0, below=1)
    # Augmentation of each training draw: rotation about z in [-rotate, rotate] radians,
    # isotropic scale in [scale_low, scale_high], mirror in x and in y with probability 0.5.
    rotate: float = bounded(3.141592653589793, low=0)
    scale_low: float = bounded(0.8, above=0)
    scale_high: float = bounded(1.2, above=0)
    flip: bool = True
    # Whole-scene evaluation: every vertex is scored this many times (rounds of disjoint
    # draws covering the scene); per-vertex class probabilities are summed.
    votes: int = bounded(3, low=1)
    eval_batch_size: int = bounded(8, low=1)

    def check(self, where: str = "segmentation") -> None:
        """The scale range is not empty."""
        _check_range(self.scale_low, self.scale_high, f"{where}.scale_low", f"{where}.scale_high")


@dataclass
class DetectionConfig:
    """3D object detection on ScanNet: 3DETR with the cd2p encoder (docs/method.md#detection).

    Defaults are 3DETR's ScanNet settings (its ``main.py`` and ``scripts/scannet_ep1080.sh``).
    """

    train_split: str = "train"
    val_split: str = "val"
    # The decoder: queries (FPS over the encoder centers), layers, width, heads, FFN, dropout;
    # dropout of the box heads.
    num_queries: int = bounded(256, low=1)
    decoder_depth: int = bounded(8, low=1)
    decoder_dim: int = bounded(256, low=1)
    decoder_heads: int = bounded(4, low=1)
    decoder_ffn_dim: int = bounded(256, low=1)
    decoder_dropout: float = bounded(0.1, low=0, below=1)
    mlp_dropout: float = bounded(0.3, low=0, below=1)
    # Hungarian matching costs and loss weights ("no object" class weight in the class loss).
    cost_class: float = bounded(1.0, low=0)
    cost_giou: float = bounded(2.0, low=0)
    cost_center: float = bounded(0.0, low=0)
    cost_objectness: float = bounded(0.0, low=0)
    weight_cls: float = bounded(1.0, low=0)
    weight_giou: float = bounded(1.0, low=0)
    weight_center: float = bounded(5.0, low=0)
    weight_size: float = bounded(1.0, low=0)
    no_object_weight: float = bounded(0.25, low=0)
    # Augmentation of every training draw: a random cuboid crop keeping at least
    # crop_min_points vertices and the boxes whose centre stays inside, data.num_points of the
    # vertices, mirrors in x and y, rotation about z within +-rotate radians (boxes become the
    # axis-aligned hull of the rotated box).
    crop: bool = True
    crop_min_points: int = bounded(30_000, low=1)
    flip: bool = True
    rotate: float = bounded(0.08726646259971647, low=0)  # 5 degrees
    # Evaluation follows 3DETR's protocol exactly (3D NMS at 0.25 within a class, objectness
    # above 0.05, boxes holding fewer than 5 points dropped); only its batch size is a setting.
    eval_batch_size: int = bounded(8, low=1)

    def check(self, where: str = "detection") -> None:
        """Attention splits the decoder width evenly over its heads."""
        if self.decoder_dim % self.decoder_heads:
            raise RecipeError(
                f"{where}.decoder_heads ({self.decoder_heads}) must divide "
                f"{where}.decoder_dim ({self.decoder_dim})"
            )


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

    def check(self, where: str = "recipe") -> None:
        """Rules between sections: what the task reads must fit the backbone."""
        section = task_section(self.task)
        if section == "finetune" and self.finetune.feature_blocks is not None:
            deepest = max(self.finetune.feature_blocks)
            if deepest > self.model.depth:
                raise RecipeError(
                    f"{where}.finetune.feature_blocks reads block {deepest}, but "
                    f"{where}.model.depth is {self.model.depth}"
                )
        if section == "detection" and self.detection.num_queries > self.model.num_groups:
            raise RecipeError(
                f"{where}.detection.num_queries ({self.detection.num_queries}) cannot exceed "
                f"{where}.model.num_groups ({self.model.num_groups}): queries are chosen among "
                "the encoder's patch centers"
            )

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
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise RecipeError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise RecipeError(f"{where} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{where} must be a string, got {value!r}")
    raise RecipeError(f"{where}: unsupported field type {tp!r}")


def coerce_value(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to type ``tp`` (as recipe values are), or :class:`RecipeError`
    naming ``where``; a type the recipes never use is accepted as it is."""
    try:
        return _coerce(value, tp, where)
    except RecipeError as exc:
        if "unsupported field type" in str(exc):
            return value
        raise


def check_fields(cls: type, values: Mapping[str, Any], where: str) -> None:
    """Check ``values`` against the types, bounds and rules of dataclass ``cls``'s fields
    (e.g. a :class:`cd2p.Cd2pBackbone`'s arguments against :class:`ModelConfig`)."""
    hints = _field_types(cls)
    known = {k: v for k, v in values.items() if k in hints}
    from_dict(cls, known, where)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "recipe") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and converting types."""
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise RecipeError(f"unknown key {key!r} in {where}{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
        _check_bounds(cls, key, kwargs[key], f"{where}.{key}" if where else key)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):  # rules between fields of one section
        check(where)
    return obj


def to_dict(obj: Any) -> Any:
    """A recipe (or section) as plain YAML-ready data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def _override_value(cls: type, name: str, raw: str, item: str, dotted: str) -> Any:
    """The value of ``--set dotted=raw`` (YAML), type- and range-checked at once, so that the
    error names the ``--set`` that caused it."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise RecipeError(f"--set {item}: {raw!r} is not a YAML value") from None
    try:
        checked = _coerce(value, _field_types(cls)[name], dotted)
        _check_bounds(cls, name, checked, dotted)
    except RecipeError as exc:
        raise RecipeError(f"--set {item}: {exc}") from None
    return value


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
                node[part] = _override_value(cls, part, raw, item, ".".join(parts))
                touched.setdefault(parts[0], item)
            else:
                if not dataclasses.is_dataclass(hints[part]):
                    raise RecipeError(f"{'.'.join(parts[: depth + 1])} is a value, not a section")
                node, cls = node[part], hints[part]
    try:
        recipe = from_dict(Recipe, data)
    except RecipeError as exc:  # a rule between fields, broken by the overrides together
        given = ", ".join(f"--set {item}" for item in overrides)
        raise RecipeError(f"{exc} (after {given})") from None
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
