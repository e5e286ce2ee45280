"""Fine-tuning any task of the task table (:mod:`cd2p.tasks`) on the shared :class:`Trainer`.

``run_finetune`` builds the task's model (from a pre-trained backbone, or from scratch), trains
it on a prepared dataset, evaluates it on the task's ``val_split`` every ``run.eval_every``
epochs, exports the best model (by the task's best metric) and finally evaluates that model
with the recipe's ``votes``. Everything task-specific (data, model, step, evaluation) comes
from the task's :class:`~cd2p.tasks.TaskSpec`; a task may also run a different job instead
(classification's linear probe, :mod:`cd2p.engine.linear_probe`).

Run directory::

    RUN/recipe.yaml     the recipe as run           RUN/metrics.jsonl  curves and evaluations
    RUN/run.json        task, data, init            RUN/checkpoints/   resumable state
    RUN/model/          the best model (from_pretrained), its card holds the final metrics
    RUN/metrics.json    final metrics of the best model (with and without voting), the
                        splits it was selected and evaluated on, and its provenance
    RUN/card.json       what the model card was rendered from (re-rendered by multi-seed runs)

Per-step randomness comes from the trainer's step generator and per-epoch draws from
``(seed, epoch, index)``, so a resumed run sees the same data.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from cd2p._atomic import atomic_directory, atomic_write_json
from cd2p._text import plain_console, styled
from cd2p.config import Recipe, apply_overrides, load_recipe, resume_changes
from cd2p.engine import distributed as D
from cd2p.engine.evaluation import evaluate
from cd2p.engine.progress import progress_reporter
from cd2p.engine.trainer import RunResult, Trainer, check_run_dir, seed_everything
from cd2p.models.backbone import Cd2pBackbone
from cd2p.provenance import check_same_data, data_fingerprint, provenance
from cd2p.tasks import TaskSpec, get_task

MODEL_DIR = "model"
RUN_INFO = "run.json"
FINAL_METRICS = "metrics.json"
PROBE_DIR = "probe"
CARD_INPUTS = "card.json"


@dataclass
class FinetuneResult:
    """The outcome of :func:`run_finetune` / :func:`~cd2p.engine.linear_probe.run_linear_probe`."""

    run: RunResult | None
    model_dir: Path | None
    metrics: dict[str, float]
    best: dict[str, Any] | None
    recipe: Recipe
    notes: list[str] = field(default_factory=list)


# -- pre-trained backbones -------------------------------------------------------------------


def load_backbone(init: str | Path) -> Cd2pBackbone:
    """A pre-trained backbone from a saved directory, a pre-training run (its ``backbone/``)
    or a Hub id."""
    from cd2p.models.hub import check_local_path

    check_local_path(init, "--init")
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
    """The task's model sized for ``data`` (a loaded split); from ``backbone``'s weights if
    given. Per-task backbone settings (``num_groups``, ``group_size``, ``drop_path_rate``) come
    from the recipe; the rest of the architecture from the backbone when one is given."""
    return get_task(task).build_model(recipe, data, backbone)


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


def _dataset_card(spec: TaskSpec, data: Path, split: str) -> dict[str, str]:
    try:
        return {"name": spec.data_source(data), "split": split}
    except (ValueError, FileNotFoundError):
        return {"name": data.name, "split": split}


def _resume_settings(
    task: str, recipe: Recipe | None, out: Path, overrides: Sequence[str] = ()
) -> tuple[Recipe, str, str | None, str | None, list[str]]:
    """The saved recipe (with ``overrides`` that keep the run consistent, e.g. a longer
    ``schedule.epochs``), data, init and recipe name of the run in ``out``, and the changes."""
    info_path = out / RUN_INFO
    if not info_path.is_file() or not (out / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{out} is not a cd2p fine-tuning run (no run.json/recipe.yaml)")
    saved = json.loads(info_path.read_text())
    if saved["task"] != task:
        raise ValueError(f"{out} is a {saved['task']} run, not {task}")
    saved_recipe = load_recipe(out / "recipe.yaml")
    if recipe is not None and recipe != saved_recipe:
        raise ValueError(
            f"the recipe differs from {out / 'recipe.yaml'}; a resumed run keeps its recipe "
            "(change its length with --set schedule.epochs=N)"
        )
    new_recipe = apply_overrides(saved_recipe, overrides)
    changes = resume_changes(saved_recipe, new_recipe)
    return new_recipe, saved["data"], saved.get("init"), saved.get("recipe_name"), changes


def metric_formatter(spec: TaskSpec) -> Any:
    """``metrics -> "OA 91.20 %  mAcc 88.10 %"`` with the task's labels, in percent."""
    labels = {m.key: m.label for m in spec.headline}

    def describe(metrics: dict[str, float]) -> str:
        keys = [k for k in labels if k in metrics] or list(metrics)
        return "  ".join(
            f"{labels.get(k, k)} {100 * metrics[k]:.2f} %"
            for k in keys
            if isinstance(metrics[k], int | float)
        )

    return describe


def fingerprint_data(spec: TaskSpec, data: Path) -> dict[str, Any]:
    """The prepared data's fingerprint (:func:`cd2p.provenance.data_fingerprint`) with its
    path and source name."""
    fingerprint = data_fingerprint(data)
    return {**fingerprint, "path": str(data), "source": _dataset_card(spec, data, "")["name"]}


def write_card_inputs(out: Path, card: dict[str, Any]) -> None:
    """Save what a run's model card was rendered from (``RUN/card.json``), so that it can be
    rendered again with more (a multi-seed run's summary)."""
    atomic_write_json(out / CARD_INPUTS, card)


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
    overrides: Sequence[str] = (),
    fingerprint: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Fine-tune a task model on a prepared dataset and export the best one to ``out/model``.

    Args:
        task: a task of the task table (``classification``, ``partseg``, ``segmentation``...).
        recipe: the recipe (``recipe.task`` must be ``task``); ``None`` with ``resume`` uses
            the run's saved one.
        data: a prepared dataset (``cd2p prepare ...`` output); ``None`` with ``resume``.
        init: pre-trained backbone (a directory, a pre-training run, a Hub id) or ``None``
            for training from scratch.
        out: the run directory (new or empty unless ``resume``).
        resume: continue the run in ``out`` from its latest checkpoint.
        stop_after: stop (with a checkpoint) after this many steps.
        overrides: with ``resume``, ``section.key=value`` changes to the saved recipe that keep
            the run consistent (``schedule.epochs=N`` extends it; others are refused with the
            reason, see :func:`cd2p.config.resume_changes`).
        fingerprint: the data's fingerprint when the caller computed it already (several runs
            on one dataset); computed here otherwise.

    SIGINT / SIGTERM write a checkpoint and raise
    :class:`~cd2p.engine.trainer.TrainingInterrupted`.
    """
    spec = get_task(task)
    out = Path(out)
    console = console or plain_console(stderr=True)
    changes: list[str] = []
    if resume:
        saved_recipe, saved_data, init, saved_name, changes = _resume_settings(
            task, recipe, out, overrides
        )
        recipe, data, recipe_name = saved_recipe, data or saved_data, recipe_name or saved_name
    elif overrides:
        raise ValueError("overrides are for a resumed run; apply them to the recipe instead")
    if recipe is None or data is None:
        raise ValueError("run_finetune needs a recipe and a prepared dataset")
    if recipe.task != task:
        raise ValueError(f"the recipe is for task {recipe.task!r}, not {task!r}")
    spec.check_recipe(recipe)
    runner = spec.runner(recipe)
    if runner is not None:
        return runner(recipe, data, init, out, recipe_name=recipe_name, console=console,
                      fingerprint=fingerprint)  # fmt: skip
    started = time.perf_counter()
    data = Path(data).resolve()
    dist = D.init_distributed(recipe.run.device)
    saved_info: dict[str, Any] = {}
    if dist.is_main:
        check_run_dir(out, resume)
        fingerprint = fingerprint or fingerprint_data(spec, data)
        if resume and (out / RUN_INFO).is_file():
            saved_info = json.loads((out / RUN_INFO).read_text())
            check_same_data(saved_info.get("data_fingerprint"), fingerprint, out)
    cfg = spec.section(recipe)
    train_data = spec.load_split(data, cfg.train_split)
    val_data = spec.load_split(data, cfg.val_split)
    train_data = spec.subset_train(recipe, train_data, f"{data} ({cfg.train_split})")
    val_data = spec.subset_val(recipe, val_data, f"{data} ({cfg.val_split})")

    backbone = load_backbone(init) if init is not None else None
    notes: list[str] = []
    if backbone is not None:
        recipe, notes = adapt_recipe_to_backbone(recipe, backbone)
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, path=str(data)))
    seed_everything(recipe.run.seed)  # the same initial head on every rank
    model = spec.build_model(recipe, train_data, backbone)
    del backbone

    items = spec.item_name
    dataset_card = _dataset_card(spec, data, cfg.val_split)
    training_card = {
        "task": task,
        "recipe": recipe_name or recipe.description or "custom",
        "initialised from": str(init) if init is not None else "scratch (random initialisation)",
        "training data": f"{data} ({cfg.train_split}: {len(train_data)} {items})",
        "model selection": f"best {spec.best_metric} on {cfg.val_split} ({len(val_data)} {items})",
        "evaluation": f"{cfg.val_split}, the split the model was selected on",
    }
    facts = spec.run_facts(recipe)
    if facts.get("few_shot_way") is not None:
        training_card["few-shot"] = (
            f"{facts['few_shot_way']}-way {facts['few_shot']}-shot episode (fold "
            f"{facts['few_shot_fold']}, {facts['few_shot_queries']} test {items} per class), "
            f"drawn with seed {recipe.run.seed}"
        )
    elif facts.get("few_shot") is not None:
        training_card["few-shot"] = (
            f"{facts['few_shot']} training {items} per class, drawn with seed {recipe.run.seed}"
        )
    model_dir = out / MODEL_DIR

    show = progress and dist.is_main

    def evaluate_val(module: nn.Module) -> dict[str, float]:
        with progress_reporter(console, "eval", len(val_data), items, show) as advance:
            report = evaluate(
                task, module.model, val_data, 1, batch_size=cfg.eval_batch_size, progress=advance
            )
        return dict(report.metrics)

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
                f"train_{items}": len(train_data),
                f"val_{items}": len(val_data),
                **facts,
                "notes": notes,
                "data_fingerprint": fingerprint,
            },
        )
        for note in notes:
            console.print(
                styled("[yellow]note:[/] {note} (from the pre-trained backbone)", note=note)
            )
        for change in changes:
            console.print(styled("[yellow]resumed with[/] {change}", change=change))
    trainer_started = time.perf_counter()
    trainer = Trainer(
        spec.training_step(model, recipe),
        spec.train_dataset(recipe, train_data),
        recipe,
        out,
        collate_fn=spec.collate_fn,
        prepare_batch=spec.prepare_batch(recipe),
        evaluate=evaluate_val,
        best_metric=spec.best_metric,
        best_mode=spec.best_mode,
        on_best=on_best,
        progress=progress,
        console=console,
        format_metrics=metric_formatter(spec),
        resume_hint=f"cd2p finetune {task} --resume {out}",
    )
    result = trainer.fit(resume=resume, stop_after=stop_after)

    final: dict[str, float] = {}
    if result.completed:
        # Every rank evaluates (scene tasks shard the scenes over the ranks); rank 0 writes.
        eval_started = time.perf_counter()
        best_model = spec.model_class.from_pretrained(str(model_dir)).to(trainer.device)
        votes = getattr(cfg, "votes", 1)  # a task without test-time votes has no such setting
        label = "final evaluation" + (f" ({votes} votes)" if votes > 1 else "")
        with progress_reporter(console, label, len(val_data), items, show) as advance:
            report = evaluate(
                task, best_model, val_data, votes, batch_size=cfg.eval_batch_size,
                progress=advance,
            )  # fmt: skip
        if show:
            console.print(f"{label}: {metric_formatter(spec)(report.metrics)}", soft_wrap=True)
        final = report.metrics
        best_step = (result.best or {}).get("step")
        training_card["best step"] = f"{best_step} of {result.total_steps}"
        if dist.is_main:
            # The trainer's wall time covers every session of a resumed run; this session's
            # set-up and the final evaluation are added.
            setup = trainer_started - started if not resume else 0.0
            wall = result.wall_seconds + setup + time.perf_counter() - eval_started
            prov = provenance(
                data=fingerprint,
                recipe=recipe,
                recipe_name=recipe_name,
                seeds=[recipe.run.seed],
                wall_time_s=wall,
                device=trainer.device,
                world_size=dist.world_size,
                run_dir=out,
                global_batch=recipe.data.batch_size,
            )
            card = {
                "metrics": final,
                "training": training_card,
                "dataset": dataset_card,
                "base_model": _hub_base_model(str(init) if init else None),
                "provenance": prov,
            }
            export_model(best_model, model_dir, recipe=recipe, **card)
            write_card_inputs(out, card)
            atomic_write_json(
                out / FINAL_METRICS,
                {
                    **report.to_json(),
                    "split": cfg.val_split,
                    "selected_on": cfg.val_split,
                    "evaluated_on": cfg.val_split,
                    "metric_names": list(final),
                    "best_step": best_step,
                    "data": str(data),
                    **facts,
                    f"train_{items}": len(train_data),
                    "provenance": prov,
                },
            )
    D.barrier()
    return FinetuneResult(
        result, model_dir if result.completed else None, final, result.best, recipe, notes
    )


__all__ = [
    "CARD_INPUTS",
    "FINAL_METRICS",
    "MODEL_DIR",
    "PROBE_DIR",
    "RUN_INFO",
    "FinetuneResult",
    "adapt_recipe_to_backbone",
    "build_task_model",
    "export_model",
    "fingerprint_data",
    "load_backbone",
    "run_finetune",
    "write_card_inputs",
]
