"""Sharing cd2p models on the Hugging Face Hub: ``push``, ``pull`` and one ``from_pretrained``.

``push`` uploads a model directory (``config.json`` + ``model.safetensors``) or the exported
model of a run directory (``RUN/model/`` of a fine-tuning run, ``RUN/backbone/`` of a
pre-training run) in **one commit**, with an allow-list of files: the weights, the config, a
model card re-rendered with the run's metrics and recipe, ``recipe.yaml``, the run's metrics
(``metrics.jsonl``, ``metrics.json``, ``eval/metrics.json``) and plots (``*.png``). Checkpoints,
optimizer states and data are never uploaded, and a file that contains an access token stops
the push. Authentication is huggingface_hub's own (``hf auth login`` or ``HF_TOKEN``).

What is published says how the model was made and nothing local: the card states its
teacher, data, initialisation and whether its training finished (:mod:`cd2p.origin`, kept in
the metadata as ``cd2p_origin``); every local absolute path in the card and the uploaded
records becomes ``<data>/...``, ``<run>/...``, ``~/...`` or ``<local>/<name>``
(:class:`cd2p.provenance.PublicPaths`), and a file that still holds one stops the push. A
model distilled from a RANDOM teacher, trained on synthetic data or from an unfinished run is
pushed only with ``force`` (``--force``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
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
from cd2p._reading import reading
from cd2p.models.hub import CONFIG_NAME, WEIGHTS_NAME, check_local_path
from cd2p.provenance import PublicPaths

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
    #: How the model was made, as its card states it (:func:`cd2p.origin.model_origin`).
    origin: dict[str, Any] = field(default_factory=dict)
    #: What needs ``force`` (:func:`cd2p.origin.push_concerns`); a dry run lists them.
    concerns: list[str] = field(default_factory=list)


class PushRefused(ValueError):
    """A model whose records say it should not be published as it is (a RANDOM teacher,
    synthetic data, an unfinished run) and no ``force``."""


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


def _run_summary(
    run_dir: Path | None, origin: dict[str, Any], public: PublicPaths
) -> dict[str, Any]:
    """Card context from a run's records: metrics, recipe text, training facts, dataset.

    Facts come from ``origin`` (teacher, initialisation) and the records; paths in them are
    made public with ``public``."""
    if run_dir is None:
        return {}
    out: dict[str, Any] = {}
    if (run_dir / "recipe.yaml").is_file():
        out["recipe"] = public.text((run_dir / "recipe.yaml").read_text())
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
    info = info if isinstance(info, dict) else {}
    if info.get("recipe_name"):
        training["recipe"] = info["recipe_name"]
    init = origin.get("init") or {}
    if "init" in info:
        # The initialisation as cd2p.origin found it: a run's name or a Hub id, never a path.
        training["initialised from"] = (
            "scratch (random initialisation)" if init.get("kind") == "scratch"
            else str(init.get("source") or "not recorded")
        )  # fmt: skip
    teacher = origin.get("teacher") or {}
    if origin.get("made_by") == "pre-training" and teacher.get("kind") not in (None, "unknown"):
        training["teacher"] = teacher.get("description") or teacher["kind"]
        training["random teacher"] = (
            "yes (NOT CLIP: a pipeline test)" if teacher["kind"] == "random" else "no"
        )
    prepared = _prepared_data(info, public)
    if prepared:
        training["prepared data"] = prepared
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


def _prepared_data(info: dict[str, Any], public: PublicPaths) -> str | None:
    """The card's line on the prepared data: public paths, the pair count of a pre-training
    and the fingerprint that identifies the data wherever it lies."""
    roots = info.get("data")
    roots = roots if isinstance(roots, list) else [roots] if roots else []
    if not roots:
        return None
    text = ", ".join(f"`{public.text(str(r))}`" for r in roots)
    extras = []
    if isinstance(info.get("pairs"), int):
        extras.append(f"{info['pairs']} pairs")
    sha = (info.get("data_fingerprint") or {}).get("sha256")
    if sha:
        extras.append(f"sha256 `{str(sha)[:16]}…`")
    return text + (f" ({'; '.join(extras)})" if extras else "")


def _data_roots(run_dir: Path | None, files: dict[str, Path | bytes]) -> list[str]:
    """Every data directory a run's records name: the run's data, its fingerprint's path and
    the data of its evaluations (each is published as ``<data>/<name>``)."""
    found: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str) and value:
            found.extend(part for part in value.split(", ") if Path(part).is_absolute())
        elif isinstance(value, list):
            for item in value:
                add(item)

    records: list[Any] = []
    if run_dir is not None and (run_dir / "run.json").is_file():
        records.append(_read_json(run_dir / "run.json"))
    records += [_read_json(src) for name, src in files.items()
                if name.endswith("metrics.json") and isinstance(src, Path)]  # fmt: skip
    for record in records:
        if not isinstance(record, dict):
            continue
        add(record.get("data"))
        for key in ("data_fingerprint", "provenance"):
            block = record.get(key) or {}
            block = block.get("data") if key == "provenance" else block
            if isinstance(block, dict):
                add(block.get("path"))
    return list(dict.fromkeys(found))


def _public_file(path: Path, public: PublicPaths) -> Path | bytes:
    """A run record as it is published: unchanged, or rewritten with its local paths replaced
    (JSON and YAML values, written the way cd2p writes them)."""
    if path.suffix == ".json":
        data = _read_json(path)
        clean = public.value(data)
        return path if clean == data else (json.dumps(clean, indent=2) + "\n").encode()
    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()
        out, changed = [], False
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                out.append(public.text(line))  # a torn last line: text is all there is
                changed |= out[-1] != line
                continue
            clean = public.value(record)
            changed |= clean != record
            out.append(json.dumps(clean) if clean != record else line)
        return ("\n".join(out) + "\n").encode() if changed else path
    if path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text())
        clean = public.value(data)
        # recipe.yaml is written by yaml.safe_dump(sort_keys=False): the same again.
        return path if clean == data else yaml.safe_dump(clean, sort_keys=False).encode()
    return path


def _published_bytes(name: str, source: Path | bytes) -> bytes:
    """What to search for local paths: a file's bytes, a safetensors file's header only (its
    tensors are numbers, where any short byte string turns up by chance in large files)."""
    if isinstance(source, bytes):
        return source
    if name.endswith(".safetensors"):
        with Path(source).open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            return f.read(min(size, 100_000_000))
    return Path(source).read_bytes()


def find_local_paths(files: dict[str, Path | bytes], public: PublicPaths) -> list[str]:
    """``"file (path)"`` for every file that still holds a local directory's path."""
    found = []
    for name, source in sorted(files.items()):
        for place in public.leaks(_published_bytes(name, source)):
            found.append(f"{name} ({place})")
    return found


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
        if isinstance(getattr(data, "cd2p_origin", None), dict):
            out["origin"] = data.cd2p_origin
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
    weights = model_dir / WEIGHTS_NAME
    with reading(weights, "save or download the model again"), \
            safe_open(str(weights), framework="pt") as f:
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
    origin: dict[str, Any] = field(default_factory=dict)
    public: PublicPaths = field(default_factory=PublicPaths)


def stage(path: str | Path, repo_id: str) -> Staged:
    """Everything a push uploads, with the model card rendered for ``repo_id``.

    The card (``README.md``) is rendered by loading the model strictly, which also proves that
    the weights match the config before anything is uploaded. It states how the model was
    made (:func:`cd2p.origin.model_origin`); the run records are uploaded with their local
    paths replaced (:class:`cd2p.provenance.PublicPaths`).
    """
    from cd2p.cards import STUDENT_KIND, zeroshot_entry
    from cd2p.origin import model_origin

    model_dir, run_dir = resolve_push_source(path)
    files: dict[str, Path | bytes] = {name: model_dir / name for name in MODEL_FILES}
    kind = str(read_config(model_dir).get("model_kind") or "model")
    is_student = kind == STUDENT_KIND
    if run_dir is not None:
        for name in RUN_RECORDS:
            if (run_dir / name).is_file():
                files[name] = run_dir / name
        for pattern in PLOT_GLOBS + (ZEROSHOT_GLOBS if is_student else ()):
            for plot in sorted(run_dir.glob(pattern)):
                if plot.is_file():
                    files[plot.relative_to(run_dir).as_posix()] = plot
    public = PublicPaths(data=_data_roots(run_dir, files), run=(run_dir or model_dir).resolve())
    zeroshot = []
    for name, source in list(files.items()):
        if name in MODEL_FILES or not isinstance(source, Path):
            continue
        files[name] = _public_file(source, public)
        if name.startswith("zeroshot/") and name.endswith("metrics.json"):
            report = _read_json(source)
            if isinstance(report, dict):
                zeroshot.append(zeroshot_entry(public.value(report)))
    recorded = _existing_card_data(model_dir)
    origin = model_origin(model_dir, run_dir, kind, converted_from=recorded.get("converted_from"),
                          recorded={"origin": recorded.pop("origin", None),
                                    "base_model": recorded.get("base_model")})  # fmt: skip
    run = _run_summary(run_dir, origin, public)
    if zeroshot:  # the run's zero-shot results replace those the card recorded
        recorded["zeroshot"] = zeroshot
    # Metrics: a later `cd2p evaluate` (eval/metrics.json) first, then those the training run
    # wrote into the model's own card, then the run's metrics.json.
    if run.pop("metrics_source", None) != "eval/metrics.json" and "metrics" in recorded:
        run.pop("metrics", None)
        if "dataset" in recorded:
            run.pop("dataset", None)
    context = public.value({**recorded, **run})
    context["origin"] = origin
    model = from_pretrained(model_dir)
    card = model.generate_model_card(repo_id=repo_id, **context)
    files["README.md"] = str(card).encode()
    kind = str(getattr(model, "model_kind", kind))
    return Staged(files, model_dir, run_dir, kind, context, origin, public)


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
    force: bool = False,
) -> PushResult:
    """Upload a run's exported model (or a model directory) to ``repo_id`` in one commit.

    Creates the repo if needed (``private`` only applies to a new repo) and, for a
    ``revision`` that does not exist yet, the branch. With ``dry_run_dir`` the exact files
    are written there and nothing is sent. Raises ``ValueError`` if a file holds a token or a
    local path, and :class:`PushRefused` for a model distilled from a RANDOM teacher, trained
    on synthetic data or from an unfinished run, unless ``force`` (a dry run lists these in
    ``PushResult.concerns`` instead).
    """
    from cd2p.origin import push_concerns

    staged = stage(path, repo_id)
    leaked = find_secrets(staged.files)
    if leaked:
        # Never name or print the token itself; the file names are enough to fix it.
        raise ValueError(
            "refusing to push: these files contain a Hugging Face access token: "
            + ", ".join(leaked)
        )
    local = find_local_paths(staged.files, staged.public)
    if local:
        raise ValueError(
            "refusing to push: these files still contain local paths: " + ", ".join(local)
            + "; remove them (the run's records are rewritten, the model's config.json and "
            "weights are not)"
        )
    concerns = push_concerns(staged.origin)
    if concerns and not force and dry_run_dir is None:
        # One line for the CLI: what is wrong, that the card says it, and the way past it.
        raise PushRefused(
            f"refusing to push {repo_id}: {'; '.join(concerns)}. Its card says so; pass "
            "--force to push it anyway"
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
        origin=dict(staged.origin),
        concerns=concerns,
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
