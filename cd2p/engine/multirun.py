"""Several models on one dataset under one protocol: multi-seed fine-tuning (``cd2p finetune
--seeds 0,1,2``) and Point-BERT's few-shot protocol (``--few-shot-protocol``: N-way K-shot
episodes, 10 folds each), the summary of every metric over the models (mean ± standard
deviation with min and max), the evaluation of all of them (``cd2p evaluate`` over such a run)
and what ``cd2p compare`` reads.

Each member is an ordinary fine-tuning run (:func:`~cd2p.engine.finetune.run_finetune`) of the
task, with the base recipe and a few overrides (its ``run.seed``, its episode), so that
everything task-specific stays in the task table. Members run one after another; under
``torchrun`` each member uses all processes.

Run directory::

    RUN/multirun.json        kind, task, data, init, recipe name, command, members (name,
                             group, overrides)
    RUN/recipe.yaml          the base recipe (each member's own is in its directory)
    RUN/<member>/            an ordinary run: seed-0/, seed-1/, ... or 5way-10shot/fold-0/, ...
    RUN/few_shot_folds.json  (few-shot protocol) every fold's classes and shape ids
    RUN/summary.json         per group, every metric over its members: mean, std (sample,
                             n - 1), min, max, n and the values; per member its metrics; the
                             selection and evaluation splits; provenance

A run is resumed with the same command's ``--resume RUN``: finished members are kept, an
interrupted one continues from its checkpoint, the others start.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from cd2p._atomic import atomic_output, atomic_write_json
from cd2p._text import plain_console
from cd2p.config import Recipe, apply_overrides, load_recipe, save_recipe
from cd2p.engine import distributed as D
from cd2p.engine.finetune import (
    CARD_INPUTS,
    FINAL_METRICS,
    MODEL_DIR,
    RUN_INFO,
    fingerprint_data,
    run_finetune,
)
from cd2p.engine.trainer import check_run_dir
from cd2p.provenance import check_same_data, combine, recipe_sha256
from cd2p.tasks import get_task

MULTIRUN_INFO = "multirun.json"
SUMMARY = "summary.json"
FOLDS = "few_shot_folds.json"
STD_DEFINITION = "sample standard deviation (n - 1); null for a single value"

# The standard protocol of Point-BERT, reported by Point-MAE, ACT and ReCon.
FEW_SHOT_WAYS = (5, 10)
FEW_SHOT_SHOTS = (10, 20)
FEW_SHOT_FOLDS = 10
FEW_SHOT_QUERIES = 20

# Numbers of a metrics.json that describe the evaluation, not the model (for files written
# before metric_names existed).
_NOT_METRICS = {"samples", "votes", "best_step", "step", "epoch", "l2", "few_shot",
                "few_shot_way", "few_shot_fold", "few_shot_queries"}  # fmt: skip


@dataclass(frozen=True)
class Member:
    """One model of a multi-run: its directory name, the group its metrics are summarised in,
    and the recipe overrides (``section.key=value``) that make it."""

    name: str
    group: str
    overrides: tuple[str, ...]


def seed_members(seeds: Sequence[int]) -> list[Member]:
    """One member per seed: ``seed-<s>`` with ``run.seed=<s>``."""
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {list(seeds)}")
    group = f"{len(seeds)} seeds"
    return [Member(f"seed-{s}", group, (f"run.seed={s}",)) for s in seeds]


def few_shot_members(
    ways: Sequence[int] = FEW_SHOT_WAYS,
    shots: Sequence[int] = FEW_SHOT_SHOTS,
    folds: int = FEW_SHOT_FOLDS,
    queries: int = FEW_SHOT_QUERIES,
) -> list[Member]:
    """Point-BERT's few-shot protocol: for every N-way K-shot setting, ``folds`` episodes
    (``<N>way-<K>shot/fold-<f>``), each a fine-tuning run on its own episode."""
    if folds < 1 or not ways or not shots:
        raise ValueError("the few-shot protocol needs at least one way, one shot and one fold")
    return [
        Member(
            f"{way}way-{shot}shot/fold-{fold}",
            f"{way}-way {shot}-shot",
            (f"finetune.few_shot={shot}", f"finetune.few_shot_way={way}",
             f"finetune.few_shot_fold={fold}", f"finetune.few_shot_queries={queries}"),
        )  # fmt: skip
        for way in ways
        for shot in shots
        for fold in range(folds)
    ]


@dataclass
class MultiRunResult:
    """The outcome of :func:`run_multi`: the summary (as in ``summary.json``) and the members
    that were trained in this call (the others were already done)."""

    out: Path
    summary: dict[str, Any]
    trained: list[str] = field(default_factory=list)


def is_multirun(path: str | Path) -> bool:
    """Whether ``path`` is the directory of a multi-seed or few-shot-protocol run."""
    return (Path(path) / MULTIRUN_INFO).is_file()


def read_multirun(out: str | Path) -> tuple[dict[str, Any], list[Member]]:
    """``multirun.json`` of a run and its members."""
    path = Path(out) / MULTIRUN_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out} is not a multi-seed or few-shot run")
    try:
        info = json.loads(path.read_text())
        members = [Member(m["name"], m["group"], tuple(m["overrides"])) for m in info["members"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a cd2p multi-run record: {exc}") from None
    return info, members


def member_recipe(recipe: Recipe, member: Member) -> Recipe:
    """The recipe of one member: the base recipe with the member's overrides."""
    return apply_overrides(recipe, member.overrides)


# -- statistics ----------------------------------------------------------------------------------


def metric_values(metrics_json: Mapping[str, Any]) -> dict[str, float]:
    """The model metrics of a ``metrics.json`` (its ``metric_names``; for older files, every
    top-level number that is not evaluation bookkeeping)."""
    names = metrics_json.get("metric_names")
    if not isinstance(names, list):
        names = [k for k, v in metrics_json.items() if isinstance(v, int | float)
                 and not isinstance(v, bool) and k not in _NOT_METRICS
                 and not k.startswith(("train_", "val_"))]  # fmt: skip
    return {
        k: float(metrics_json[k]) for k in names if isinstance(metrics_json.get(k), int | float)
    }


def describe(values: Sequence[float]) -> dict[str, Any]:
    """``mean``, ``std`` (sample, n - 1; ``None`` for one value), ``min``, ``max``, ``n`` and
    the ``values`` themselves."""
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def summarize_groups(
    per_member: Mapping[str, Mapping[str, float]], groups: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
    """Every metric of every group over its members (in member order): :func:`describe`.

    A metric enters a group's summary only when every member of the group has it (a run with
    and one without votes are not averaged together)."""
    out: dict[str, Any] = {}
    for group, names in groups.items():
        present = [per_member[n] for n in names if n in per_member]
        metrics: dict[str, Any] = {}
        if present:
            common = [k for k in present[0] if all(k in m for m in present)]
            metrics = {k: describe([m[k] for m in present]) for k in common}
        out[group] = {"n": len(present), "members": list(names), "metrics": metrics}
    return out


# -- running ------------------------------------------------------------------------------------


def _write_folds(out: Path, task: str, recipe: Recipe, data: Path, members: Sequence[Member]):
    """``few_shot_folds.json``: the classes and shape ids of every fold, before training (the
    folds are a pure function of the seed; this is their record)."""
    from cd2p.data.classification import episode_record, episode_split
    from cd2p.tasks.classification import recipe_episode

    spec = get_task(task)
    cfg = spec.section(recipe)
    train_all = spec.load_split(data, cfg.train_split)
    test_all = spec.load_split(data, cfg.val_split)
    folds = {}
    for member in members:
        episode = recipe_episode(member_recipe(recipe, member))
        if episode is None:
            continue
        where = f"{data} ({cfg.train_split})"
        train = episode_split(train_all, episode, "train", where)
        test = episode_split(test_all, episode, "test", f"{data} ({cfg.val_split})")
        folds[member.name] = episode_record(train, test, episode)
    atomic_write_json(out / FOLDS, {"seed": recipe.run.seed, "folds": folds})


def run_multi(
    task: str,
    recipe: Recipe | None,
    data: str | Path | None,
    init: str | Path | None,
    out: str | Path,
    members: Sequence[Member] | None = None,
    *,
    kind: str = "seeds",
    command: str = "",
    resume: bool = False,
    progress: bool = True,
    recipe_name: str | None = None,
    console: Console | None = None,
    on_member: Callable[[int, int, Member, str], None] | None = None,
) -> MultiRunResult:
    """Train every member (one after another), then summarise them into ``summary.json`` and
    re-render every member's model card with the summary.

    Args:
        kind: ``seeds`` or ``few-shot-protocol`` (what the members vary).
        command: the command line, for the records and cards.
        resume: continue the run in ``out`` (its saved recipe, data, init and members).
        on_member: ``(index, count, member, state)`` before each member; ``state`` is
            ``done`` (kept), ``resume`` or ``new``.
    """
    out = Path(out)
    console = console or plain_console(stderr=True)
    spec = get_task(task)
    dist = D.init_distributed(recipe.run.device if recipe is not None else "auto")
    if resume:
        info, members = read_multirun(out)
        if info.get("task") != task:
            raise ValueError(f"{out} is a {info.get('task')} run, not {task}")
        if recipe is not None:
            raise ValueError(f"{out} is resumed with its saved recipe; omit --recipe/--set")
        recipe = load_recipe(out / "recipe.yaml")
        data, init = data or info["data"], info.get("init")
        recipe_name, kind = recipe_name or info.get("recipe_name"), info.get("kind", kind)
        command = info.get("command", command)
    if recipe is None or data is None or not members:
        raise ValueError("a multi-run needs a recipe, a prepared dataset and its members")
    if recipe.task != task:
        raise ValueError(f"the recipe is for task {recipe.task!r}, not {task!r}")
    data = Path(data).resolve()
    for member in members:  # every member's recipe is valid before anything is trained
        spec.check_recipe(member_recipe(recipe, member))
    fingerprint = None
    if dist.is_main:
        check_run_dir(out, resume)
        fingerprint = fingerprint_data(spec, data)
        if resume:
            check_same_data(info.get("data_fingerprint"), fingerprint, out)
        else:
            out.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, out / "recipe.yaml")
            atomic_write_json(out / MULTIRUN_INFO, {
                "kind": kind, "task": task, "data": str(data),
                "init": str(init) if init is not None else None, "recipe_name": recipe_name,
                "command": command, "data_fingerprint": fingerprint,
                "members": [asdict(m) | {"overrides": list(m.overrides)} for m in members],
            })  # fmt: skip
            if kind == "few-shot-protocol":
                _write_folds(out, task, recipe, data, members)
    D.barrier()
    trained = []
    for index, member in enumerate(members):
        mdir = out / member.name
        recipe_m = member_recipe(recipe, member)
        done = (mdir / FINAL_METRICS).is_file()
        resumable = (spec.runner(recipe_m) is None and (mdir / RUN_INFO).is_file()
                     and (mdir / "recipe.yaml").is_file())  # fmt: skip
        state = "done" if done else ("resume" if resumable else "new")
        if on_member is not None and dist.is_main:
            on_member(index, len(members), member, state)
        if done:
            continue
        if state == "new" and mdir.exists() and dist.is_main:
            # A member that stopped before it had anything to resume from (or a linear probe,
            # which is not resumable): start it again.
            shutil.rmtree(mdir)
        D.barrier()
        run_finetune(
            task,
            None if resumable else recipe_m,
            data,
            init,
            mdir,
            resume=resumable,
            progress=progress,
            recipe_name=recipe_name,
            console=console,
            fingerprint=fingerprint,
        )
        trained.append(member.name)
    summary: dict[str, Any] = {}
    if dist.is_main:
        summary = summarize_multirun(out)
        atomic_write_json(out / SUMMARY, summary)
        rerender_member_cards(out, summary)
    D.barrier()
    return MultiRunResult(out, summary, trained)


def summarize_multirun(out: str | Path) -> dict[str, Any]:
    """``summary.json`` of a multi-run from its members' ``metrics.json``."""
    out = Path(out)
    info, members = read_multirun(out)
    per_member: dict[str, dict[str, float]] = {}
    records: dict[str, Any] = {}
    provenances = []
    splits: dict[str, set[str]] = {"selected_on": set(), "evaluated_on": set()}
    for member in members:
        path = out / member.name / FINAL_METRICS
        if not path.is_file():
            continue
        metrics_json = json.loads(path.read_text())
        per_member[member.name] = metric_values(metrics_json)
        for key in splits:
            value = metrics_json.get(key) or metrics_json.get("split")
            if value:
                splits[key].add(str(value))
        prov = metrics_json.get("provenance") or {}
        provenances.append(prov)
        records[member.name] = {
            "group": member.group,
            "seed": (prov.get("seeds") or [None])[0],
            "metrics": per_member[member.name],
            "best_step": metrics_json.get("best_step"),
            "votes": metrics_json.get("votes"),
        }
    groups: dict[str, list[str]] = {}
    for member in members:
        groups.setdefault(member.group, []).append(member.name)
    missing = [m.name for m in members if m.name not in per_member]
    return {
        "kind": info.get("kind"),
        "task": info.get("task"),
        "data": info.get("data"),
        "init": info.get("init"),
        "recipe_name": info.get("recipe_name"),
        "command": info.get("command"),
        "selection_split": ", ".join(sorted(splits["selected_on"])) or None,
        "evaluation_split": ", ".join(sorted(splits["evaluated_on"])) or None,
        "std": STD_DEFINITION,
        "complete": not missing,
        "missing": missing,
        "groups": summarize_groups(per_member, groups),
        "members": records,
        "provenance": {
            **combine(provenances),
            "data": info.get("data_fingerprint"),
            "recipe": {"name": info.get("recipe_name"), "sha256": _recipe_hash(out)},
        },
    }


def _recipe_hash(out: Path) -> str | None:
    """The SHA-256 of the base recipe (each member's differs by its seed or episode)."""
    path = out / "recipe.yaml"
    return recipe_sha256(path.read_text()) if path.is_file() else None


def member_runs_context(summary: Mapping[str, Any], member: str) -> dict[str, Any]:
    """What a member's model card says about the run it belongs to (its own group)."""
    group = (summary.get("members") or {}).get(member, {}).get("group")
    groups = {group: summary["groups"][group]} if group in (summary.get("groups") or {}) else {}
    n = next(iter(groups.values()))["n"] if groups else 0
    description = (f"{n} seeds" if summary.get("kind") == "seeds"
                   else f"the {n} folds of {group}")  # fmt: skip
    return {
        "description": description,
        "kind": summary.get("kind"),
        "member": member,
        "member_metrics": (summary.get("members") or {}).get(member, {}).get("metrics", {}),
        "members": n,
        "command": summary.get("command") or "cd2p finetune",
        "selection_split": summary.get("selection_split"),
        "evaluation_split": summary.get("evaluation_split"),
        "std": STD_DEFINITION,
        "groups": {g: {"n": v["n"], "metrics": {k: {s: x for s, x in stats.items()
                                                   if s != "values"}
                                               for k, stats in v["metrics"].items()}}
                   for g, v in groups.items()},
    }  # fmt: skip


def rerender_member_cards(out: Path, summary: Mapping[str, Any]) -> list[Path]:
    """Render every member's model card again, adding the summary over the members."""
    from cd2p.hub import from_pretrained

    written = []
    for name in summary.get("members") or {}:
        run_dir = out / name
        model_dir, inputs = run_dir / MODEL_DIR, run_dir / CARD_INPUTS
        if not (model_dir / "config.json").is_file() or not inputs.is_file():
            continue  # a linear probe has no model; an old run no card inputs
        card_kwargs = json.loads(inputs.read_text())
        recipe_file = run_dir / "recipe.yaml"
        recipe = recipe_file.read_text() if recipe_file.is_file() else None
        model = from_pretrained(model_dir)
        card = model.generate_model_card(
            recipe=recipe, runs=member_runs_context(summary, name), **card_kwargs
        )
        with atomic_output(model_dir / "README.md") as tmp:
            tmp.write_text(str(card))
        written.append(model_dir / "README.md")
    return written


# -- evaluating every member ----------------------------------------------------------------------


def evaluate_multirun(
    task: str,
    run_dir: str | Path,
    data: str | Path,
    split: str | None = None,
    votes: int = 1,
    *,
    num_points: int | None = None,
    batch_size: int = 32,
    device: Any = "cpu",
    on_member: Callable[[str, int], Callable[[int], None] | None] | None = None,
) -> dict[str, Any]:
    """Evaluate every member's model of a multi-run on prepared data (each member's recipe
    chooses its part of the split: a few-shot fold's query shapes); returns a summary in the
    layout of ``summary.json`` (groups, members) with the split and votes used."""
    from cd2p.engine.evaluation import default_split, evaluate

    run_dir, data = Path(run_dir), Path(data)
    spec = get_task(task)
    info, members = read_multirun(run_dir)
    if info.get("task") != task:
        raise ValueError(f"{run_dir} holds {info.get('task')} models, not {task}")
    split = split or default_split(task)
    loaded = spec.load_split(data, split)
    per_member: dict[str, dict[str, float]] = {}
    records: dict[str, Any] = {}
    started = time.perf_counter()
    for member in members:
        model_dir = run_dir / member.name / MODEL_DIR
        if not (model_dir / "config.json").is_file():
            continue  # not trained yet, or a linear probe (no model to evaluate)
        recipe = load_recipe(run_dir / member.name / "recipe.yaml")
        part = spec.subset_val(recipe, loaded, f"{data} ({split})")
        model = spec.model_class.from_pretrained(str(model_dir)).to(device)
        progress = on_member(member.name, len(part)) if on_member is not None else None
        report = evaluate(task, model, part, votes, num_points=num_points,
                          batch_size=batch_size, progress=progress)  # fmt: skip
        per_member[member.name] = dict(report.metrics)
        records[member.name] = {"group": member.group, "metrics": dict(report.metrics),
                                "samples": report.num_samples}  # fmt: skip
    if not per_member:
        raise ValueError(f"{run_dir} has no trained model to evaluate yet")
    groups: dict[str, list[str]] = {}
    for member in members:
        if member.name in per_member:
            groups.setdefault(member.group, []).append(member.name)
    return {
        "kind": info.get("kind"),
        "task": task,
        "model": str(run_dir),
        "data": str(data),
        "split": split,
        "votes": votes,
        "std": STD_DEFINITION,
        "groups": summarize_groups(per_member, groups),
        "members": records,
        "seconds": round(time.perf_counter() - started, 3),
    }


__all__ = [
    "FEW_SHOT_FOLDS",
    "FEW_SHOT_QUERIES",
    "FEW_SHOT_SHOTS",
    "FEW_SHOT_WAYS",
    "FOLDS",
    "MULTIRUN_INFO",
    "SUMMARY",
    "Member",
    "MultiRunResult",
    "describe",
    "evaluate_multirun",
    "few_shot_members",
    "is_multirun",
    "member_recipe",
    "member_runs_context",
    "metric_values",
    "read_multirun",
    "rerender_member_cards",
    "run_multi",
    "seed_members",
    "summarize_groups",
    "summarize_multirun",
]
