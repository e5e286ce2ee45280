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
      latest                    the name of the newest complete checkpoint

A checkpoint is written in a temporary directory and renamed when complete, then ``latest``
is replaced atomically, so a run killed at any moment leaves the previous checkpoint intact.
Nothing is pickled: loading uses ``safetensors`` and ``json`` only.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from cd2p._atomic import atomic_directory, atomic_write_text
from cd2p.config import Recipe, save_recipe

CHECKPOINTS = "checkpoints"
LATEST = "latest"


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
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


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
        trainer_state: JSON-ready extras (best metric so far...).
        keep: keep only the newest ``keep`` checkpoints (``None``: keep all).
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
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
        for old in sorted(root.glob("step-*"))[:-keep]:
            if old.name != name:
                shutil.rmtree(old)
    return root / name


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or ``None`` if it has none."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


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
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path / 'model.safetensors'} does not match the model: "
            f"missing {sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}"
        )
    state = json.loads((path / "state.json").read_text())
    if optimizer is not None:
        opt_rest = json.loads((path / "optimizer.json").read_text())
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        optimizer.load_state_dict(unflatten_optimizer_state(opt_tensors, opt_rest))
    if restore_rng:
        rng_tensors = load_file(str(path / "rng.safetensors"))
        prefix = f"rank{rank}."
        mine = {k[len(prefix) :]: v for k, v in rng_tensors.items() if k.startswith(prefix)}
        if mine and rank < len(state["rng"]):
            restore_rng_state(mine, state["rng"][rank])
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        epoch=int(state["epoch"]),
        trainer_state=state.get("trainer", {}),
        world_size=int(state.get("world_size", 1)),
    )
