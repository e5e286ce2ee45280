"""Terminal text: what cd2p prints is text, and styling is only ever in cd2p's own templates.

Paths, scene ids, recipe values and other processes' messages hold ``[...]`` too (gloo says
``[127.0.0.1]:29500``); printed as rich markup they would lose that text or raise a markup
error. So the consoles never read markup (:func:`plain_console`), and a styled line is built
with :func:`styled`, which escapes every value put into its template.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text


def plain_console(stderr: bool = False, **kwargs: Any) -> Console:
    """A console that prints strings as they are (no markup, no highlighting)."""
    return Console(stderr=stderr, highlight=False, markup=False, **kwargs)


def styled(template: str, /, **values: Any) -> Text:
    """``template`` (rich markup with ``{name}`` fields) with ``values`` filled in as plain
    text: ``styled("[green]prepared[/] {out}", out=path)``."""
    return Text.from_markup(template.format(**{k: escape(str(v)) for k, v in values.items()}))


__all__ = ["plain_console", "styled"]
