"""Fine-tuning and evaluation on the object benchmarks: classification (ModelNet40,
ScanObjectNN) and part segmentation (ShapeNetPart), on the shared :class:`Trainer`.

``run_finetune`` builds :class:`~cd2p.models.classification.Cd2pForClassification` or
:class:`~cd2p.models.partseg.Cd2pForPartSegmentation` (from a pre-trained backbone, or from
scratch), trains it on a prepared dataset (``cd2p prepare modelnet40|scanobjectnn|
shapenetpart``), evaluates it on ``finetune.val_split`` every ``run.eval_every`` epochs,
exports the best model (by OA / instance mIoU) and finally evaluates that model with voting.
``run_linear_probe`` instead freezes the backbone and fits a linear classifier on its pooled
features. With ``finetune.few_shot: K`` either one trains on only K shapes per class
(:func:`few_shot_subset`). ``evaluate`` is what ``cd2p evaluate`` runs on any saved model.

Run directory::

    RUN/recipe.yaml     the recipe as run           RUN/metrics.jsonl  curves and evaluations
    RUN/run.json        task, data, init            RUN/checkpoints/   resumable state
    RUN/model/          the best model (from_pretrained), its card holds the final metrics
    RUN/metrics.json    final metrics of the best model (with and without voting)

Per-step randomness (which points of the FPS pool form the view, scale and translation)
comes from the trainer's step generator, so a resumed run sees the same views; voting views
come from generators seeded by ``(seed, shape index, vote)``, so the numbers of an evaluation
do not depend on the batch size or on the device order of the batches.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cd2p._atomic import atomic_directory, atomic_output, atomic_write_json
from cd2p.config import Recipe, load_recipe
from cd2p.data.modelnet40 import (
    CACHE_FORMAT as CLASSIFICATION_FORMAT,
)
from cd2p.data.modelnet40 import (
    ClassificationSplit,
    PointClassificationDataset,
    load_classification_cache,
    read_cache_meta,
)
from cd2p.data.shapenetpart import PartSegDataset, PartSegSplit, load_partseg_cache
from cd2p.engine import distributed as D
from cd2p.engine.augment import scale_and_translate, step_generator
from cd2p.engine.metrics import (
    PartSegMeter,
    category_part_mask,
    confusion_matrix,
    mean_class_accuracy,
    overall_accuracy,
    per_class_accuracy,
    restrict_to_category,
)
from cd2p.engine.trainer import RunResult, StepContext, Trainer, check_run_dir, seed_everything
from cd2p.models.backbone import Cd2pBackbone
from cd2p.models.classification import Cd2pForClassification
from cd2p.models.partseg import Cd2pForPartSegmentation

Task = Literal["classification", "partseg"]
TASKS: tuple[str, ...] = ("classification", "partseg")
MODEL_DIR = "model"
RUN_INFO = "run.json"
FINAL_METRICS = "metrics.json"
PROBE_DIR = "probe"
BEST_METRIC = {"classification": "oa", "partseg": "instance_miou"}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


# -- data ------------------------------------------------------------------------------------


def load_task_split(task: str, path: str | Path, split: str) -> ClassificationSplit | PartSegSplit:
    """One split of a prepared dataset of the task's kind."""
    _check_task(task)
    if task == "classification":
        return load_classification_cache(path, split)
    return load_partseg_cache(path, split)


def task_dataset(task: str, data: Any, num_points: int, seed: int = 0) -> Dataset:
    """The deterministic dataset of ``num_points`` per item over a loaded split."""
    if task == "classification":
        return PointClassificationDataset(data, num_points)
    return PartSegDataset(data, num_points, seed)


def few_shot_subset(
    data: ClassificationSplit, shots: int, seed: int = 0, where: str = "the training split"
) -> ClassificationSplit:
    """``shots`` shapes of every class of ``data`` (``K * C`` shapes), drawn without replacement.

    The draw is a pure function of ``seed``: one random order of each class's shapes, of which
    the first ``shots`` are kept, so a run and its resumption train on the same shapes and the
    ``K``-shot subset is contained in the ``K + 1``-shot one. Shapes keep their order in
    ``data``. A class with fewer than ``shots`` shapes is an error naming it (``where`` says
    which data it is).
    """
    if shots < 1:
        raise ValueError(f"few-shot needs at least 1 shape per class, got {shots}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c, name in enumerate(data.class_names):
        members = (data.labels == c).nonzero().flatten()
        if len(members) < shots:
            raise ValueError(
                f"{where}: class {name!r} has {len(members)} shapes, fewer than the {shots} "
                "per class asked for by few-shot"
            )
        keep.append(members[torch.randperm(len(members), generator=g)[:shots]])
    index = torch.cat(keep).sort().values
    return ClassificationSplit(
        points=data.points[index],
        labels=data.labels[index],
        shape_ids=[data.shape_ids[i] for i in index.tolist()],
        class_names=list(data.class_names),
        source=data.source,
    )


def subsample_views(
    batch: dict[str, Any], num_points: int, generator: torch.Generator, keys: tuple[str, ...]
) -> dict[str, Any]:
    """Keep the same random ``num_points`` of every cloud in each of ``keys`` (``(B, P, ...)``)."""
    b, available = batch[keys[0]].shape[:2]
    if num_points > available:
        raise ValueError(f"cannot draw {num_points} points from pools of {available}")
    order = torch.rand(b, available, generator=generator).argsort(dim=1)[:, :num_points]
    order = order.to(batch[keys[0]].device)
    for key in keys:
        value = batch[key]
        index = order.view(b, num_points, *([1] * (value.dim() - 2))).expand(
            -1, -1, *value.shape[2:]
        )
        batch[key] = torch.gather(value, 1, index)
    return batch


class PrepareViews:
    """The per-step, on-device augmentation: draw ``data.num_points`` of each pool at random,
    then Point-MAE's scale-and-translate, all from the step's generator."""

    def __init__(self, recipe: Recipe, keys: tuple[str, ...]) -> None:
        self.data = recipe.data
        self.keys = keys

    def __call__(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        batch = subsample_views(batch, self.data.num_points, ctx.generator, self.keys)
        batch["points"] = scale_and_translate(
            batch["points"],
            ctx.generator,
            self.data.scale_low,
            self.data.scale_high,
            self.data.translate,
        )
        return batch


# -- the trainer's view of the models --------------------------------------------------------


class ClassificationStep(nn.Module):
    """``forward(batch)`` -> cross-entropy of ``model(batch["points"])`` on ``batch["label"]``."""

    def __init__(self, model: Cd2pForClassification, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["points"])
        loss = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.label_smoothing)
        return {"loss": loss}


class PartSegStep(nn.Module):
    """``forward(batch)`` -> per-point cross-entropy on ``batch["part_labels"]``."""

    def __init__(self, model: Cd2pForPartSegmentation, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["points"], batch["category"])
        loss = F.cross_entropy(
            logits.float().flatten(0, 1),
            batch["part_labels"].flatten(),
            label_smoothing=self.label_smoothing,
        )
        return {"loss": loss}


# -- models ----------------------------------------------------------------------------------


def load_backbone(init: str | Path) -> Cd2pBackbone:
    """A pre-trained backbone from a saved directory, a pre-training run (its ``backbone/``)
    or a Hub id."""
    path = Path(init)
    if path.is_dir() and (path / "backbone" / "config.json").is_file():
        path = path / "backbone"
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            kind = json.loads(config.read_text()).get("model_kind", "backbone")
            if kind != "backbone":
                raise ValueError(
                    f"{path} holds a {kind!r} model; --init needs a backbone (a pre-training "
                    "run's backbone/ directory, or a saved Cd2pBackbone)"
                )
        return Cd2pBackbone.from_pretrained(str(path))
    if path.exists() or str(init).count("/") != 1:
        raise FileNotFoundError(f"--init {init}: not a backbone directory nor a Hub id (org/name)")
    return Cd2pBackbone.from_pretrained(str(init))


def adapt_recipe_to_backbone(recipe: Recipe, backbone: Cd2pBackbone) -> tuple[Recipe, list[str]]:
    """The recipe with ``model.dim/depth/num_heads/mlp_ratio`` taken from a pre-trained
    backbone (whose weights fix them); returns the changed keys for the user."""
    config = backbone._hub_mixin_config or {}
    changes, model = [], recipe.model
    updates = {}
    for key in ("dim", "depth", "num_heads", "mlp_ratio"):
        if key in config and getattr(model, key) != config[key]:
            changes.append(f"model.{key}: {getattr(model, key)} -> {config[key]}")
            updates[key] = config[key]
    return dataclasses.replace(recipe, model=dataclasses.replace(model, **updates)), changes


def build_task_model(
    task: str, recipe: Recipe, data: Any, backbone: Cd2pBackbone | None = None
) -> nn.Module:
    """The task model sized for ``data`` (a loaded split); from ``backbone``'s weights if given.

    Per-task backbone settings (``num_groups``, ``group_size``, ``drop_path_rate``) come from
    the recipe; the rest of the architecture from the backbone when one is given.
    """
    _check_task(task)
    cfg = recipe.finetune
    per_task = {k: getattr(recipe.model, k) for k in ("num_groups", "group_size", "drop_path_rate")}
    if task == "classification":
        kwargs: dict[str, Any] = dict(
            num_classes=data.num_classes,
            head_channels=list(cfg.head_channels),
            head_dropout=cfg.head_dropout,
            class_names=data.class_names,
            num_points=recipe.data.num_points,
        )
        cls: Any = Cd2pForClassification
    else:
        kwargs = dict(
            num_parts=data.num_parts,
            num_categories=data.num_categories,
            feature_blocks=list(cfg.feature_blocks) if cfg.feature_blocks else None,
            label_channels=cfg.label_channels,
            propagation_channels=list(cfg.propagation_channels),
            head_channels=list(cfg.seg_head_channels),
            head_dropout=cfg.head_dropout,
            category_names=data.category_names,
            category_parts=data.category_parts,
            num_points=recipe.data.num_points,
        )
        cls = Cd2pForPartSegmentation
    if backbone is not None:
        return cls.from_backbone(backbone, per_task, **kwargs)
    return cls(backbone=recipe.model.backbone_kwargs(), **kwargs)


# -- evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VoteSettings:
    """How voting views are made: Point-MAE's test-time views (a random ``num_points`` of the
    first ``resample_ratio * num_points`` FPS points, then scale and translate)."""

    resample_ratio: float = 1.2
    scale_low: float = 2.0 / 3.0
    scale_high: float = 1.5
    translate: float = 0.2
    seed: int = 0


@dataclass
class EvalReport:
    """What :func:`evaluate` measured; metrics are fractions in [0, 1].

    classification: ``oa``, ``macc`` (and ``oa_vote``, ``macc_vote`` with votes),
    ``per_class`` rows (name, support, acc[, acc_vote]) and ``confusion`` ``(C, C)`` (of the
    voted predictions when voting). partseg: ``instance_miou``, ``class_miou``, ``accuracy``
    (and ``*_vote``), ``per_class`` rows (name, shapes, miou[, miou_vote]).
    """

    task: str
    metrics: dict[str, float]
    per_class: list[dict[str, Any]]
    class_names: list[str]
    confusion: torch.Tensor | None = None
    num_samples: int = 0
    votes: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {
            "task": self.task,
            "samples": self.num_samples,
            "votes": self.votes,
            **self.metrics,
            "per_class": self.per_class,
            **self.extra,
        }
        if self.confusion is not None:
            out["confusion_matrix"] = self.confusion.tolist()
        return out


def _vote_view(
    points: torch.Tensor, index: int, vote: int, num_points: int, settings: VoteSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """One voting view of a cloud ``points (P, 3)``: indices of its ``num_points`` points and
    the augmented coordinates ``(num_points, 3)``, from a generator of ``(seed, index, vote)``."""
    g = step_generator(settings.seed, index, vote, stream="vote")
    idx = torch.rand(points.shape[0], generator=g).argsort()[:num_points].to(points.device)
    view = scale_and_translate(
        points[idx].unsqueeze(0), g, settings.scale_low, settings.scale_high, settings.translate
    )
    return idx, view[0]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def classification_logits(
    model: nn.Module,
    data: ClassificationSplit,
    num_points: int,
    votes: int = 0,
    batch_size: int = 32,
    settings: VoteSettings = VoteSettings(),
    progress: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits ``(S, C)`` on the first ``num_points`` FPS points of every cloud, and the mean
    logits over ``votes`` augmented views (``None`` without votes)."""
    device = _model_device(model)
    pool = min(data.points.shape[1], max(num_points, round(settings.resample_ratio * num_points)))
    loader = DataLoader(PointClassificationDataset(data, pool), batch_size=batch_size)
    plain, voted = [], []
    start = 0
    for batch in loader:
        pts = batch["points"].to(device)
        plain.append(model(pts[:, :num_points]).float().cpu())
        if votes:
            total = 0.0
            for v in range(votes):
                views = torch.stack(
                    [
                        _vote_view(pts[i], start + i, v, num_points, settings)[1]
                        for i in range(len(pts))
                    ]
                )
                total = total + model(views).float().cpu()
            voted.append(total / votes)
        start += len(pts)
        if progress is not None:
            progress(len(pts))
    return torch.cat(plain), (torch.cat(voted) if votes else None)


@torch.no_grad()
def partseg_logits(
    model: nn.Module,
    data: PartSegSplit,
    num_points: int,
    votes: int = 0,
    batch_size: int = 16,
    settings: VoteSettings = VoteSettings(),
    progress: Callable | None = None,
    seed: int = 0,
):
    """Yields per batch ``(logits (B, N, P), voted logits or None, labels (B, N), categories
    (B,))`` on ``num_points`` points of every shape (the same points for the votes, which only
    scale and translate them)."""
    device = _model_device(model)
    loader = DataLoader(PartSegDataset(data, num_points, seed), batch_size=batch_size)
    start = 0
    for batch in loader:
        pts, cats = batch["points"].to(device), batch["category"].to(device)
        logits = model(pts, cats).float().cpu()
        voted = None
        if votes:
            total = 0.0
            for v in range(votes):
                views = []
                for i in range(len(pts)):
                    g = step_generator(settings.seed, start + i, v, stream="vote")
                    views.append(
                        scale_and_translate(
                            pts[i : i + 1],
                            g,
                            settings.scale_low,
                            settings.scale_high,
                            settings.translate,
                        )
                    )
                total = total + model(torch.cat(views), cats).float().cpu()
            voted = total / votes
        start += len(pts)
        if progress is not None:
            progress(len(pts))
        yield logits, voted, batch["part_labels"], batch["category"]


def evaluate(
    task: str,
    model: nn.Module,
    data: str | Path | ClassificationSplit | PartSegSplit,
    votes: int = 1,
    *,
    split: str = "test",
    num_points: int | None = None,
    batch_size: int = 32,
    settings: VoteSettings = VoteSettings(),
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Evaluate a task model on a prepared dataset (a path and ``split``, or a loaded split).

    ``votes <= 1``: one deterministic view (the first ``num_points`` FPS points for
    classification, a fixed sample of each shape for part segmentation). ``votes > 1`` also
    reports the ``*_vote`` metrics, from logits averaged over that many augmented views.
    ``num_points`` defaults to the model's own ``num_points`` (what it was trained on).
    """
    _check_task(task)
    if isinstance(data, str | Path):
        data = load_task_split(task, data, split)
    n = (
        num_points
        or getattr(model, "num_points", None)
        or (1024 if task == "classification" else 2048)
    )
    votes = votes if votes > 1 else 0
    was_training = model.training
    model.eval()
    try:
        if task == "classification":
            return _evaluate_classification(model, data, n, votes, batch_size, settings, progress)
        return _evaluate_partseg(model, data, n, votes, batch_size, settings, progress)
    finally:
        model.train(was_training)


def _check_classes(model: nn.Module, names: list[str], what: str) -> None:
    own = getattr(model, "class_names", None) or getattr(model, "category_names", None)
    if own is not None and list(own) != list(names):
        raise ValueError(
            f"the model was trained on {what} {own[:5]}... but the data has {names[:5]}...: "
            "they must be the same, in the same order"
        )


def _evaluate_classification(model, data, n, votes, batch_size, settings, progress) -> EvalReport:
    _check_classes(model, data.class_names, "classes")
    if getattr(model, "num_classes", data.num_classes) != data.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes, the data {data.num_classes}")
    plain, voted = classification_logits(model, data, n, votes, batch_size, settings, progress)
    c = data.num_classes
    conf = confusion_matrix(plain.argmax(-1), data.labels, c)
    metrics = {"oa": overall_accuracy(conf), "macc": mean_class_accuracy(conf)}
    acc = per_class_accuracy(conf)
    support = conf.sum(1)
    rows = [
        {"name": name, "support": int(support[i]), "acc": float(acc[i])}
        for i, name in enumerate(data.class_names)
    ]
    if voted is not None:
        conf = confusion_matrix(voted.argmax(-1), data.labels, c)
        metrics.update(oa_vote=overall_accuracy(conf), macc_vote=mean_class_accuracy(conf))
        for row, a in zip(rows, per_class_accuracy(conf).tolist(), strict=True):
            row["acc_vote"] = a
    return EvalReport(
        "classification", metrics, rows, list(data.class_names), conf, len(data), max(votes, 1)
    )


def _evaluate_partseg(model, data, n, votes, batch_size, settings, progress) -> EvalReport:
    _check_classes(model, data.category_names, "categories")
    mask = category_part_mask(data.category_parts, max(data.num_parts, model.num_parts))
    mask = mask[:, : model.num_parts]
    plain = PartSegMeter(data.category_parts, data.category_names)
    voted = PartSegMeter(data.category_parts, data.category_names)
    for logits, vlogits, labels, cats in partseg_logits(
        model, data, n, votes, batch_size, settings, progress
    ):
        plain.update(restrict_to_category(logits, cats, mask), labels, cats)
        if vlogits is not None:
            voted.update(restrict_to_category(vlogits, cats, mask), labels, cats)
    metrics = plain.compute()
    per_cat = plain.per_category()
    counts = torch.bincount(data.categories, minlength=data.num_categories)
    rows = [
        {"name": name, "shapes": int(counts[i]), "miou": per_cat.get(name, float("nan"))}
        for i, name in enumerate(data.category_names)
    ]
    if votes:
        metrics.update({f"{k}_vote": v for k, v in voted.compute().items()})
        per_vote = voted.per_category()
        for row in rows:
            row["miou_vote"] = per_vote.get(row["name"], float("nan"))
    return EvalReport(
        "partseg", metrics, rows, list(data.category_names), None, len(data), max(votes, 1)
    )


# -- fine-tuning -----------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """The outcome of :func:`run_finetune` / :func:`run_linear_probe`."""

    run: RunResult | None
    model_dir: Path | None
    metrics: dict[str, float]
    best: dict[str, Any] | None
    recipe: Recipe
    notes: list[str] = field(default_factory=list)


def export_model(model: nn.Module, out_dir: Path, **card: Any) -> Path:
    """Save a CPU copy of ``model`` as a Hub-format directory, atomically (temp dir + rename)."""
    with atomic_directory(out_dir) as tmp:
        copy.deepcopy(model).cpu().save_pretrained(tmp, model_card_kwargs=card)
    return out_dir


def _hub_base_model(init: str | None) -> str | None:
    if init and not Path(init).exists() and init.count("/") == 1:
        return init
    return None


def _dataset_card(data: Path, split: str) -> dict[str, str]:
    for fmt in (CLASSIFICATION_FORMAT, "cd2p-partseg"):
        try:
            source = read_cache_meta(data, fmt).get("source", data.name)
            return {"name": str(source), "split": split}
        except ValueError:
            continue
    return {"name": data.name, "split": split}


def run_finetune(
    task: str,
    recipe: Recipe | None,
    data: str | Path | None,
    init: str | Path | None,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    recipe_name: str | None = None,
    stop_after: int | None = None,
    console: Console | None = None,
) -> FinetuneResult:
    """Fine-tune a task model on a prepared dataset and export the best one to ``out/model``.

    Args:
        task: ``classification`` or ``partseg``.
        recipe: the recipe (``recipe.task`` must be ``task``); ``None`` with ``resume`` uses
            the run's saved one.
        data: a prepared dataset (``cd2p prepare ...`` output); ``None`` with ``resume``.
        init: pre-trained backbone (a directory, a pre-training run, a Hub id) or ``None``
            for training from scratch.
        out: the run directory (new or empty unless ``resume``).
        resume: continue the run in ``out`` from its latest checkpoint.
        stop_after: stop (with a checkpoint) after this many steps.

    With ``recipe.finetune.linear_probe`` this runs :func:`run_linear_probe` instead.
    """
    _check_task(task)
    out = Path(out)
    console = console or Console(stderr=True)
    if resume:
        info_path = out / RUN_INFO
        if not info_path.is_file() or not (out / "recipe.yaml").is_file():
            raise FileNotFoundError(
                f"{out} is not a cd2p fine-tuning run (no run.json/recipe.yaml)"
            )
        saved = json.loads(info_path.read_text())
        saved_recipe = load_recipe(out / "recipe.yaml")
        if recipe is not None and recipe != saved_recipe:
            raise ValueError(f"the recipe differs from {out / 'recipe.yaml'}; omit --recipe/--set")
        recipe, data = saved_recipe, data or saved["data"]
        init, recipe_name = saved.get("init"), recipe_name or saved.get("recipe_name")
        if saved["task"] != task:
            raise ValueError(f"{out} is a {saved['task']} run, not {task}")
    if recipe is None or data is None:
        raise ValueError("run_finetune needs a recipe and a prepared dataset")
    if recipe.task != task:
        raise ValueError(f"the recipe is for task {recipe.task!r}, not {task!r}")
    if recipe.finetune.few_shot is not None and task != "classification":
        raise ValueError("few-shot (finetune.few_shot: K shapes per class) is for classification")
    if recipe.finetune.linear_probe:
        return run_linear_probe(recipe, data, init, out, recipe_name=recipe_name, console=console)
    data = Path(data).resolve()
    dist = D.init_distributed(recipe.run.device)
    if dist.is_main:
        check_run_dir(out, resume)
    cfg = recipe.finetune
    train_data = load_task_split(task, data, cfg.train_split)
    val_data = load_task_split(task, data, cfg.val_split)
    if cfg.few_shot is not None:
        where = f"{data} ({cfg.train_split})"
        train_data = few_shot_subset(train_data, cfg.few_shot, recipe.run.seed, where)

    backbone = load_backbone(init) if init is not None else None
    notes: list[str] = []
    if backbone is not None:
        recipe, notes = adapt_recipe_to_backbone(recipe, backbone)
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, path=str(data)))
    seed_everything(recipe.run.seed)  # the same initial head on every rank
    model = build_task_model(task, recipe, train_data, backbone)
    del backbone

    pool = round(cfg.resample_ratio * recipe.data.num_points)
    if task == "classification":
        pool = min(pool, train_data.points.shape[1])
        step: nn.Module = ClassificationStep(model, cfg.label_smoothing)
        keys: tuple[str, ...] = ("points",)
    else:
        step = PartSegStep(model, cfg.label_smoothing)
        keys = ("points", "part_labels")
    train_set = task_dataset(task, train_data, max(pool, recipe.data.num_points), recipe.run.seed)
    metric = BEST_METRIC[task]
    dataset_card = _dataset_card(data, cfg.val_split)
    training_card = {
        "task": task,
        "recipe": recipe_name or recipe.description or "custom",
        "initialised from": str(init) if init is not None else "scratch (random initialisation)",
        "training data": f"{data} ({cfg.train_split}: {len(train_data)} shapes)",
        "model selection": f"best {metric} on {cfg.val_split} ({len(val_data)} shapes)",
    }
    if cfg.few_shot is not None:
        training_card["few-shot"] = (
            f"{cfg.few_shot} training shapes per class, drawn with seed {recipe.run.seed}"
        )
    model_dir = out / MODEL_DIR

    def evaluate_val(module: nn.Module) -> dict[str, float]:
        report = evaluate(task, module.model, val_data, 1, batch_size=cfg.eval_batch_size)
        return {k: report.metrics[k] for k in report.metrics}

    def on_best(module: nn.Module, metrics: dict[str, float]) -> None:
        export_model(
            module.model,
            model_dir,
            metrics=metrics,
            recipe=recipe,
            training=training_card,
            dataset=dataset_card,
            base_model=_hub_base_model(str(init) if init else None),
        )

    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            out / RUN_INFO,
            {
                "task": task,
                "data": str(data),
                "init": str(init) if init is not None else None,
                "recipe_name": recipe_name,
                "train_shapes": len(train_data),
                "val_shapes": len(val_data),
                "few_shot": cfg.few_shot,
                "notes": notes,
            },
        )
        for note in notes:
            console.print(f"[yellow]note:[/] {note} (from the pre-trained backbone)")
    trainer = Trainer(
        step,
        train_set,
        recipe,
        out,
        prepare_batch=PrepareViews(recipe, keys),
        evaluate=evaluate_val,
        best_metric=metric,
        best_mode="max",
        on_best=on_best,
        progress=progress,
        console=console,
    )
    result = trainer.fit(resume=resume, stop_after=stop_after)

    final: dict[str, float] = {}
    if result.completed and dist.is_main:
        best_cls = Cd2pForClassification if task == "classification" else Cd2pForPartSegmentation
        best_model = best_cls.from_pretrained(str(model_dir)).to(
            D.resolve_device(recipe.run.device)
        )
        report = evaluate(task, best_model, val_data, cfg.votes, batch_size=cfg.eval_batch_size)
        final = report.metrics
        best_step = (result.best or {}).get("step")
        training_card["best step"] = f"{best_step} of {result.total_steps}"
        export_model(
            best_model,
            model_dir,
            metrics=final,
            recipe=recipe,
            training=training_card,
            dataset=dataset_card,
            base_model=_hub_base_model(str(init) if init else None),
        )
        atomic_write_json(
            out / FINAL_METRICS,
            {
                **report.to_json(),
                "split": cfg.val_split,
                "best_step": best_step,
                "data": str(data),
                "few_shot": cfg.few_shot,
                "train_shapes": len(train_data),
            },
        )
    D.barrier()
    return FinetuneResult(
        result, model_dir if result.completed else None, final, result.best, recipe, notes
    )


# -- linear probing --------------------------------------------------------------------------


@torch.no_grad()
def pooled_features(
    backbone: Cd2pBackbone, data: ClassificationSplit, num_points: int, batch_size: int = 32
) -> torch.Tensor:
    """Max- and mean-pooled backbone tokens ``(S, 2 * dim)`` of every cloud's first
    ``num_points`` FPS points (the frozen representation a linear probe reads)."""
    device = _model_device(backbone)
    backbone.eval()
    feats = []
    for batch in DataLoader(PointClassificationDataset(data, num_points), batch_size=batch_size):
        tokens = backbone(batch["points"].to(device)).tokens.float()
        feats.append(torch.cat([tokens.max(1).values, tokens.mean(1)], -1).cpu())
    return torch.cat(feats)


def fit_linear_classifier(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, ``x (S, D)``, ``y (S,)`` -> ``W (D, C)``, ``b (C,)``.

    Minimises mean cross-entropy + ``l2 * |W|^2`` with full-batch L-BFGS (a convex problem:
    the optimum does not depend on initialisation).
    """
    x, y = x.double(), y.long()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), b.detach().float()


L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def choose_l2(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int = 0, holdout: float = 0.2
) -> tuple[float, dict[float, float]]:
    """Pick the L2 strength of :data:`L2_GRID` with the best accuracy on a stratified
    ``holdout`` fraction of the training features (the test set is never looked at)."""
    g = torch.Generator().manual_seed(seed)
    val_mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(num_classes):
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        val_mask[members[: int(len(members) * holdout)]] = True
    if not val_mask.any() or val_mask.all():
        return L2_GRID[2], {}
    scores = {}
    for l2 in L2_GRID:
        w, b = fit_linear_classifier(x[~val_mask], y[~val_mask], num_classes, l2)
        scores[l2] = float(((x[val_mask] @ w + b).argmax(-1) == y[val_mask]).float().mean())
    best = max(scores.items(), key=lambda kv: (kv[1], kv[0]))[0]  # ties: stronger regulariser
    return best, scores


def run_linear_probe(
    recipe: Recipe,
    data: str | Path,
    init: str | Path | None,
    out: str | Path,
    *,
    recipe_name: str | None = None,
    console: Console | None = None,
) -> FinetuneResult:
    """Judge a pre-training without fine-tuning: frozen backbone, max+mean-pooled tokens,
    standardised, then a linear (logistic-regression) classifier whose L2 strength is chosen
    on a held-out part of the training split; accuracy on ``finetune.val_split``.

    Writes ``out/metrics.json`` and ``out/probe/`` (``classifier.safetensors`` with
    ``weight (D, C)``, ``bias``, ``mean``, ``std``; ``probe.json``).
    """
    out, data = Path(out), Path(data).resolve()
    check_run_dir(out, resume=False)
    if recipe.task != "classification":
        raise ValueError(
            "a linear probe is a classification benchmark (recipe task: classification)"
        )
    cfg = recipe.finetune
    train = load_classification_cache(data, cfg.train_split)
    val = load_classification_cache(data, cfg.val_split)
    if cfg.few_shot is not None:
        train = few_shot_subset(train, cfg.few_shot, recipe.run.seed, f"{data} ({cfg.train_split})")
    if init is not None:
        backbone = load_backbone(init)
    else:
        seed_everything(recipe.run.seed)
        backbone = Cd2pBackbone(**recipe.model.backbone_kwargs())
    backbone.num_groups, backbone.group_size = recipe.model.num_groups, recipe.model.group_size
    backbone.to(D.resolve_device(recipe.run.device)).eval()
    n = recipe.data.num_points
    x_train = pooled_features(backbone, train, n, cfg.eval_batch_size)
    x_val = pooled_features(backbone, val, n, cfg.eval_batch_size)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    l2, scores = choose_l2(x_train, train.labels, train.num_classes, recipe.run.seed)
    w, b = fit_linear_classifier(x_train, train.labels, train.num_classes, l2)
    conf = confusion_matrix((x_val @ w + b).argmax(-1), val.labels, val.num_classes)
    train_acc = float(((x_train @ w + b).argmax(-1) == train.labels).float().mean())
    metrics = {
        "oa": overall_accuracy(conf),
        "macc": mean_class_accuracy(conf),
        "train_oa": train_acc,
    }
    out.mkdir(parents=True, exist_ok=True)
    probe = out / PROBE_DIR
    probe.mkdir(exist_ok=True)
    with atomic_output(probe / "classifier.safetensors") as tmp:
        save_file({"weight": w.contiguous(), "bias": b, "mean": mean, "std": std}, str(tmp))
    atomic_write_json(
        probe / "probe.json",
        {
            "init": str(init) if init is not None else None,
            "l2": l2,
            "holdout_accuracy": {str(k): v for k, v in scores.items()},
            "class_names": train.class_names,
            "num_points": n,
            "features": "max+mean of tokens",
            "few_shot": cfg.few_shot,
            "train_shapes": len(train),
        },
    )
    atomic_write_json(
        out / FINAL_METRICS,
        {
            "task": "linear-probe",
            **metrics,
            "l2": l2,
            "split": cfg.val_split,
            "data": str(data),
            "few_shot": cfg.few_shot,
            "train_shapes": len(train),
            "confusion_matrix": conf.tolist(),
        },
    )
    from cd2p.config import save_recipe

    save_recipe(recipe, out / "recipe.yaml")
    atomic_write_json(
        out / RUN_INFO,
        {
            "task": "linear-probe",
            "data": str(data),
            "init": str(init) if init is not None else None,
            "recipe_name": recipe_name,
        },
    )
    return FinetuneResult(None, None, metrics, None, recipe)


__all__ = [
    "EvalReport",
    "FinetuneResult",
    "VoteSettings",
    "build_task_model",
    "classification_logits",
    "evaluate",
    "few_shot_subset",
    "fit_linear_classifier",
    "load_backbone",
    "load_task_split",
    "pooled_features",
    "run_finetune",
    "run_linear_probe",
]
