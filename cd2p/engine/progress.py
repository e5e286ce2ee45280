"""Progress of long loops (evaluations with voting, embedding many clouds) that reads right
both on a terminal (a rich progress bar) and in a cluster's log file (plain, complete lines
every tenth of the work, never a bar redrawn into the file)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextlib.contextmanager
def progress_reporter(
    console: Console, label: str, total: int, unit: str, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``, to be called as ``n`` more of ``total`` items are done.

    On a terminal it drives a transient progress bar; otherwise it prints a line such as
    ``evaluate: 120/480 shapes (25 %), 31.2 shapes/s, 0:00:04 elapsed`` whenever another tenth
    is done (and at the end). ``enabled=False`` (other ranks, ``--no-progress``) prints nothing.
    """
    if not enabled or total <= 0:
        yield lambda n: None
        return
    if console.is_terminal:
        with Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as bar:
            job = bar.add_task(label, total=total)
            yield lambda n: bar.advance(job, n)
        return
    state = {"done": 0, "next": max(1, total // 10)}
    started = time.perf_counter()

    def advance(n: int) -> None:
        state["done"] += n
        done = state["done"]
        if done >= state["next"] or done >= total:
            while state["next"] <= done:
                state["next"] += max(1, total // 10)
            elapsed = time.perf_counter() - started
            rate = done / elapsed if elapsed > 0 else 0.0
            console.print(
                f"{label}: {done}/{total} {unit} ({100 * done / total:.0f} %), "
                f"{rate:.1f} {unit}/s, {time.strftime('%H:%M:%S', time.gmtime(elapsed))} elapsed",
                soft_wrap=True,
                highlight=False,
            )

    yield advance


__all__ = ["progress_reporter"]
