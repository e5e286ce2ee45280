"""Fine-tuning and evaluation on the object benchmarks: classification (ModelNet40,
ScanObjectNN) and part segmentation (ShapeNetPart), on the shared :class:`Trainer`.

``run_finetune`` builds :class:`~cd2p.models.classification.Cd2pForClassification` or
:class:`~cd2p.models.partseg.Cd2pForPartSegmentation` (from a pre-trained backbone, or from
scratch), trains it on a prepared dataset (``cd2p prepare modelnet40|scanobjectnn|
shapenetpart``), evaluates it on ``finetune.val_split`` every ``run.eval_every`` epochs,
exports the best model (by OA / instance mIoU) and finally evaluates that model with voting.
With ``finetune.linear_probe`` it runs :func:`~cd2p.engine.linear_probe.run_linear_probe`
instead, which freezes the backbone and fits a linear classifier on its pooled features. With
``finetune.few_shot: K`` either one trains on only K shapes per class
(:func:`~cd2p.engine.tasks.few_shot_subset`). Evaluation and voting live in
:mod:`cd2p.engine.evaluation` (``evaluate`` is what ``cd2p evaluate`` runs on any saved model);
what the task drivers share (task names, splits, backbones, the result) in
:mod:`cd2p.engine.tasks`. This module re-exports their public names, so
``from cd2p.engine.finetune import ...`` keeps working for all of them.

Run directory::

    RUN/recipe.yaml     the recipe as run           RUN/metrics.jsonl  curves and evaluations
    RUN/run.json        task, data, init            RUN/checkpoints/   resumable state
    RUN/model/          the best model (from_pretrained), its card holds the final metrics
    RUN/metrics.json    final metrics of the best model (with and without voting)

Per-step randomness (which points of the FPS pool form the view, scale and translation)
comes from the trainer's step generator, so a resumed run sees the same views."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from cd2p._atomic import atomic_directory, atomic_write_json
from cd2p.config import Recipe, load_recipe
from cd2p.data.modelnet40 import CACHE_FORMAT as CLASSIFICATION_FORMAT
from cd2p.data.modelnet40 import read_cache_meta
from cd2p.engine import distributed as D
from cd2p.engine.augment import scale_and_translate
from cd2p.engine.evaluation import (
    EvalReport,
    VoteSettings,
    _vote_view,  # noqa: F401  (re-exported: tests check the voting views)
    classification_logits,
    evaluate,
    partseg_logits,
)
from cd2p.engine.linear_probe import (
    L2_GRID,
    choose_l2,
    fit_linear_classifier,
    pooled_features,
    run_linear_probe,
)
from cd2p.engine.tasks import (
    FINAL_METRICS,
    MODEL_DIR,
    PROBE_DIR,
    RUN_INFO,
    TASKS,
    FinetuneResult,
    Task,
    check_task,
    few_shot_subset,
    load_backbone,
    load_task_split,
    task_dataset,
)
from cd2p.engine.trainer import StepContext, Trainer, check_run_dir, seed_everything
from cd2p.models.backbone import Cd2pBackbone
from cd2p.models.classification import Cd2pForClassification
from cd2p.models.partseg import Cd2pForPartSegmentation

BEST_METRIC = {"classification": "oa", "partseg": "instance_miou"}


# -- per-step views --------------------------------------------------------------------------


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
    check_task(task)
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


# -- fine-tuning -----------------------------------------------------------------------------


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
    check_task(task)
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


__all__ = [
    "BEST_METRIC",
    "FINAL_METRICS",
    "L2_GRID",
    "MODEL_DIR",
    "PROBE_DIR",
    "RUN_INFO",
    "TASKS",
    "ClassificationStep",
    "EvalReport",
    "FinetuneResult",
    "PartSegStep",
    "PrepareViews",
    "Task",
    "VoteSettings",
    "adapt_recipe_to_backbone",
    "build_task_model",
    "choose_l2",
    "classification_logits",
    "evaluate",
    "export_model",
    "few_shot_subset",
    "fit_linear_classifier",
    "load_backbone",
    "load_task_split",
    "partseg_logits",
    "pooled_features",
    "run_finetune",
    "run_linear_probe",
    "subsample_views",
    "task_dataset",
]
