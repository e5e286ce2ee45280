"""Helpers shared by the CLI commands: one rich console, error reporting, recipe options."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


class Cd2pError(click.ClickException):
    """An error the user can fix; printed without a traceback."""

    def show(self, file: Any = None) -> None:  # noqa: ARG002
        err_console.print(f"[bold red]error:[/] {self.format_message()}")


def user_errors(func: Callable) -> Callable:
    """Turn the library's expected failures (bad files, bad recipes) into clean CLI errors."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as exc:
            if "--debug" in sys.argv:
                raise
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise Cd2pError(str(message)) from exc

    return wrapper


def parse_shard(value: str | None) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; ``None`` -> ``(0, 1)``."""
    if value is None:
        return 0, 1
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected I/N such as 0/4, got {value!r}") from None
    if count < 1 or not 0 <= index < count:
        raise click.BadParameter(f"shard index must satisfy 0 <= I < N, got {value!r}")
    return index, count
