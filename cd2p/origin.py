"""How a model was made, as its published card states it, read from its run's records.

A pushed card must not claim more than the run did: which teacher the backbone was distilled
from (CLIP + ClipCap, or the seeded RANDOM teacher of tests and demos), which data it saw (a
real dataset, or synthetic data written by ``cd2p synthetic ...``), how its weights started
(random for a pre-training, pre-trained by a cd2p run, converted from Point-MAE, from scratch)
and whether its training finished. :func:`model_origin` gathers these facts into one plain
mapping, stored in the card's metadata as ``cd2p_origin`` (docs/formats.md), and
:func:`push_concerns` names what makes a push need ``--force``.

The origin never holds a local path: data and runs are named by their last part, and a Hub
model by its id.

Where each fact comes from:

- teacher: ``run.json`` of a pre-training run (``random_teacher``, ``teacher``) and the
  recipe's objective (``mae`` has no teacher); for a fine-tuning run, the same facts of the
  run (or card) of its ``--init`` backbone;
- data: the marker ``cd2p_synthetic.json`` that the synthetic generators write into their
  root, and the ``source`` a prepared dataset records (``meta.json`` of the classification and
  part caches, ``prepare_config.json`` of ``prepare scannet-scenes``, the run's data
  fingerprint). Pairs of ``prepare scannet`` record no source: their ``prepare_report.json``
  names the ScanNet root they came from, whose marker tells;
- completion: the ``final`` record of ``metrics.jsonl`` (the trainer writes it when the
  schedule completes; a resume drops it), else the latest checkpoint's step against its
  schedule, else the recipe's ``schedule.max_steps``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from cd2p.data.common import SYNTHETIC_MARKER

PAIRS_SOURCE = "scannet-pairs"  # what `prepare scannet` makes: RGB-D frames of ScanNet scans

# Where a prepared dataset records its source, and under which key.
_SOURCE_FILES = ("meta.json", "prepare_config.json")

TEACHER_KINDS = ("clip+clipcap", "clip", "random", "none", "unknown")
INIT_KINDS = ("random", "scratch", "pre-trained", "converted", "hub", "unknown")


def _read_json(path: Path) -> Any:
    """A JSON file's content, or ``None`` when it is missing or unreadable: a push reports
    what the records say and does not fail on a stray file."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


# -- data ------------------------------------------------------------------------------------


def synthetic_marker(root: str | Path) -> dict[str, Any] | None | bool:
    """What marks ``root`` (a raw or prepared dataset directory) as synthetic.

    Returns the marker's content (a dict) when it is synthetic, ``False`` when the directory
    exists and nothing marks it, ``None`` when it cannot be checked (it is gone).
    """
    root = Path(root)
    if not root.is_dir():
        return None
    marker = root / SYNTHETIC_MARKER
    if marker.is_file():
        found = _read_json(marker)
        return found if isinstance(found, dict) and found else {"marker": SYNTHETIC_MARKER}
    for name in _SOURCE_FILES:
        record = _read_json(root / name)
        if isinstance(record, dict) and str(record.get("source", "")).startswith("synthetic"):
            return {"source": record["source"]}
    # `prepare scannet` pairs: the report names the ScanNet root they were prepared from.
    for report in sorted(root.glob("prepare_report*.json")):
        record = _read_json(report)
        raw = record.get("root") if isinstance(record, dict) else None
        if isinstance(raw, str) and (Path(raw) / SYNTHETIC_MARKER).is_file():
            found = _read_json(Path(raw) / SYNTHETIC_MARKER)
            return found if isinstance(found, dict) and found else {"marker": SYNTHETIC_MARKER}
    return False


def pairs_source(roots: Iterable[str | Path]) -> str:
    """The ``source`` of ``prepare scannet`` pairs for a run's records:
    ``synthetic-scannet-pairs`` when any part comes from ``cd2p synthetic scannet``, else
    ``scannet-pairs``."""
    synthetic = any(isinstance(synthetic_marker(r), dict) for r in roots)
    return f"synthetic-{PAIRS_SOURCE}" if synthetic else PAIRS_SOURCE


def data_origin(paths: Iterable[str | Path], source: str | None = None) -> dict[str, Any]:
    """What a run's data is: ``{"name", "synthetic", "hub_id", "parts"}``.

    ``paths``: the prepared directories the run read (they may be gone by now); ``source``: the
    name the run recorded (its data fingerprint's ``source``, or a cache's). ``synthetic`` is
    ``True``/``False``, or ``None`` when neither the records nor the directories can tell;
    ``hub_id`` is the Hub dataset id only when the data really is that benchmark.
    """
    from cd2p.cards import KNOWN_DATASETS, _norm

    paths = [Path(p) for p in paths]
    # Pre-training runs recorded the uninformative "pairs" before they recorded their origin.
    name = str(source) if source and source != "pairs" else None
    markers = [synthetic_marker(p) for p in paths]
    synthetic: bool | None
    if (name or "").startswith("synthetic") or any(isinstance(m, dict) for m in markers):
        synthetic = True
    elif markers and all(m is False for m in markers):
        synthetic = False  # every directory is still there and nothing marks it
    elif name:
        synthetic = False  # the preparer recorded this source after looking for the marker
    else:
        synthetic = None  # the directories are gone and the run recorded no source
    if name is None:
        pairs = source == "pairs" or any(
            (p / "prepare_config.json").is_file() and (p / "scenes").is_dir() for p in paths
        )
        name = PAIRS_SOURCE if pairs else ", ".join(p.name for p in paths) or "unknown"
    if synthetic and not name.startswith("synthetic"):
        name = f"synthetic-{name}"
    hub_id = None
    if synthetic is False:
        slug = _norm(name).replace("_", "")
        hub_id = next((hub for key, (_, hub) in KNOWN_DATASETS.items() if slug.startswith(key)),
                      None)  # fmt: skip
    return {"name": name, "synthetic": synthetic, "hub_id": hub_id,
            "parts": [p.name for p in paths]}  # fmt: skip


# -- teacher and initialisation --------------------------------------------------------------


def _teacher(objective: str | None, info: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher of a pre-training run from its ``run.json`` and objective."""
    if objective == "mae":
        return {"kind": "none", "description": "none: masked point reconstruction only (mae)"}
    description = str(info.get("teacher") or "")
    if info.get("random_teacher") is True:
        return {"kind": "random", "description": description or "RANDOM teacher (not CLIP)"}
    if info.get("random_teacher") is False and description.startswith("none"):
        return {"kind": "none", "description": description}
    if info.get("random_teacher") is False:
        kind = "clip" if objective == "distill-clip" else "clip+clipcap"
        return {"kind": kind, "description": description or "CLIP ViT-B/32 + ClipCap"}
    return {"kind": "unknown", "description": "not recorded"}


def _recipe_objective(recipe: Mapping[str, Any]) -> str | None:
    value = (recipe.get("pretrain") or {}).get("objective")
    return str(value) if value else None


def _converted(model_dir: Path) -> dict[str, Any] | None:
    """The converter's record in a model's weights (``cd2p convert point-mae``)."""
    from safetensors import SafetensorError, safe_open

    from cd2p.hub import CONVERTED_FROM_KEY

    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        return None
    try:
        with safe_open(str(weights), framework="pt") as f:
            raw = (f.metadata() or {}).get(CONVERTED_FROM_KEY)
        return json.loads(raw) if raw else None
    except (OSError, ValueError, SafetensorError):  # damaged weights: the push reports them
        return None


def _card_origin(readme: Path) -> dict[str, Any] | None:
    """The ``cd2p_origin`` a model's card recorded (a pulled Hub model, a copied export)."""
    if not readme.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        found = getattr(ModelCard.load(readme).data, "cd2p_origin", None)
    except Exception:  # noqa: BLE001 - a broken card only means the origin is unknown
        return None
    return dict(found) if isinstance(found, dict) else None


def init_origin(init: str | None, base_model: str | None = None) -> dict[str, Any]:
    """How a fine-tuning run's backbone started: ``{"kind", "source", ...}``.

    ``kind``: ``scratch`` (no ``--init``), ``pre-trained`` (a cd2p pre-training run or
    backbone; with its ``objective``, ``teacher`` and ``data`` when recorded), ``converted``
    (a Point-MAE / Point-BERT checkpoint: ``layout``, ``file``), ``hub`` (a Hub id; its facts
    when its card is in the local Hugging Face cache) or ``unknown`` (a local path that is
    gone). ``source`` is public: a run's or directory's name, or the Hub id.

    ``base_model``: the Hub id the model's own card names. An ``init`` that is no local
    directory (any more) is taken for a Hub id only when it is that one: a relative path
    such as ``runs/pre`` looks like ``org/name`` once the push runs from another directory.
    """
    if not init:
        return {"kind": "scratch", "source": None}
    path = Path(str(init)).expanduser()
    if path.is_dir():
        run, model = None, path
        if (path / "backbone" / "config.json").is_file():
            run, model = path, path / "backbone"
        elif (path.parent / "run.json").is_file() and (path.parent / "recipe.yaml").is_file():
            run = path.parent
        source = run.name if run is not None else path.name
        if model is not path or run is not None:
            source = f"{run.name}/{model.name}" if run is not None else source
        converted = _converted(model)
        if converted:
            return {"kind": "converted", "source": source, "layout": converted.get("layout"),
                    "file": converted.get("file"), "teacher": {"kind": "none"}}  # fmt: skip
        if run is not None:
            info = _read_json(run / "run.json") or {}
            recipe = _read_yaml(run / "recipe.yaml")
            objective = _recipe_objective(recipe)
            fingerprint = info.get("data_fingerprint") or {}
            data = info.get("data") or []
            return {
                "kind": "pre-trained",
                "source": source,
                "objective": objective,
                "teacher": _teacher(objective, info),
                "data": data_origin(data if isinstance(data, list) else [data],
                                    fingerprint.get("source")),
                "finished": training_completion(run, info, recipe)["finished"],
            }  # fmt: skip
        recorded = _card_origin(model / "README.md")
        if recorded:
            return {"kind": "pre-trained", "source": source, **_inherited(recorded)}
        return {"kind": "pre-trained", "source": source, "teacher": {"kind": "unknown"}}
    text = str(init)
    if not path.exists() and text == base_model:
        found: dict[str, Any] = {"kind": "hub", "source": text}
        try:  # the card of a Hub backbone used before is in the local cache: no network
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(text, "README.md")
        except Exception:  # noqa: BLE001 - not cached (or an odd id): its facts stay unknown
            cached = None
        recorded = _card_origin(Path(cached)) if isinstance(cached, str) else None
        found.update(_inherited(recorded) if recorded else {"teacher": {"kind": "unknown"}})
        return found
    return {"kind": "unknown", "source": path.name, "teacher": {"kind": "unknown"},
            "note": "the --init backbone is no longer where the run found it"}  # fmt: skip


def _inherited(origin: Mapping[str, Any]) -> dict[str, Any]:
    """What a backbone's own recorded origin tells a model fine-tuned from it."""
    out: dict[str, Any] = {"teacher": dict(origin.get("teacher") or {"kind": "unknown"})}
    if origin.get("objective"):
        out["objective"] = origin["objective"]
    if isinstance(origin.get("data"), Mapping):
        out["data"] = dict(origin["data"])
    if origin.get("finished") is not None:
        out["finished"] = origin["finished"]
    return out


# -- completion ------------------------------------------------------------------------------


def _log_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line; the push's card reads the log strictly
        if isinstance(record, dict):
            records.append(record)
    return records


def training_completion(
    run_dir: Path, info: Mapping[str, Any] | None = None, recipe: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Whether a run's training finished: ``{"finished": True | False | None, "step",
    "total_steps", "why"}`` (``None``: nothing recorded says either way)."""
    info = info or {}
    records = _log_records(run_dir)
    finals = [r for r in records if r.get("kind") == "final"]
    trained = [r for r in records if r.get("kind", "train") == "train" and "step" in r]
    step = trained[-1]["step"] if trained else None
    if finals:
        return {"finished": True, "step": finals[-1].get("step", step),
                "total_steps": finals[-1].get("step", step), "why": "the schedule completed"}
    if info.get("method") == "linear-probe":
        # One closed-form fit, not the trainer: its metrics.json is written when it is done.
        done = (run_dir / "metrics.json").is_file()
        return {"finished": done, "step": step, "total_steps": step,
                "why": "the probe was fitted" if done else "the probe has no metrics.json yet"}
    state = _checkpoint_state(run_dir)
    if state is not None:
        ckpt_step, total = state
        if total and ckpt_step < total:
            return {"finished": False, "step": ckpt_step, "total_steps": total,
                    "why": f"stopped at step {ckpt_step} of {total}"}  # fmt: skip
    max_steps = ((recipe or {}).get("schedule") or {}).get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0 and step is not None and step < max_steps:
        return {"finished": False, "step": step, "total_steps": max_steps,
                "why": f"stopped at step {step} of {max_steps}"}  # fmt: skip
    if trained and info:
        # The trainer writes run.json when it starts and the final record when the schedule
        # completes: a run with both a start and steps but no end did not finish.
        return {"finished": False, "step": step, "total_steps": None,
                "why": f"stopped at step {step}: metrics.jsonl has no final record"}
    return {"finished": None, "step": step, "total_steps": None, "why": "not recorded"}


def _checkpoint_state(run_dir: Path) -> tuple[int, int | None] | None:
    """``(step, total steps)`` of a run's latest checkpoint (``checkpoints/latest``)."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    state = _read_json(run_dir / "checkpoints" / pointer.read_text().strip() / "state.json")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return None
    total = (state.get("trainer") or {}).get("total_steps")
    return state["step"], total if isinstance(total, int) else None


# -- the whole origin ------------------------------------------------------------------------


def model_origin(
    model_dir: Path,
    run_dir: Path | None,
    model_kind: str,
    *,
    converted_from: Mapping[str, Any] | None = None,
    recorded: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """How the model in ``model_dir`` was made (see the module docstring for the sources).

    Keys: ``made_by`` (``pre-training``, ``fine-tuning``, ``linear probe``, ``conversion``,
    ``unknown``), ``objective`` (pre-training), ``teacher`` (``kind`` in
    :data:`TEACHER_KINDS`, ``description``: the teacher behind the weights, a fine-tuned
    model's that of its backbone), ``data`` (:func:`data_origin` of the run's own data),
    ``init`` (``kind`` in :data:`INIT_KINDS`, ``source``, and the backbone's ``objective``,
    ``teacher``, ``data`` when recorded), ``finished`` (``True``/``False``/``None``) and
    ``training`` (``step``, ``total_steps``, ``why``). ``recorded``: what the model's own
    card holds (``origin``, used when no run records are beside it; ``base_model``).
    """
    if converted_from:
        return {
            "made_by": "conversion",
            "teacher": {"kind": "none", "description": "not trained by cd2p"},
            "data": None,
            "init": {"kind": "converted", "source": None, "layout": converted_from.get("layout"),
                     "file": converted_from.get("file")},
            "finished": None,
        }  # fmt: skip
    if run_dir is None:
        if (recorded or {}).get("origin"):
            return dict(recorded["origin"])
        return {"made_by": "unknown", "teacher": {"kind": "unknown"}, "data": None,
                "init": {"kind": "unknown", "source": None}, "finished": None}  # fmt: skip
    info = _read_json(run_dir / "run.json")
    info = info if isinstance(info, dict) else {}
    recipe = _read_yaml(run_dir / "recipe.yaml")
    task = info.get("task") or recipe.get("task")
    fingerprint = info.get("data_fingerprint") or {}
    data = info.get("data") or []
    data = data if isinstance(data, list) else [data]
    completion = training_completion(run_dir, info, recipe)
    out: dict[str, Any]
    if task == "pretrain" or (task is None and model_kind in ("backbone", "student")):
        objective = _recipe_objective(recipe)
        out = {
            "made_by": "pre-training",
            "objective": objective,
            "teacher": _teacher(objective, info),
            "data": data_origin(data, fingerprint.get("source")) if data else None,
            "init": {"kind": "random", "source": None},
        }
    else:
        init = (init_origin(info.get("init"), (recorded or {}).get("base_model")) if info
                else {"kind": "unknown", "source": None})  # fmt: skip
        if init["kind"] == "scratch":
            teacher = {"kind": "none", "description": "none: trained from scratch"}
        else:
            teacher = dict(init.get("teacher") or {"kind": "unknown"})
        out = {
            "made_by": "linear probe" if info.get("method") == "linear-probe" else "fine-tuning",
            "teacher": teacher,
            "data": data_origin(data, fingerprint.get("source")) if data else None,
            "init": init,
        }
    out["finished"] = completion["finished"]
    out["training"] = {k: completion[k] for k in ("step", "total_steps", "why")}
    return out


def push_concerns(origin: Mapping[str, Any]) -> list[str]:
    """What makes a model unfit to publish without ``--force``, one short clause each: a
    RANDOM teacher (its own or its backbone's), synthetic data (its own or its backbone's),
    an unfinished training run. Empty for a model whose records say none of these."""
    out = []
    pretraining = origin.get("made_by") == "pre-training"
    teacher = origin.get("teacher") or {}
    if teacher.get("kind") == "random":
        out.append("it was distilled from a seeded RANDOM teacher, not CLIP" if pretraining
                   else "its backbone was distilled from a seeded RANDOM teacher, not CLIP")
    data = origin.get("data") or {}
    if data.get("synthetic"):
        out.append(f"it was trained on synthetic data ({data.get('name')})")
    init_data = (origin.get("init") or {}).get("data") or {}
    if init_data.get("synthetic"):
        out.append(f"its backbone was pre-trained on synthetic data ({init_data.get('name')})")
    if origin.get("finished") is False:
        why = (origin.get("training") or {}).get("why")
        out.append("its training did not finish" + (f" ({why})" if why else ""))
    return out


__all__ = [
    "INIT_KINDS",
    "PAIRS_SOURCE",
    "SYNTHETIC_MARKER",
    "TEACHER_KINDS",
    "data_origin",
    "init_origin",
    "model_origin",
    "pairs_source",
    "push_concerns",
    "synthetic_marker",
    "training_completion",
]
