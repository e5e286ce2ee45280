"""The shipped recipes as a catalogue (``cd2p recipes``): what each one is, the paper's result it
reproduces and the hardware it is meant for, read from its leading comment block::

    # What the recipe is, in a few lines (the first comment lines).
    # paper: ModelNet40 OA 92.71 % without voting after fine-tuning
    # hardware: GPUs (batch 128 x 4096 points; ...)
    task: pretrain
    description: the one-line summary
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import yaml

from cd2p._resources import recipes_dir


@dataclass(frozen=True)
class RecipeInfo:
    """One shipped recipe: ``name`` (what ``--recipe`` takes), its ``task``, the one-line
    ``description``, the leading comment ``about`` it, the ``paper`` result it reproduces and
    the ``hardware`` it is meant for."""

    name: str
    path: Path
    task: str
    description: str
    about: str
    paper: str
    hardware: str

    @property
    def meant_for_gpus(self) -> bool:
        return self.hardware.upper().startswith("GPU")


def read_recipe_info(path: str | Path) -> RecipeInfo:
    """The catalogue entry of one recipe file."""
    path = Path(path)
    text = path.read_text()
    about, fields = [], {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        key, sep, value = body.partition(":")
        if sep and key in ("paper", "hardware"):
            fields[key] = value.strip()
        else:
            about.append(body)
    data = yaml.safe_load(text) or {}
    return RecipeInfo(
        name=path.stem,
        path=path,
        task=str(data.get("task", "pretrain")),
        description=str(data.get("description", "")),
        about=" ".join(about),
        paper=fields.get("paper", ""),
        hardware=fields.get("hardware", ""),
    )


def shipped_recipes() -> list[RecipeInfo]:
    """Every shipped recipe, by name."""
    return [read_recipe_info(p) for p in sorted(recipes_dir().glob("*.yaml"))]


def closest_recipe(name: str) -> str | None:
    """The shipped recipe name closest to a mistyped ``name`` (or None if none is close)."""
    names = [p.stem for p in recipes_dir().glob("*.yaml")]
    stem = Path(name).stem
    close = difflib.get_close_matches(stem, names, n=1, cutoff=0.6)
    if close:
        return close[0]
    prefixed = [n for n in names if n.startswith(stem) or stem in n]
    return prefixed[0] if len(prefixed) == 1 else None


def recipe_info(name: str) -> RecipeInfo:
    """The shipped recipe ``name``; ``FileNotFoundError`` suggesting the closest name."""
    path = recipes_dir() / f"{Path(name).stem}.yaml"
    if not path.is_file():
        close = closest_recipe(name)
        hint = f"; did you mean {close!r}?" if close else "; `cd2p recipes` lists them"
        raise FileNotFoundError(f"no shipped recipe named {name!r}{hint}")
    return read_recipe_info(path)


__all__ = ["RecipeInfo", "closest_recipe", "read_recipe_info", "recipe_info", "shipped_recipes"]
