"""Files shipped with cd2p: recipes and model-card templates (``recipes/`` and ``hubcards/``)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def hubcard_path(kind: str) -> Path:
    """Path of the Jinja model-card template for a model kind (``backbone``, ...)."""
    path = _PACKAGE / "hubcards" / f"{kind}.md"
    if not path.is_file():
        raise FileNotFoundError(f"no model-card template for model kind {kind!r} at {path}")
    return path


def recipes_dir() -> Path:
    """Directory of the recipes shipped with cd2p."""
    return _PACKAGE / "recipes"


def recipe_path(name_or_path: str | Path) -> Path:
    """Resolve a recipe given as a path or as a shipped name (``pretrain-scannet``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = recipes_dir() / (path.name if path.suffix else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    from cd2p.catalog import closest_recipe

    close = closest_recipe(str(name_or_path))
    if close is not None:
        hint = f"did you mean {close!r}? (`cd2p recipes` lists the shipped ones)"
    else:
        known = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.yaml")))
        hint = f"shipped recipes: {known}"
    raise FileNotFoundError(f"recipe {str(name_or_path)!r} not found (no such file); {hint}")
