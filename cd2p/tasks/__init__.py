"""The task table: every fine-tuning task cd2p knows, one module and one entry each.

A task module (``cd2p/tasks/<name>.py``) defines ``TASK``, a frozen :class:`TaskSpec` that says
everything the rest of cd2p needs of it: how its prepared splits load, its training dataset,
how its model is built from a pre-trained backbone, its training step and per-step batch
preparation, its evaluation and the metric that picks the best model, its model kind (the
task's name), its recipe section, and what its model cards say. ``cd2p finetune``,
``cd2p evaluate``, ``cd2p predict``, ``cd2p.from_pretrained`` (dispatch on ``model_kind``) and
the cards read this table; nothing else branches on a task's name.

Adding a task: write ``cd2p/tasks/<name>.py`` with its ``TASK`` and add one line to
:data:`TASK_MODULES`. The modules are imported on first use, so listing the task names (the
CLI's choices) costs nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the table itself stays import-light
    from torch import nn
    from torch.utils.data import Dataset

    from cd2p.cards import PaperResult
    from cd2p.config import Recipe
    from cd2p.engine.evaluation import EvalReport
    from cd2p.models.backbone import Cd2pBackbone

#: task name (also its models' ``model_kind`` and the recipe's ``task``) -> its module.
TASK_MODULES: dict[str, str] = {
    "classification": "cd2p.tasks.classification",
    "partseg": "cd2p.tasks.partseg",
    "segmentation": "cd2p.tasks.segmentation",
    "detection": "cd2p.tasks.detection",
}


def _nothing(*_: Any) -> None:
    return None


def _unchanged(recipe: Recipe, data: Any, where: str) -> Any:  # noqa: ARG001
    return data


@dataclass(frozen=True)
class MetricLabel:
    """How a metric is shown: ``key`` in the metrics dict, ``label`` for people."""

    key: str
    label: str


@dataclass(frozen=True)
class TaskSpec:
    """Everything cd2p needs to know about one fine-tuning task.

    Data:
        load_split: ``(prepared dir, split name) -> split`` (the task's in-memory split type,
            with ``__len__``).
        data_source: ``prepared dir -> dataset name`` for cards and reports (``modelnet40``,
            ``synthetic-modelnet40``, ``scannet``...).
        train_dataset: ``(recipe, train split) -> Dataset`` of the training items.
        subset_train: ``(recipe, train split, where) -> split`` (few-shot subsets); identity by
            default.
        subset_val: ``(recipe, validation split, where) -> split``: the part of the validation
            split a run selects and evaluates on (a few-shot episode's query shapes); identity
            by default.
        collate_fn: turns items into a batch (``None``: torch's default).
    Model and step:
        model: ``"module:Class"`` of its Hub-loadable model (imported when used).
        build_model: ``(recipe, train split, pre-trained backbone or None) -> model``.
        training_step: ``(model, recipe) -> nn.Module`` whose ``forward(batch)`` returns
            ``{"loss": ..., "loss_*": ...}`` for the shared trainer.
        prepare_batch: ``recipe -> (batch, StepContext) -> batch`` run on the device before
            every step, or ``None``.
    Evaluation:
        evaluate: ``(model, split, *, votes, batch_size, num_points, progress, seed) ->``
            :class:`~cd2p.engine.evaluation.EvalReport`; under ``torchrun`` it returns the same
            numbers on every rank.
        best_metric / best_mode: the metric that selects the exported model.
        headline: metrics printed after training and evaluation, in order.
        per_class_columns: ``(header, key)`` columns of the per-class table of ``cd2p
            evaluate`` (rows of ``EvalReport.per_class``; ``*_vote`` columns are added when
            voting).
        plots: ``(report, out dir, title) -> written paths`` (confusion matrices...).
    Recipes, CLI and cards:
        recipe_section: the recipe section holding the task's settings; it has at least
            ``train_split``, ``val_split`` and ``eval_batch_size`` (and ``votes`` when the
            final evaluation averages several views).
        default_recipe: shipped recipe used when ``--recipe`` is not given.
        prepare_hint: the ``cd2p prepare`` command that makes its data.
        item_name: what a sample is called in messages (``shapes``, ``scenes``).
        check_recipe: raises ``ValueError`` for settings the task cannot honour.
        runner: ``recipe -> None`` or a function that runs the whole job instead of
            fine-tuning (classification's linear probe), called like ``run_linear_probe``.
        run_facts: ``recipe -> dict`` of task-specific facts written to ``run.json`` and
            ``metrics.json``.
        predict: ``(model, input path, output path, **options) -> summary`` behind ``cd2p
            predict`` for a user's own file, or ``None`` when the task has no such command.
        hub_task_type / hub_task_name / tags / paper_results: the model card's task, tags and
            the paper's numbers this task's metrics stand beside.
    """

    name: str
    summary: str
    model: str
    recipe_section: str
    default_recipe: str
    prepare_hint: str
    item_name: str
    load_split: Callable[[Path, str], Any]
    data_source: Callable[[Path], str]
    train_dataset: Callable[[Recipe, Any], Dataset]
    build_model: Callable[[Recipe, Any, Cd2pBackbone | None], nn.Module]
    training_step: Callable[[nn.Module, Recipe], nn.Module]
    evaluate: Callable[..., EvalReport]
    best_metric: str
    headline: tuple[MetricLabel, ...]
    per_class_columns: tuple[tuple[str, str], ...]
    hub_task_type: str
    hub_task_name: str
    best_mode: Literal["max", "min"] = "max"
    prepare_batch: Callable[[Recipe], Callable | None] = _nothing
    collate_fn: Callable[[list[Any]], Any] | None = None
    subset_train: Callable[[Recipe, Any, str], Any] = _unchanged
    subset_val: Callable[[Recipe, Any, str], Any] = _unchanged
    check_recipe: Callable[[Recipe], None] = _nothing
    runner: Callable[[Recipe], Callable | None] = _nothing
    run_facts: Callable[[Recipe], dict[str, Any]] = field(default=lambda recipe: {})
    plots: Callable[[EvalReport, Path, str], list[Path]] = field(default=lambda r, o, t: [])
    predict: Callable[..., dict[str, Any]] | None = None
    tags: tuple[str, ...] = ()
    paper_results: Sequence[PaperResult] = ()

    @property
    def model_class(self) -> type[nn.Module]:
        """The task's model class, imported now (a clear error if this cd2p lacks it)."""
        module_name, _, attr = self.model.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except ImportError as exc:
            from cd2p import __version__

            raise ValueError(
                f"model kind {self.name!r} is not available in this cd2p ({__version__}): "
                f"{exc}; upgrade cd2p to load it"
            ) from exc

    def section(self, recipe: Recipe) -> Any:
        """The recipe section holding this task's settings."""
        return getattr(recipe, self.recipe_section)


def task_names() -> tuple[str, ...]:
    """The names of every task, in table order (no task module is imported)."""
    return tuple(TASK_MODULES)


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of task ``name``; ``ValueError`` naming the known tasks."""
    if name not in TASK_MODULES:
        raise ValueError(f"unknown task {name!r}; cd2p has {', '.join(TASK_MODULES)}")
    spec = importlib.import_module(TASK_MODULES[name]).TASK
    if spec.name != name:  # a table entry pointing at the wrong module
        raise RuntimeError(f"{TASK_MODULES[name]}.TASK is task {spec.name!r}, not {name!r}")
    return spec


def all_tasks() -> list[TaskSpec]:
    """Every task's spec, in table order."""
    return [get_task(name) for name in TASK_MODULES]


__all__ = ["TASK_MODULES", "MetricLabel", "TaskSpec", "all_tasks", "get_task", "task_names"]
