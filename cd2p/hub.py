"""Sharing cd2p models on the Hugging Face Hub: ``push``, ``pull`` and one ``from_pretrained``.

``push`` uploads a model directory (``config.json`` + ``model.safetensors``) or the exported
model of a run directory (``RUN/model/`` of a fine-tuning run, ``RUN/backbone/`` of a
pre-training run) in **one commit**, with an allow-list of files: the weights, the config, a
model card re-rendered with the run's metrics and recipe, ``recipe.yaml``, the run's metrics
(``metrics.jsonl``, ``metrics.json``, ``eval/metrics.json``) and plots (``*.png``). Checkpoints,
optimizer states and data are never uploaded, and a file that contains an access token stops
the push. Authentication is huggingface_hub's own (``hf auth login`` or ``HF_TOKEN``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ModelCard,
    get_token,
    hf_hub_download,
    snapshot_download,
)
from safetensors import safe_open
from torch import nn

from cd2p._atomic import atomic_directory
from cd2p.models.hub import CONFIG_NAME, WEIGHTS_NAME, check_local_path

# Key of the safetensors metadata where `cd2p convert` records a model's origin.
CONVERTED_FROM_KEY = "cd2p_converted_from"

MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME)
# Run records that may be published next to the model (paths relative to the run directory).
RUN_RECORDS = ("recipe.yaml", "metrics.jsonl", "metrics.json", "eval/metrics.json")
PLOT_GLOBS = ("*.png", "eval/*.png")
# A student's zero-shot evaluations (`cd2p zeroshot` writes them beside RUN/student).
ZEROSHOT_GLOBS = ("zeroshot/*/metrics.json", "zeroshot/*/*.png")
# huggingface_hub user access tokens: "hf_" then 30+ letters and digits.
TOKEN_PATTERN = re.compile(rb"hf_[A-Za-z0-9]{30,}")


# -- loading any kind ------------------------------------------------------------------------


# Model kinds that are not fine-tuning tasks: the pre-trained backbone and the whole student.
PRETRAINED_MODELS = {
    "backbone": ("cd2p.models.backbone", "Cd2pBackbone"),
    "student": ("cd2p.models.student", "Cd2pStudent"),
}


def model_class(kind: str) -> type[nn.Module]:
    """The cd2p class that a ``config.json`` with ``"model_kind": kind`` was saved from:
    ``backbone``, ``student`` (the whole pre-trained student), or a task of the task table (a
    task's models have its name as kind).

    The class's module is imported here, so that a kind whose module is absent from this
    version of cd2p gives a clear error instead of breaking ``import cd2p``.
    """
    import importlib

    from cd2p.tasks import get_task, task_names

    if kind in PRETRAINED_MODELS:
        module, name = PRETRAINED_MODELS[kind]
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError as exc:
            raise ValueError(f"model kind {kind!r} is not available in this cd2p: {exc}") from exc
    if kind not in task_names():
        raise ValueError(
            f"unknown cd2p model kind {kind!r} (a newer cd2p may know it); known kinds: "
            + ", ".join((*PRETRAINED_MODELS, *task_names()))
        )
    return get_task(kind).model_class


def read_config(repo_id_or_dir: str | Path, **hub_kwargs: Any) -> dict[str, Any]:
    """``config.json`` of a local model directory or a Hub repo (through the HF cache)."""
    check_local_path(repo_id_or_dir)
    if Path(repo_id_or_dir).is_dir():
        path = Path(repo_id_or_dir) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a saved cd2p model directory")
    else:
        keep = ("revision", "cache_dir", "force_download", "token", "local_files_only")
        path = Path(
            hf_hub_download(
                str(repo_id_or_dir),
                CONFIG_NAME,
                **{k: v for k, v in hub_kwargs.items() if k in keep},
            )
        )
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def from_pretrained(repo_id_or_dir: str | Path, **kwargs: Any) -> nn.Module:
    """Load any cd2p model (backbone or task model) from a directory or a Hub repo id.

    Reads ``model_kind`` from ``config.json`` and calls that class's ``from_pretrained`` with
    ``kwargs`` (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ...). The model
    is loaded strictly, on CPU, in eval mode.
    """
    config = read_config(repo_id_or_dir, **kwargs)
    kind = config.get("model_kind")
    if not kind:
        raise ValueError(
            f"config.json of {repo_id_or_dir} has no 'model_kind': not a cd2p model "
            "(convert Point-MAE / Point-BERT checkpoints with `cd2p convert point-mae`)"
        )
    return model_class(str(kind)).from_pretrained(repo_id_or_dir, **kwargs)


def pull(repo_id: str, revision: str | None = None) -> Path:
    """Download a repo into the standard Hugging Face cache; the local snapshot directory."""
    return Path(snapshot_download(repo_id, revision=revision, repo_type="model"))


# -- push -------------------------------------------------------------------------------------


@dataclass
class PushResult:
    """What a push sent (or, with ``dry_run_dir``, would send)."""

    repo_id: str
    model_dir: Path
    run_dir: Path | None
    files: list[str]
    dry_run_dir: Path | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    card_metrics: dict[str, Any] = field(default_factory=dict)


def resolve_push_source(path: str | Path) -> tuple[Path, Path | None]:
    """``(model_dir, run_dir)`` for a model directory or a run directory.

    A model directory directly inside a run (``RUN/model``, ``RUN/backbone``) brings its run's
    records along. A run with both a fine-tuned ``model/`` and a ``backbone/`` pushes
    ``model/``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a run or a model directory)")
    if (path / "multirun.json").is_file():
        first = next((p.parent for p in sorted(path.glob("**/model/config.json"))), None)
        example = f", e.g. {first.relative_to(path.parent)}" if first else ""
        raise ValueError(
            f"{path} is a multi-seed / few-shot run of several models: push one of them"
            f"{example} (every member's card carries the summary over all of them)"
        )

    def is_model(p: Path) -> bool:
        return all((p / name).is_file() for name in MODEL_FILES)

    if is_model(path):
        parent = path.parent
        in_run = any((parent / name).is_file() for name in ("recipe.yaml", "metrics.jsonl"))
        return path, (parent if in_run else None)
    for sub in ("model", "backbone"):
        if is_model(path / sub):
            return path / sub, path
    raise FileNotFoundError(
        f"{path} holds no exported model: expected {CONFIG_NAME} and {WEIGHTS_NAME} in it, or a "
        "run directory with model/ (fine-tuning) or backbone/ (pre-training)"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


# Numbers in metrics.json that describe the evaluation, not the model's quality.
_BOOKKEEPING = {"samples", "votes", "best_step", "step", "epoch", "l2", "seconds"}


def _run_summary(run_dir: Path | None) -> dict[str, Any]:
    """Card context from a run's records: metrics, recipe text, training facts, dataset."""
    if run_dir is None:
        return {}
    out: dict[str, Any] = {}
    if (run_dir / "recipe.yaml").is_file():
        out["recipe"] = (run_dir / "recipe.yaml").read_text()
    # The evaluation (``cd2p evaluate``) is preferred to the run's own final metrics.
    for name in ("eval/metrics.json", "metrics.json"):
        if (run_dir / name).is_file():
            data = _read_json(run_dir / name)
            if isinstance(data, dict):
                # Top-level numbers only: per-class tables stay in the uploaded JSON.
                out["metrics"] = {
                    k: v
                    for k, v in data.items()
                    if isinstance(v, int | float)
                    and not isinstance(v, bool)
                    and k not in _BOOKKEEPING
                }
                out["metrics_source"] = name
                if isinstance(data.get("provenance"), dict):
                    out["provenance"] = data["provenance"]
                dataset = data.get("dataset") or data.get("source")
                if isinstance(dataset, str):
                    out["dataset"] = {"name": dataset}
                    if isinstance(data.get("split"), str):
                        out["dataset"]["split"] = data["split"]
            break
    training: dict[str, Any] = {}
    info = _read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    if isinstance(info, dict):
        if info.get("recipe_name"):
            training["recipe"] = info["recipe_name"]
        if info.get("init"):
            # Local paths are reduced to their last parts: the card is public.
            init = str(info["init"])
            training["initialised from"] = init if not Path(init).is_absolute() else Path(init).name
        if info.get("data"):
            training["data"] = Path(str(info["data"])).name
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        last: dict[str, Any] = {}
        for number, line in enumerate(log.read_text().splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{log}:{number} is not valid JSON: {exc}") from exc
                if isinstance(record, dict) and record.get("kind", "train") == "train":
                    last = record
        if "step" in last:
            training["steps trained"] = last["step"]
        if isinstance(last.get("loss"), int | float):
            training["final training loss"] = f"{last['loss']:.4g}"
    if training:
        out["training"] = training
    runs = _multirun_context(run_dir)
    if runs:
        out["runs"] = runs
    return out


def _multirun_context(run_dir: Path) -> dict[str, Any] | None:
    """The summary of the multi-seed / few-shot run that ``run_dir`` is a member of."""
    from cd2p.engine.multirun import SUMMARY, is_multirun, member_runs_context

    for parent in (run_dir.parent, run_dir.parent.parent):
        if is_multirun(parent) and (parent / SUMMARY).is_file():
            summary = _read_json(parent / SUMMARY)
            member = run_dir.relative_to(parent).as_posix()
            if isinstance(summary, dict) and member in (summary.get("members") or {}):
                return member_runs_context(summary, member)
    return None


def _existing_card_data(model_dir: Path) -> dict[str, Any]:
    """What the model directory already says, kept when the card is re-rendered: the card's
    ``base_model``, evaluation results and dataset, and a converter's provenance (safetensors
    metadata)."""
    from cd2p.cards import ZERO_SHOT_HUB_TASK

    out: dict[str, Any] = {}
    readme = model_dir / "README.md"
    if readme.is_file():
        data = ModelCard.load(readme).data
        if getattr(data, "base_model", None):
            out["base_model"] = data.base_model
        if isinstance(getattr(data, "cd2p_provenance", None), dict):
            out["provenance"] = data.cd2p_provenance
        results = getattr(data, "eval_results", None) or []
        zeroshot = [r for r in results if r.task_type == ZERO_SHOT_HUB_TASK["type"]]
        results = [r for r in results if r.task_type != ZERO_SHOT_HUB_TASK["type"]]
        entries: dict[tuple, dict[str, Any]] = {}
        for r in zeroshot:  # a student's card: its zero-shot results, grouped by dataset
            key = (r.dataset_name, r.dataset_type, r.dataset_split)
            entry = entries.setdefault(key, {
                "dataset": {"name": r.dataset_name, "id": r.dataset_type, "split": r.dataset_split},
                "metrics": {}, "classes": "—", "prompts": "—", "text_tower": "",
            })  # fmt: skip
            entry["metrics"][r.metric_name or r.metric_type] = r.metric_value
        if entries:
            out["zeroshot"] = list(entries.values())
        if results:
            out["metrics"] = {r.metric_name or r.metric_type: r.metric_value for r in results}
            first = results[0]
            if first.dataset_name and first.dataset_name != "unspecified":
                out["dataset"] = {"name": first.dataset_name, "id": first.dataset_type}
                if first.dataset_split:
                    out["dataset"]["split"] = first.dataset_split
    with safe_open(str(model_dir / WEIGHTS_NAME), framework="pt") as f:
        converted = (f.metadata() or {}).get(CONVERTED_FROM_KEY)
    if converted:
        out["converted_from"] = json.loads(converted)
    return out


@dataclass
class Staged:
    """A push prepared locally: ``files`` maps each path in the repo to a file or to bytes."""

    files: dict[str, Path | bytes]
    model_dir: Path
    run_dir: Path | None
    model_kind: str
    context: dict[str, Any]


def stage(path: str | Path, repo_id: str) -> Staged:
    """Everything a push uploads, with the model card rendered for ``repo_id``.

    The card (``README.md``) is rendered by loading the model strictly, which also proves that
    the weights match the config before anything is uploaded.
    """
    from cd2p.cards import STUDENT_KIND, zeroshot_entry

    model_dir, run_dir = resolve_push_source(path)
    files: dict[str, Path | bytes] = {name: model_dir / name for name in MODEL_FILES}
    is_student = read_config(model_dir).get("model_kind") == STUDENT_KIND
    zeroshot = []
    if run_dir is not None:
        for name in RUN_RECORDS:
            if (run_dir / name).is_file():
                files[name] = run_dir / name
        for pattern in PLOT_GLOBS + (ZEROSHOT_GLOBS if is_student else ()):
            for plot in sorted(run_dir.glob(pattern)):
                if plot.is_file():
                    files[plot.relative_to(run_dir).as_posix()] = plot
                    if plot.name == "metrics.json":
                        report = _read_json(plot)
                        if isinstance(report, dict):
                            zeroshot.append(zeroshot_entry(report))
    recorded, run = _existing_card_data(model_dir), _run_summary(run_dir)
    if zeroshot:  # the run's zero-shot results replace those the card recorded
        recorded["zeroshot"] = zeroshot
    # Metrics: a later `cd2p evaluate` (eval/metrics.json) first, then those the training run
    # wrote into the model's own card, then the run's metrics.json.
    if run.pop("metrics_source", None) != "eval/metrics.json" and "metrics" in recorded:
        run.pop("metrics", None)
        if "dataset" in recorded:
            run.pop("dataset", None)
    context = {**recorded, **run}
    model = from_pretrained(model_dir)
    card = model.generate_model_card(repo_id=repo_id, **context)
    files["README.md"] = str(card).encode()
    kind = str(getattr(model, "model_kind", "model"))
    return Staged(files, model_dir, run_dir, kind, context)


def _known_tokens() -> list[bytes]:
    values = {os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN"), get_token()}
    return [v.encode() for v in values if v and len(v) >= 8]


def find_secrets(files: dict[str, Path | bytes]) -> list[str]:
    """Paths in ``files`` whose bytes contain the active access token or look like one."""
    tokens = _known_tokens()
    found = []
    for name, source in files.items():
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        if any(t in data for t in tokens) or TOKEN_PATTERN.search(data):
            found.append(name)
    return found


def _write_dry_run(files: dict[str, Path | bytes], out: Path) -> None:
    """Write exactly the upload into ``out`` (created; must not hold anything yet)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new --dry-run dir")
    with atomic_directory(out) as tmp:
        for name, source in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, bytes):
                target.write_bytes(source)
            else:
                shutil.copyfile(source, target)


def push(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    dry_run_dir: str | Path | None = None,
    api: HfApi | None = None,
) -> PushResult:
    """Upload a run's exported model (or a model directory) to ``repo_id`` in one commit.

    Creates the repo if needed (``private`` only applies to a new repo) and, for a
    ``revision`` that does not exist yet, the branch. With ``dry_run_dir`` the exact files
    are written there and nothing is sent. Raises ``ValueError`` if a file holds a token.
    """
    staged = stage(path, repo_id)
    leaked = find_secrets(staged.files)
    if leaked:
        # Never name or print the token itself; the file names are enough to fix it.
        raise ValueError(
            "refusing to push: these files contain a Hugging Face access token: "
            + ", ".join(leaked)
        )
    result = PushResult(
        repo_id=repo_id,
        model_dir=staged.model_dir,
        run_dir=staged.run_dir,
        files=sorted(staged.files),
        sizes={
            name: len(src) if isinstance(src, bytes) else Path(src).stat().st_size
            for name, src in staged.files.items()
        },
        card_metrics=dict(staged.context.get("metrics", {})),
    )
    if dry_run_dir is not None:
        _write_dry_run(staged.files, Path(dry_run_dir))
        result.dry_run_dir = Path(dry_run_dir)
        return result
    api = api or HfApi()
    api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    operations = [
        CommitOperationAdd(
            path_in_repo=name,
            path_or_fileobj=source if isinstance(source, bytes) else str(source),
        )
        for name, source in sorted(staged.files.items())
    ]
    commit = api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or f"Upload cd2p {staged.model_kind} model",
        revision=revision,
        create_pr=create_pr,
        repo_type="model",
    )
    result.commit_url = commit.commit_url
    result.pr_url = commit.pr_url
    return result
