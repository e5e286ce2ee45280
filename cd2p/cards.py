"""Model cards: what a cd2p model's card says, rendered from the ``hubcards/<model_kind>.md``
templates by :meth:`cd2p.models.hub.Cd2pHubMixin.generate_model_card`.

:func:`card_context` gathers what a template may use (config, size, the run's metrics, recipe,
training facts, dataset, base model and the paper's results next to this model's);
:func:`card_metadata` builds the card's YAML header (tags, datasets, ``base_model``,
``model-index``) so that the Hub reads it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCardData

# The pre-trained backbone's card entries; a task's come from its entry in the task table.
BACKBONE_HUB_TASK = {"type": "feature-extraction", "name": "3D point-cloud pre-training"}
BACKBONE_TAGS = ("feature-extraction", "self-supervised-learning")
PRETRAINED_KINDS = ("backbone", "pretrain")
# The whole student (`cd2p caption`, `cd2p zeroshot`): its results are zero-shot ones.
STUDENT_KIND = "student"
ZERO_SHOT_HUB_TASK = {"type": "zero-shot-classification", "name": "3D zero-shot classification"}
STUDENT_TAGS = ("zero-shot-classification", "image-to-text", "captioning")

# Benchmarks recognised in recipe / data names: slug -> (display name, Hub-style dataset id).
KNOWN_DATASETS: dict[str, tuple[str, str]] = {
    "modelnet40": ("ModelNet40", "modelnet40"),
    "scanobjectnn": ("ScanObjectNN", "scanobjectnn"),
    "shapenetpart": ("ShapeNetPart", "shapenetpart"),
    "scannet": ("ScanNetV2", "scannet"),
}


@dataclasses.dataclass(frozen=True)
class PaperResult:
    """One row of the paper's results (docs/method.md#paper-results): a metric of the paper,
    its baselines, and the run metric names (normalised, see :func:`_norm`) that measure the
    same thing. Each task declares its rows in its task-table entry."""

    label: str
    aliases: tuple[str, ...]
    scratch: float | None
    point_mae: float | None
    paper: float
    dataset_id: str  # the benchmark the numbers are on; a run's metric is shown only there


def hub_task(model_kind: str) -> dict[str, str]:
    """``{"type", "name"}`` of a model kind for the Hub's ``model-index``."""
    if model_kind in PRETRAINED_KINDS:
        return dict(BACKBONE_HUB_TASK)
    if model_kind == STUDENT_KIND:
        return dict(ZERO_SHOT_HUB_TASK)
    spec = _task_spec(model_kind)
    if spec is None:
        return {"type": model_kind, "name": model_kind}
    return {"type": spec.hub_task_type, "name": spec.hub_task_name}


def kind_tags(model_kind: str) -> list[str]:
    """The Hub tags of a model kind (on top of cd2p's own)."""
    if model_kind in PRETRAINED_KINDS:
        return list(BACKBONE_TAGS)
    if model_kind == STUDENT_KIND:
        return list(STUDENT_TAGS)
    spec = _task_spec(model_kind)
    return list(spec.tags) if spec is not None else []


def paper_results(model_kind: str) -> list[PaperResult]:
    """The paper's results a model of this kind stands beside: its task's rows, or every
    task's for a pre-trained backbone."""
    from cd2p.tasks import all_tasks

    if model_kind in PRETRAINED_KINDS:
        return [row for spec in all_tasks() for row in spec.paper_results]
    spec = _task_spec(model_kind)
    return list(spec.paper_results) if spec is not None else []


def _task_spec(model_kind: str):
    from cd2p.tasks import get_task, task_names

    return get_task(model_kind) if model_kind in task_names() else None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _norm(name: str) -> str:
    """``"mAP@0.25"`` -> ``"map_0_25"``: metric names compared case- and punctuation-free."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _recipe_dict(recipe: Any) -> dict[str, Any] | None:
    if recipe is None:
        return None
    if dataclasses.is_dataclass(recipe) and not isinstance(recipe, type):
        return dataclasses.asdict(recipe)
    if isinstance(recipe, str):
        loaded = yaml.safe_load(recipe)
        return dict(loaded) if isinstance(loaded, Mapping) else None
    if isinstance(recipe, Mapping):
        return dict(recipe)
    raise TypeError(f"recipe must be a dataclass, a mapping or YAML text, got {type(recipe)}")


def _find_key(tree: Any, names: tuple[str, ...]) -> Any:
    """First value of a key in ``names`` anywhere in a nested mapping (sections first-level)."""
    if not isinstance(tree, Mapping):
        return None
    for name in names:
        if tree.get(name) not in (None, ""):
            return tree[name]
    for value in tree.values():
        found = _find_key(value, names)
        if found not in (None, ""):
            return found
    return None


def _dataset_info(dataset: Any, recipe: dict[str, Any] | None) -> dict[str, str] | None:
    """``{"name", "id", "split"}`` of the evaluation data, from an explicit value or the recipe."""
    if isinstance(dataset, Mapping):
        info = {k: str(v) for k, v in dataset.items() if v is not None}
    elif isinstance(dataset, str) and dataset:
        info = {"name": dataset}
    else:
        info = {}
        if recipe is not None:
            hint = _find_key(recipe.get("data"), ("dataset", "name", "variant")) or ""
            path = (recipe.get("data") or {}).get("path") or ""
            text = _norm(f"{hint} {Path(str(path)).name} {recipe.get('description', '')}")
            for slug, (name, hub_id) in KNOWN_DATASETS.items():
                if slug in text.replace("_", ""):
                    # "synthetic ScanNet pairs" are not ScanNet: named, never a Hub dataset.
                    synthetic = "synthetic" in text
                    info = ({"name": f"synthetic-{slug}", "id": f"synthetic-{slug}"}
                            if synthetic else {"name": name, "id": hub_id})  # fmt: skip
                    break
            else:
                if hint or path:
                    info = {"name": str(hint or Path(str(path)).name)}
    if not info.get("name"):
        return None
    if "id" not in info:
        slug = _norm(info["name"]).replace("_", "")
        info["id"] = KNOWN_DATASETS.get(slug, (info["name"], _norm(info["name"])))[1]
    return info


def hub_dataset_id(info: Mapping[str, Any] | None) -> str | None:
    """The Hub dataset id of a dataset record (``{"name", "id"}``), only when the data really
    is one of the benchmarks: never for synthetic data, a user's own data or an unknown name."""
    if not info:
        return None
    text = _norm(f"{info.get('name', '')} {info.get('id') or ''}")
    if "synthetic" in text:
        return None
    slug = _norm(str(info.get("id") or info.get("name") or "")).replace("_", "")
    return next((hub for key, (_, hub) in KNOWN_DATASETS.items() if slug.startswith(key)), None)


# -- how the model was made (cd2p.origin records it; the card says it) ------------------------

_TEACHER_PHRASES = {
    "clip+clipcap": "a frozen CLIP ViT-B/32 + ClipCap teacher",
    "clip": "a frozen CLIP ViT-B/32 teacher",
    "random": "a seeded **RANDOM teacher** (CLIP ViT-B/32 + ClipCap's architecture with random "
    "weights, **not CLIP**)",
    "unknown": "its teacher (not recorded with this checkpoint; see the training section)",
}


def origin_from_facts(
    model_kind: str,
    training: Mapping[str, Any] | None,
    base_model: str | None = None,
) -> dict[str, Any] | None:
    """What a locally exported card knows of how its model was made, from the training facts
    the engine gives it (``teacher``, ``random teacher``, ``objective``, ``initialised
    from``). A push computes the whole origin from the run's records instead
    (:func:`cd2p.origin.model_origin`)."""
    training = dict(training or {})
    if not training:
        return None
    if model_kind in PRETRAINED_KINDS or model_kind == STUDENT_KIND:
        objective = training.get("objective")
        description = str(training.get("teacher") or "")
        if str(training.get("random teacher", "")).startswith("yes"):
            teacher = {"kind": "random", "description": description}
        elif objective == "mae" or description.startswith("none"):
            teacher = {"kind": "none", "description": description or "none"}
        elif description:
            kind = "clip" if objective == "distill-clip" else "clip+clipcap"
            teacher = {"kind": kind, "description": description}
        else:
            teacher = {"kind": "unknown"}
        return {"made_by": "pre-training", "objective": objective, "teacher": teacher,
                "init": {"kind": "random", "source": None}}  # fmt: skip
    init = str(training.get("initialised from") or "")
    if init.startswith("scratch"):
        return {"made_by": "fine-tuning", "teacher": {"kind": "none"},
                "init": {"kind": "scratch", "source": None}}  # fmt: skip
    if base_model:
        return {"made_by": "fine-tuning", "teacher": {"kind": "unknown"},
                "init": {"kind": "hub", "source": base_model}}  # fmt: skip
    if init:
        return {"made_by": "fine-tuning", "teacher": {"kind": "unknown"},
                "init": {"kind": "pre-trained", "source": Path(init).name}}  # fmt: skip
    return None


def _data_text(data: Mapping[str, Any] | None) -> str:
    if not data:
        return "not recorded"
    name = f"`{data.get('name')}`"
    if data.get("synthetic"):
        return f"{name}: **synthetic** (written by `cd2p synthetic`), not a real dataset"
    if data.get("synthetic") is None:
        return f"{name} (whether it is synthetic is not recorded)"
    hub = data.get("hub_id")
    return f"{name}" + (f" (the {hub} benchmark)" if hub else "")


def describe_origin(origin: Mapping[str, Any] | None, model_kind: str) -> dict[str, Any]:
    """The card's words for an origin (:func:`cd2p.origin.model_origin`):

    - ``pretraining``: how a backbone's weights were learnt (the backbone card's intro);
    - ``teacher_phrase``: who the student imitated (the student card's intro);
    - ``backbone``: how a task model's backbone started (the task cards' intros);
    - ``warnings``: the prominent notes (RANDOM teacher, synthetic data, unfinished run);
    - ``rows``: ``(label, value)`` of the "how this model was made" table.
    """
    origin = dict(origin or {})
    teacher = dict(origin.get("teacher") or {"kind": "unknown"})
    tkind = teacher.get("kind", "unknown")
    init = dict(origin.get("init") or {"kind": "unknown"})
    ikind = init.get("kind", "unknown")
    pretraining = origin.get("made_by") == "pre-training" or (
        not origin and model_kind in (*PRETRAINED_KINDS, STUDENT_KIND)
    )

    if tkind in ("clip+clipcap", "clip"):
        learnt = (
            "pre-trained by distilling 2D image knowledge into 3D point clouds: "
            f"{_TEACHER_PHRASES[tkind]} turns the RGB frame paired with each point cloud into "
            + ("a semantic prefix `(10, 768)`" if tkind == "clip+clipcap" else "an embedding")
            + ", and the student learns to reproduce it through learnable concept queries that "
            "read every transformer block"
        )
    elif tkind == "random":
        learnt = (
            f"pre-trained by distillation from {_TEACHER_PHRASES['random']}: it learnt to "
            "reproduce random features of the RGB frames, a test of the pipeline that carries "
            "no image knowledge"
        )
    elif tkind == "none":
        learnt = "pre-trained by masked point reconstruction alone (objective `mae`: no teacher)"
    else:
        learnt = "whose training (its teacher and data) is not recorded with this checkpoint"

    source = f" (`{init['source']}`)" if init.get("source") else ""
    if ikind == "scratch":
        backbone = ("started from random weights (trained from scratch: no pre-training, no "
                    "distillation)")  # fmt: skip
    elif ikind == "converted":
        backbone = (f"initialised from a {init.get('layout') or 'Point-MAE'} checkpoint "
                    "converted with `cd2p convert point-mae` (no distillation)")  # fmt: skip
    elif tkind in ("clip+clipcap", "clip"):
        backbone = ("pre-trained by distilling CLIP"
                    + (" + ClipCap" if tkind == "clip+clipcap" else "")
                    + f" knowledge from RGB images into point clouds{source}")  # fmt: skip
    elif tkind == "random":
        backbone = (f"initialised from a backbone{source} distilled from a seeded **RANDOM "
                    "teacher** (not CLIP: a pipeline test, no image knowledge)")  # fmt: skip
    elif tkind == "none" and ikind in ("pre-trained", "hub"):
        backbone = (f"initialised from a backbone{source} pre-trained by masked point "
                    "reconstruction (`mae`: no teacher)")  # fmt: skip
    elif ikind == "hub":
        backbone = (f"initialised from the Hub backbone `{init.get('source')}` (its card says "
                    "how it was pre-trained)")  # fmt: skip
    elif ikind in ("pre-trained", "unknown") and init.get("source"):
        backbone = (f"initialised from the backbone `{init['source']}`, whose pre-training is "
                    "not recorded with this checkpoint")  # fmt: skip
    else:
        backbone = "whose initialisation is not recorded with this checkpoint"

    warnings = []
    subject = "This model was" if pretraining else "Its backbone was"
    if tkind == "random":
        warnings.append(
            f"**RANDOM teacher, not CLIP.** {subject} distilled from a seeded random teacher "
            f"({teacher.get('description') or 'RANDOM teacher'}), which exists to test the "
            "pipeline offline: its features carry no knowledge of CLIP or ClipCap. "
            + ("It is not a pre-trained model." if pretraining else
               "Its results say nothing about what distillation brings.")
        )
    data = origin.get("data") or {}
    if data.get("synthetic"):
        warnings.append(
            f"**Synthetic data.** It was trained on `{data.get('name')}`, written by cd2p's "
            "synthetic generator, not on a real dataset: a demonstration, not a benchmark "
            "result."
        )
    init_data = init.get("data") or {}
    if init_data.get("synthetic"):
        warnings.append(
            f"**Backbone pre-trained on synthetic data** (`{init_data.get('name')}`), not on "
            "real scans."
        )
    training = origin.get("training") or {}
    if origin.get("finished") is False:
        warnings.append(
            "**Unfinished training.** The run stopped before its schedule ended "
            f"({training.get('why') or 'see the training section'}): these are intermediate "
            "weights."
        )

    rows: list[tuple[str, str]] = []
    if origin and origin.get("made_by") not in (None, "unknown", "conversion"):
        made = str(origin["made_by"])
        if origin.get("objective"):
            made += f" (objective `{origin['objective']}`)"
        rows.append(("made by", made))
        label = "teacher" if pretraining else "teacher (of the backbone)"
        if tkind == "none":
            value = "none" + (": trained from scratch" if ikind == "scratch" else
                              ": no distillation")  # fmt: skip
        elif tkind == "unknown":
            value = "not recorded"
        else:
            value = str(teacher.get("description") or tkind)
            if tkind == "random":
                value = f"**RANDOM, not CLIP**: {value}"
        rows.append((label, value))
        if "data" in origin:  # a local card's facts say nothing of it: no row
            rows.append(("training data", _data_text(origin.get("data"))))
        if pretraining:
            start = "random weights (pre-training starts from scratch)"
        elif ikind == "scratch":
            start = "random weights: trained from scratch, no pre-trained backbone"
        elif ikind == "converted":
            start = f"converted {init.get('layout') or 'Point-MAE'} checkpoint"
        elif ikind == "hub":
            start = f"the Hub backbone [`{init.get('source')}`](https://huggingface.co/" \
                    f"{init.get('source')})"
        elif ikind == "pre-trained":
            start = f"the cd2p backbone `{init.get('source')}`"
            if init.get("objective"):
                start += f", pre-trained with objective `{init['objective']}`"
        else:
            start = f"not recorded{source}"
        if init_data:
            start += f" on {_data_text(init_data)}"
        rows.append(("initialisation", start))
        finished = origin.get("finished", "absent")  # absent: a local card's facts
        steps = training.get("step")
        total = training.get("total_steps")
        if finished is True:
            rows.append(("training finished", f"yes ({steps} of {total} steps)"
                         if steps is not None and total else "yes"))  # fmt: skip
        elif finished is False:
            rows.append(("training finished", f"**no**: {training.get('why')}"))
        elif finished is None:
            rows.append(("training finished", "not recorded"))
    return {
        "pretraining": learnt,
        "teacher_phrase": _TEACHER_PHRASES.get(tkind, _TEACHER_PHRASES["unknown"])
        if tkind != "none" else "no teacher",
        "backbone": backbone,
        "warnings": warnings,
        "rows": rows,
    }


def origin_markdown(made: Mapping[str, Any]) -> tuple[str, str]:
    """``(warnings, table)``: the block under the card's title and the "how this model was
    made" table that opens its training section."""
    warnings = "".join(f"> {w}\n>\n" for w in made.get("warnings") or [])
    if warnings:
        warnings = warnings[: -len(">\n")] + "\n"
    rows = made.get("rows") or []
    table = ""
    if rows:
        table = "| how this model was made | |\n|---|---|\n" + "".join(
            f"| {label} | {value} |\n" for label, value in rows
        ) + "\n"
    return warnings, table


def _training_summary(recipe: dict[str, Any] | None) -> dict[str, Any]:
    """Readable facts of a recipe: objective, schedule, optimizer, points and patches."""
    if not recipe:
        return {}
    out: dict[str, Any] = {"task": recipe.get("task")}
    objective = (recipe.get("pretrain") or {}).get("objective")
    if recipe.get("task") == "pretrain" and objective:
        out["objective"] = objective
    schedule = recipe.get("schedule") or {}
    if schedule.get("max_steps"):
        out["steps"] = schedule["max_steps"]
    elif schedule.get("epochs"):
        out["epochs"] = f"{schedule['epochs']} (warm-up {schedule.get('warmup_epochs', 0)})"
    optim = recipe.get("optim") or {}
    if optim.get("name"):
        out["optimizer"] = (
            f"{optim['name']}, lr {optim.get('lr')}, weight decay {optim.get('weight_decay')}"
        )
    data = recipe.get("data") or {}
    if data.get("batch_size"):
        out["batch size"] = data["batch_size"]
    if data.get("num_points"):
        out["points per sample"] = data["num_points"]
    return {k: v for k, v in out.items() if v not in (None, "")}


def _fmt_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def _fmt_seconds(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {sec:02d} s"


def public_provenance(prov: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A provenance record fit for a public card: local paths reduced to their last part."""
    if not prov:
        return None
    out = dict(prov)
    if isinstance(out.get("data"), Mapping):
        data = dict(out["data"])
        if data.get("path"):
            data["path"] = Path(str(data["path"])).name
        out["data"] = data
    return out


def provenance_rows(prov: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` rows of a provenance record (:mod:`cd2p.provenance`) for people."""
    rows: list[tuple[str, str]] = []
    commit = prov.get("git_commit")
    version = str(prov.get("cd2p_version", "?"))
    if commit:
        version += f" (git {str(commit)[:12]}{', modified' if prov.get('git_dirty') else ''})"
    rows.append(("cd2p", version))
    rows.append(("torch / CUDA / cuDNN",
                 f"{prov.get('torch')} / {prov.get('cuda') or 'none'} / "
                 f"{prov.get('cudnn') or 'none'}"))  # fmt: skip
    hw = prov.get("hardware") or {}
    if hw:
        device = (f"{hw.get('gpus', 1)} x {hw['gpu']}" if hw.get("gpu")
                  else f"CPU, {hw.get('processes', 1)} process(es)")  # fmt: skip
        rows.append(("hardware", f"{device}; {hw.get('cpu_count')} CPU cores ({hw.get('cpu')})"))
    data = prov.get("data") or {}
    if data.get("sha256"):
        rows.append(("data fingerprint", f"sha256 `{data['sha256'][:16]}…` "
                     f"({data.get('files')} files, {_fmt_bytes(data.get('bytes') or 0)})"))
    recipe = prov.get("recipe") or {}
    if recipe.get("sha256"):
        rows.append(("recipe", f"{recipe.get('name') or 'custom'}, sha256 "
                     f"`{recipe['sha256'][:16]}…`"))  # fmt: skip
    if prov.get("seeds") is not None:
        rows.append(("seeds", ", ".join(str(s) for s in prov["seeds"])))
    if prov.get("wall_time_s") is not None:
        rows.append(("wall time", f"{_fmt_seconds(prov['wall_time_s'])} "
                     f"({prov.get('gpu_hours', 0):.3g} GPU-hours)"))  # fmt: skip
    if prov.get("samples_per_s"):
        rows.append(("training throughput", f"{prov['samples_per_s']:.1f} samples/s "
                     f"({prov.get('train_samples')} samples in "
                     f"{_fmt_seconds(prov.get('train_time_s') or 0)} of steps)"))  # fmt: skip
    if prov.get("peak_memory_mb"):
        rows.append(("peak memory", f"{prov['peak_memory_mb']:.0f} MB"))
    return rows


def provenance_markdown(prov: Mapping[str, Any] | None) -> str:
    """The card's "Provenance" section."""
    if not prov:
        return ""
    lines = ["## Provenance", "", "| | |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in provenance_rows(prov)]
    lines += ["", "The same facts are in the card's metadata (`cd2p_provenance`) and in the "
              "run's `metrics.json`.", ""]  # fmt: skip
    return "\n".join(lines)


def converted_markdown(converted: Mapping[str, Any] | None) -> str:
    """What a converted model's card says about its source (``cd2p convert point-mae``)."""
    if not converted:
        return ""
    sha = converted.get("sha256")
    lines = [
        f"**Converted** from the {converted.get('layout')} checkpoint `{converted.get('file')}`"
        + (f" (sha256 `{sha[:16]}…`)" if sha else "")
        + " with `cd2p convert point-mae`; its weights were not trained by cd2p, and it "
        "computes the source model's outputs. "
        f"{converted.get('kept')} tensors kept and renamed; dropped (no part in the outputs): "
        f"{', '.join(converted.get('dropped') or []) or 'nothing'}.",
        "",
    ]
    settings = converted.get("settings") or {}
    if settings:
        lines += ["| setting not stored in the weights | value | from |", "|---|---|---|"]
        lines += [f"| {k} | {v.get('value')} | {v.get('source')} |" for k, v in settings.items()]
        lines.append("")
    assumed = converted.get("assumed") or []
    if assumed:
        values = ", ".join(f"{k} = {settings.get(k, {}).get('value')}" for k in assumed)
        lines += [f"**Assumed** (no option or config file gave them): {values}. If the source "
                  "model used other values, its outputs differ: convert again with "
                  "`--config <its cfgs/*.yaml>` or the options.", ""]  # fmt: skip
    lines += [f"Note: {note}" for note in converted.get("notes") or []]
    return "\n".join(lines) + "\n"


def _pct(value: Any) -> str:
    if not _is_number(value):
        return "—"
    return f"{100 * value:.2f}" if abs(value) <= 1.0 else f"{value:.4g}"


def runs_markdown(runs: Mapping[str, Any] | None) -> str:
    """The card section of a model that is one member of a multi-seed run (or of the few-shot
    protocol): every metric over all members, mean ± std with min and max."""
    if not runs:
        return ""
    groups = runs.get("groups") or {}
    lines = ["## Over " + str(runs.get("description") or "several runs"), ""]
    member = runs.get("member")
    if member:
        lines += [f"This model is `{member}` of a run of {runs.get('members')} models "
                  f"(`{runs.get('command', 'cd2p finetune')}`), all on the same data and recipe. "
                  f"Models selected on `{runs.get('selection_split')}`, evaluated on "
                  f"`{runs.get('evaluation_split')}`; std is the sample standard deviation "
                  "(n - 1); values in %.", ""]  # fmt: skip
    own = runs.get("member_metrics") or {}
    for name, group in groups.items():
        if len(groups) > 1:
            lines += [f"**{name}** ({group.get('n')} runs)", ""]
        lines += ["| metric | mean ± std | min | max | n | this model |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for metric, stats in (group.get("metrics") or {}).items():
            lines.append(
                f"| {metric} | {_pct(stats.get('mean'))} ± {_pct(stats.get('std'))} | "
                f"{_pct(stats.get('min'))} | {_pct(stats.get('max'))} | {stats.get('n')} | "
                f"{_pct(own.get(metric))} |"
            )
        lines.append("")
    return "\n".join(lines)


def card_context(
    *,
    model_kind: str,
    class_name: str,
    config: dict[str, Any],
    num_parameters: int,
    repo_id: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    recipe: Any = None,
    training: Mapping[str, Any] | None = None,
    dataset: Any = None,
    base_model: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    runs: Mapping[str, Any] | None = None,
    converted_from: Mapping[str, Any] | None = None,
    zeroshot: Any = None,
    origin: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Everything a ``hubcards/`` template may use (see ``generate_model_card``).

    Adds, derived from the inputs: ``recipe_yaml`` (text), ``dataset`` (mapping or None),
    ``base_model`` (a Hub id or None), ``comparison`` (rows ``label, value, scratch,
    point_mae, paper`` of the paper's results with this model's matching metric),
    ``task`` (``type``, ``name``), ``zeroshot`` (zero-shot results, see
    :func:`zeroshot_entry`), and the markdown sections ``provenance_md`` (from
    ``provenance``, :mod:`cd2p.provenance`), ``runs_md`` (the multi-seed / few-shot summary
    ``runs``) and ``converted_md`` (``converted_from``, a converter's record).

    ``origin`` (:func:`cd2p.origin.model_origin`: teacher, data, initialisation, completion;
    derived from ``training`` when not given, see :func:`origin_from_facts`) gives ``made``
    (:func:`describe_origin`: the intros' words) and the markdown ``origin_warnings_md`` (under
    the title: RANDOM teacher, synthetic data, unfinished run) and ``origin_md`` (the "how this
    model was made" table).
    """
    recipe_dict = _recipe_dict(recipe)
    metrics = dict(metrics or {})
    provenance = public_provenance(provenance)
    if base_model is None and recipe_dict is not None:
        init = _find_key(recipe_dict, ("init", "init_from", "pretrained", "base_model"))
        # A Hub id, not a local directory: only those can be linked as the base model.
        if isinstance(init, str) and _HUB_ID.match(init) and not Path(init).exists():
            base_model = init
    if origin is None and not converted_from:
        origin = origin_from_facts(model_kind, training, base_model)
    made = describe_origin(origin, model_kind)
    origin_warnings_md, origin_md = origin_markdown(made)
    summary = _training_summary(recipe_dict)
    summary.update(training or {})
    normed = {_norm(k): v for k, v in metrics.items() if _is_number(v)}
    dataset_info = _dataset_info(dataset, recipe_dict)
    comparison = []
    for row in paper_results(model_kind):
        # A metric measured on another dataset (synthetic shapes, ScanObjectNN) is not put
        # next to the paper's numbers: the rows then show the paper alone.
        same_data = dataset_info is not None and dataset_info.get("id") == row.dataset_id
        value = next((normed[a] for a in row.aliases if a in normed), None) if same_data else None
        if value is not None and abs(value) <= 1.0:  # fractions -> percent, as in the paper
            value = 100.0 * value
        comparison.append({**dataclasses.asdict(row), "value": value})
    return {
        "model_kind": model_kind,
        "class_name": class_name,
        "config": config,
        "num_parameters": num_parameters,
        "repo_id": repo_id or "path/to/model",
        "metrics": metrics,
        "recipe": recipe_dict,
        "recipe_yaml": yaml.safe_dump(recipe_dict, sort_keys=False) if recipe_dict else "",
        "training": summary,
        "dataset": dataset_info,
        "base_model": base_model,
        "comparison": comparison,
        "task": hub_task(model_kind),
        "provenance": dict(provenance) if provenance else None,
        "provenance_md": provenance_markdown(provenance),
        "runs": dict(runs) if runs else None,
        "runs_md": runs_markdown(runs),
        "converted_from": dict(converted_from) if converted_from else None,
        "converted_md": converted_markdown(converted_from),
        "zeroshot": [dict(entry) for entry in zeroshot or []],
        "origin": dict(origin) if origin else None,
        "made": made,
        "origin_warnings_md": origin_warnings_md,
        "origin_md": origin_md,
        **extra,
    }


def zeroshot_entry(report: Mapping[str, Any]) -> dict[str, Any]:
    """A card's zero-shot result from a ``cd2p zeroshot`` ``metrics.json``: ``dataset``
    (name, id, split), ``metrics`` (``zero-shot OA`` / ``zero-shot mAcc`` in %), ``classes``
    and ``prompts`` (counts), ``text_tower``."""
    source = str(report.get("dataset") or "unknown")
    info = _dataset_info(source, None) or {"name": source}
    name, hub_id = KNOWN_DATASETS.get(_norm(source).replace("_", ""), (info["name"], None))
    info = {"name": name, "id": hub_id or info.get("id", "unknown")}
    if isinstance(report.get("split"), str):
        info["split"] = report["split"]
    metrics = {
        label: 100.0 * float(report[key])
        for key, label in (("oa", "zero-shot OA"), ("macc", "zero-shot mAcc"))
        if _is_number(report.get(key))
    }
    return {
        "dataset": info,
        "metrics": metrics,
        "classes": len(report.get("class_names") or report.get("per_class") or []),
        "prompts": len(report.get("prompts") or []),
        "text_tower": str(report.get("text_tower", "")),
    }


def card_metadata(context: Mapping[str, Any], base: ModelCardData) -> ModelCardData:
    """The YAML header: the class defaults (library, license, tags) plus this model's datasets,
    ``base_model`` and evaluation results (``model-index``)."""
    data = ModelCardData(**base.to_dict())
    origin = context.get("origin") or {}
    tags = [*(data.tags or []), *kind_tags(context["model_kind"])]
    teacher = (origin.get("teacher") or {}).get("kind")
    init = (origin.get("init") or {}).get("kind")
    if teacher == "none" or (teacher == "unknown" and init in ("scratch", "converted")):
        # No distillation made these weights (from scratch, mae, a conversion): no such tag.
        tags = [t for t in tags if t != "knowledge-distillation"]
    if teacher == "random":
        tags.append("random-teacher")
    if (origin.get("data") or {}).get("synthetic") or (
        (origin.get("init") or {}).get("data") or {}
    ).get("synthetic"):
        tags.append("synthetic-data")
    data.tags = list(dict.fromkeys(tags))
    dataset = context.get("dataset")
    # `datasets` names the Hub datasets the model was trained on, and only real ones: the
    # run's recorded data when known; else a task model's (fine-tuning) data.
    if isinstance(origin.get("data"), Mapping):
        hub_ids = [origin["data"]["hub_id"]] if origin["data"].get("hub_id") else []
    elif context["model_kind"] not in (*PRETRAINED_KINDS, STUDENT_KIND):
        hub_ids = [i for i in [hub_dataset_id(dataset)] if i]
    else:
        hub_ids = []
    if hub_ids:
        data.datasets = hub_ids
    if context.get("base_model"):
        data.base_model = context["base_model"]
    repo_id = context.get("repo_id") or "path/to/model"
    data.model_name = repo_id.split("/")[-1] if repo_id != "path/to/model" else (
        f"cd2p-{context['model_kind']}"
    )
    if origin:
        data.cd2p_origin = dict(origin)
    if context.get("provenance"):
        data.cd2p_provenance = context["provenance"]
    if context.get("runs"):
        data.cd2p_runs = {k: v for k, v in context["runs"].items() if k != "description"}
    numeric = {k: v for k, v in (context.get("metrics") or {}).items() if _is_number(v)}
    results = [
        EvalResult(
            task_type=ZERO_SHOT_HUB_TASK["type"],
            task_name=ZERO_SHOT_HUB_TASK["name"],
            dataset_type=entry["dataset"]["id"],
            dataset_name=entry["dataset"]["name"],
            dataset_split=entry["dataset"].get("split"),
            metric_type=_norm(name),
            metric_name=name,
            metric_value=float(value),
        )
        for entry in context.get("zeroshot") or []
        for name, value in entry["metrics"].items()
    ]
    if results:
        data.eval_results = results
        if not dataset and not hub_ids:
            zeroshot = [hub_dataset_id(e["dataset"]) for e in context["zeroshot"]]
            data.datasets = list(dict.fromkeys(i for i in zeroshot if i)) or None
    if numeric:
        task = context["task"]
        data.eval_results = results + [
            EvalResult(
                task_type=task["type"],
                task_name=task["name"],
                dataset_type=dataset["id"] if dataset else "unspecified",
                dataset_name=dataset["name"] if dataset else "unspecified",
                dataset_split=(dataset or {}).get("split"),
                metric_type=_norm(name),
                metric_name=name,
                # Machine-readable: the fraction as measured (the card's text shows percent).
                metric_value=float(value),
            )
            for name, value in numeric.items()
        ]
    return data


__all__ = [
    "KNOWN_DATASETS",
    "PaperResult",
    "card_context",
    "card_metadata",
    "describe_origin",
    "hub_dataset_id",
    "hub_task",
    "kind_tags",
    "origin_from_facts",
    "origin_markdown",
    "paper_results",
    "zeroshot_entry",
]
