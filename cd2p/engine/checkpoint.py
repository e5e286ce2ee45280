"""Checkpoints of a training run: safetensors + JSON only, written atomically.

Layout (one directory per checkpoint, ``STEP`` zero-padded)::

    RUN/checkpoints/
      step-00001000/
        model.safetensors       the trained module's state dict
        optimizer.safetensors   the optimiser's state tensors, flattened as ``state.<i>.<name>``
        optimizer.json          its param groups and non-tensor state
        rng.safetensors         RNG states per rank: ``rank<r>.torch_cpu``, ``.cuda``, ``.numpy``
        state.json              step, epoch, trainer state, world size, Python/numpy RNG scalars
        recipe.yaml             the run's recipe
      latest                    the name of the newest complete checkpoint (``step-NNNNNNNN``)

Guarantees:

- A checkpoint is written in a temporary directory and renamed when complete, then ``latest``
  is replaced atomically, so a run killed at any moment leaves the previous checkpoint intact.
  The temporaries a killed run leaves (``.step-….<pid>-<hex>.tmp`` and their ``.old`` trash)
  are removed by the next save (and by the trainer when a run starts or resumes), unless the
  process named by their pid still runs.
- Nothing non-finite is written: :func:`save_checkpoint` refuses model weights or optimiser
  state holding NaN / inf (:class:`NonFiniteCheckpoint`), so a diverging run cannot rotate
  its good checkpoints out (``keep``), and its JSON files hold ``null`` where a number was
  not finite (never a bare ``NaN``, which is not JSON).
- Rotation (``keep``) only deletes checkpoints older than the one just written, once it is
  complete.
- :func:`latest_checkpoint` verifies what it returns: it opens every file (safetensors headers
  and tensors, JSON with its keys, the YAML recipe; :func:`verify_checkpoint`), reports a
  damaged one by file and problem, refuses a ``latest`` that names anything but a
  ``step-NNNNNNNN`` directory of this run, and falls back to the newest intact checkpoint. When
  none is intact it raises :class:`NoIntactCheckpoint`.

Nothing is pickled: loading uses ``safetensors``, ``json`` and ``yaml.safe_load`` only.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from cd2p._atomic import atomic_directory, atomic_write_text, finite_json, remove_stale_temporaries
from cd2p.config import Recipe, save_recipe

CHECKPOINTS = "checkpoints"
LATEST = "latest"
# What ``latest`` may name: a checkpoint directory of this run, nothing with a path in it.
_STEP_NAME = re.compile(r"step-(\d{8,})")


class CheckpointDamaged(ValueError):
    """A checkpoint file that is missing, empty, truncated, unparsable or not finite."""

    def __init__(self, file: Path, problem: str) -> None:
        self.file = Path(file)
        self.problem = problem
        super().__init__(f"{file}: {problem}")


class NoIntactCheckpoint(FileNotFoundError):
    """A run has checkpoints (or a ``latest``), but none of them can be resumed from."""


class NonFiniteCheckpoint(ValueError):
    """:func:`save_checkpoint` refused weights or optimiser state that hold NaN / inf."""


# -- finiteness ------------------------------------------------------------------------------


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or ``None``.

    One device synchronisation per device (the per-tensor flags are reduced on the device
    first); the names are looked for one by one only when something is not finite.
    """
    floats = [(n, t.detach()) for n, t in tensors if t.is_floating_point() or t.is_complex()]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, tensor in floats:
        by_device.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return None
    return next((n for n, t in floats if not bool(torch.isfinite(t).all())), None)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, torch.Tensor]]:
    """The optimiser's state tensors, named as in ``optimizer.safetensors``."""
    for index, entries in optimizer.state_dict()["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                yield f"state.{index}.{name}", value


# -- RNG states ------------------------------------------------------------------------------


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's global RNG states (torch CPU and CUDA, numpy, Python ``random``).

    Returns tensors (for safetensors) and JSON-ready scalars.
    """
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, internal, gauss_next = random.getstate()
    scalars = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": cached},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    return tensors, scalars


def restore_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(tensors["torch_cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        states = list(tensors["cuda"].unbind(0))
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])
    np_scalars = scalars["numpy"]
    keys = tensors["numpy"].numpy().view(np.uint32)
    np.random.set_state(
        (np_scalars["kind"], keys, np_scalars["pos"], np_scalars["has_gauss"], np_scalars["cached"])
    )
    py = scalars["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


# -- optimiser state -------------------------------------------------------------------------


def flatten_optimizer_state(
    state: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors ``state.<param>.<name>``, JSON-ready rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in rest["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in rest["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# -- writing and reading ---------------------------------------------------------------------


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` restores besides the model and optimiser."""

    path: Path
    step: int
    epoch: int
    trainer_state: dict[str, Any]
    world_size: int


def _write_json(path: Path, data: Any) -> None:
    # A best metric of NaN (an evaluation of a diverged model) is written as null: bare NaN is
    # not JSON, and other readers (jq, JavaScript) would refuse the file.
    path.write_text(json.dumps(finite_json(data), indent=1, sort_keys=True, allow_nan=False))


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    recipe: Recipe,
    rng_states: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
    trainer_state: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write ``RUN/checkpoints/step-STEP`` atomically and point ``latest`` at it.

    Args:
        model: the bare module (not the DDP / compiled wrapper).
        rng_states: :func:`capture_rng_state` of every rank, in rank order.
        trainer_state: JSON-ready extras (best metric so far...); non-finite floats are
            written as ``null``.
        keep: keep only the newest ``keep`` checkpoints up to this one (``None``: keep all);
            checkpoints of later steps (left by a run that resumed from an earlier one) stay
            until this run writes those steps again.

    Raises :class:`NonFiniteCheckpoint` (writing nothing, deleting nothing) when the model's
    weights or the optimiser state hold NaN / inf.
    """
    root = Path(run_dir) / CHECKPOINTS
    name = f"step-{step:08d}"
    for what, tensors in (
        ("the model's weights", model.state_dict().items()),
        ("the optimiser state", optimizer_tensors(optimizer)),
    ):
        bad = first_nonfinite(tensors)
        if bad is not None:
            raise NonFiniteCheckpoint(
                f"refusing to write {root / name}: {what} are not finite ({bad}); the "
                "earlier checkpoints are kept"
            )
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)  # what a run killed while saving left behind
    # Re-saving a step (a resumed run ending where it was stopped) replaces it once complete.
    with atomic_directory(root / name) as tmp:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        opt_tensors, opt_rest = flatten_optimizer_state(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", opt_rest)
        rng_tensors: dict[str, torch.Tensor] = {}
        rng_scalars = []
        for rank, (tensors, scalars) in enumerate(rng_states):
            rng_tensors.update({f"rank{rank}.{k}": v.contiguous() for k, v in tensors.items()})
            rng_scalars.append(scalars)
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        _write_json(
            tmp / "state.json",
            {
                "step": step,
                "epoch": epoch,
                "world_size": len(rng_states),
                "trainer": trainer_state or {},
                "rng": rng_scalars,
            },
        )
        save_recipe(recipe, tmp / "recipe.yaml")
    atomic_write_text(root / LATEST, name + "\n")
    if keep is not None:
        # Only the history up to this step: a later (damaged) checkpoint that a resumed run
        # fell back from must not count as one of the newest ``keep``.
        older = [path for number, path in _step_dirs(root) if number < step]
        for old in older[max(keep - 1, 0) :]:
            shutil.rmtree(old)
    return root / name


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step-NNNNNNNN`` directories in ``root``, newest first (not
    links: a checkpoint of this run lies in the run)."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_NAME.fullmatch(entry.name)
        if match is not None and entry.is_dir() and not entry.is_symlink():
            found.append((int(match[1]), entry))
    return sorted(found, key=lambda item: item[0], reverse=True)


def _safetensors(file: Path, *, finite: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of ``file``, or :class:`CheckpointDamaged` saying what is wrong."""
    if not file.is_file():
        raise CheckpointDamaged(file, "missing")
    size = file.stat().st_size
    if size == 0:
        raise CheckpointDamaged(file, "empty (0 bytes)")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointDamaged(
            file, f"truncated or corrupt ({size} bytes; safetensors: {exc})"
        ) from None
    bad = first_nonfinite(tensors.items()) if finite else None
    if bad is not None:
        raise CheckpointDamaged(file, f"tensor {bad!r} is not finite (NaN or inf)")
    return tensors


def _json(file: Path, keys: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """``file`` parsed as a JSON object holding ``keys`` (of those types), or
    :class:`CheckpointDamaged`."""
    if not file.is_file():
        raise CheckpointDamaged(file, "missing")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointDamaged(file, f"unreadable ({exc})") from None
    if not text.strip():
        raise CheckpointDamaged(file, "empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointDamaged(file, f"not valid JSON ({exc}): truncated or corrupt") from None
    if not isinstance(data, dict):
        raise CheckpointDamaged(file, f"holds a JSON {type(data).__name__}, not an object")
    for key, kind in keys.items():
        if key not in data:
            raise CheckpointDamaged(file, f"has no {key!r}")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise CheckpointDamaged(file, f"{key!r} is {data[key]!r}, of the wrong type")
    return data


_STATE_KEYS = {"step": int, "epoch": int, "rng": list, "trainer": dict}
_OPTIMIZER_KEYS = {"param_groups": list, "scalars": dict}


def verify_checkpoint(path: str | Path) -> None:
    """Check that a checkpoint directory can be resumed from, reading every file: the
    safetensors files' headers and tensors (model weights and optimiser state finite), the JSON
    files with their keys, the YAML recipe, and that ``state.json``'s step is the directory's.

    Costs about one read of the checkpoint. Raises :class:`CheckpointDamaged` naming the first
    file that is missing, empty, truncated or corrupt, and what is wrong with it.
    """
    path = Path(path)
    state = _json(path / "state.json", _STATE_KEYS)
    match = _STEP_NAME.fullmatch(path.name)
    if match is not None and int(match[1]) != state["step"]:
        raise CheckpointDamaged(
            path / "state.json", f"says step {state['step']}, but the directory is {path.name}"
        )
    _json(path / "optimizer.json", _OPTIMIZER_KEYS)
    _safetensors(path / "model.safetensors", finite=True)
    _safetensors(path / "optimizer.safetensors", finite=True)
    rng = _safetensors(path / "rng.safetensors")
    if "rank0.torch_cpu" not in rng:
        raise CheckpointDamaged(path / "rng.safetensors", "holds no RNG state of rank 0")
    recipe = path / "recipe.yaml"
    if not recipe.is_file():
        raise CheckpointDamaged(recipe, "missing")
    try:
        data = yaml.safe_load(recipe.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        problem = str(exc).replace("\n", " ")
        raise CheckpointDamaged(recipe, f"not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise CheckpointDamaged(recipe, "empty or not a mapping of recipe sections")


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _named_by_latest(root: Path, warn: Callable[[str], None]) -> Path | None:
    """The checkpoint ``root/latest`` names, if it names one of this run (else warn)."""
    pointer = root / LATEST
    try:
        text = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        warn(f"{pointer} is unreadable ({exc}): ignored")
        return None
    if _STEP_NAME.fullmatch(text) is None:
        # Also what keeps it inside the run: no "..", no "/", no absolute path.
        shown = text if len(text) <= 80 else text[:77] + "..."
        warn(f"{pointer} holds {shown!r}, not the name of a checkpoint of this run "
             "(step-NNNNNNNN): ignored")  # fmt: skip
        return None
    path = root / text
    if not path.is_dir():
        warn(f"{pointer} names {text}, which does not exist")
        return None
    if path.resolve().parent != root.resolve():
        warn(f"{pointer} names {text}, a link out of {root}: ignored")
        return None
    return path


def latest_checkpoint(
    run_dir: str | Path, *, warn: Callable[[str], None] | None = None
) -> Path | None:
    """The newest intact checkpoint of a run, or ``None`` if it has none at all.

    The one ``latest`` names, after :func:`verify_checkpoint`. When ``latest`` is missing,
    names something else than a ``step-NNNNNNNN`` directory of this run, or its checkpoint is
    damaged, every problem is reported through ``warn`` (one line each, naming the file and
    what is wrong; default: printed to stderr) and the newest intact ``step-*`` directory is
    returned, saying so.

    Raises :class:`NoIntactCheckpoint` (naming the run) when the run has checkpoints or a
    ``latest`` but none of them is intact.
    """
    warn = warn or _warn_stderr
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    steps = [path for _, path in _step_dirs(root)]
    named = None
    if pointer.exists() or pointer.is_symlink():
        named = _named_by_latest(root, warn)
    elif steps:
        warn(f"{pointer} is missing (a run stopped while writing its first checkpoint?)")
    elif not root.is_dir() or not any(root.iterdir()):
        return None
    candidates = ([named] if named is not None else []) + [p for p in steps if p != named]
    damaged = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as exc:
            warn(f"checkpoint {path.name} is damaged: {exc}")
            damaged.append(path.name)
            continue
        if path != named:
            warn(f"falling back to {path}, the newest intact checkpoint")
        return path
    if not candidates and not (pointer.exists() or pointer.is_symlink()):
        return None  # only temporaries of an interrupted first save: nothing to resume
    listed = ", ".join(damaged[:4]) + (f" and {len(damaged) - 4} more" if len(damaged) > 4 else "")
    raise NoIntactCheckpoint(
        f"{run_dir} has no intact checkpoint to resume from (damaged: {listed or 'none'}; see "
        f"the warnings above): restore one into {root} or start a new run"
    )


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    rank: int = 0,
    restore_rng: bool = True,
) -> Checkpoint:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``model`` / ``optimizer``
    (strictly) and, when ``restore_rng``, this rank's global RNG states."""
    path = Path(path)
    for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json", "state.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {name} is missing")
    state = _json(path / "state.json", {"step": int, "epoch": int})
    model_file = path / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(model_file), strict=False)
    except SafetensorError as exc:
        raise CheckpointDamaged(model_file, f"truncated or corrupt (safetensors: {exc})") from None
    if missing or unexpected:
        raise ValueError(
            f"{model_file} does not match the model: "
            f"missing {sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}"
        )
    if optimizer is not None:
        opt_rest = _json(path / "optimizer.json", _OPTIMIZER_KEYS)
        opt_tensors = _safetensors(path / "optimizer.safetensors")
        optimizer.load_state_dict(unflatten_optimizer_state(opt_tensors, opt_rest))
    if restore_rng:
        rng_tensors = _safetensors(path / "rng.safetensors")
        prefix = f"rank{rank}."
        mine = {k[len(prefix) :]: v for k, v in rng_tensors.items() if k.startswith(prefix)}
        if mine and rank < len(state.get("rng", [])):
            restore_rng_state(mine, state["rng"][rank])
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        epoch=int(state["epoch"]),
        trainer_state=state.get("trainer", {}),
        world_size=int(state.get("world_size", 1)),
    )
