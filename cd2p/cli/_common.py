"""Helpers shared by the CLI commands: one rich console, error reporting, the options and
argument types several commands declare alike, device choice and summary tables."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table
from rich.text import Text

from cd2p._text import plain_console
from cd2p.tasks import task_names

if TYPE_CHECKING:  # torch is imported only by the commands that run something
    import torch

# Strings print as they are: styling only through cd2p._text.styled (paths hold [...] too).
console = plain_console()
err_console = plain_console(stderr=True)


class Cd2pError(click.ClickException):
    """An error the user can fix; printed without a traceback."""

    def show(self, file: Any = None) -> None:  # noqa: ARG002
        # One complete line, never wrapped (a log file or a narrow terminal).
        # The message is text, never markup: paths and peers' messages hold [...] too.
        line = Text.assemble(("error:", "bold red"), " ", self.format_message())
        err_console.print(line, soft_wrap=True)


def user_errors(func: Callable) -> Callable:
    """Turn the library's expected failures (bad files, bad recipes) into clean CLI errors."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        # OSError: a full disk, a permission, a file that vanished: the message names the file.
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            if "--debug" in sys.argv:
                raise
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise Cd2pError(str(message)) from exc

    return wrapper


def interruptible(func: Callable) -> Callable:
    """A training command stopped by SIGINT / SIGTERM: the trainer has written a checkpoint and
    printed the ``--resume`` command; exit with the shell's code for the signal (130 / 143)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from cd2p.engine.trainer import TrainingInterrupted

        try:
            return func(*args, **kwargs)
        except TrainingInterrupted as exc:
            from cd2p.engine import distributed as D

            D.cleanup()
            sys.exit(exc.exit_code)

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


# -- argument types and options several commands share -----------------------------------------
EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
OUTPUT_DIR = click.Path(file_okay=False, path_type=Path)

#: ``TASK`` of ``cd2p finetune`` and ``cd2p evaluate``: a task of the task table.
task_argument = click.argument("task", type=click.Choice(list(task_names())))
#: ``--out RUN`` of the training commands.
run_out_option = click.option("--out", type=OUTPUT_DIR, help="New run directory.")
#: ``--resume RUN`` of the training commands.
resume_option = click.option(
    "--resume",
    type=EXISTING_DIR,
    help="Continue the run in this directory from its latest checkpoint (also a finished "
    "run: extend it with --set schedule.epochs=N).",
)


def overrides_option(
    help_text: str = "Override a recipe value, e.g. --set schedule.epochs=10 (repeatable).",
) -> Callable:
    """``--set SECTION.KEY=VALUE`` (repeatable), passed to the command as ``overrides``."""
    return click.option(
        "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=help_text
    )


def resumed_run_dir(out: Path | None, resume: Path) -> Path:
    """The run directory of ``--resume RUN``; a ``--out`` given with it must name the same one."""
    if out is not None and out.resolve() != resume.resolve():
        raise click.UsageError("--out and --resume name different directories")
    return resume


@contextlib.contextmanager
def new_run_output(out: Path | None, resume: bool) -> Iterator[None]:
    """Around a new training run: if it fails before it has anything to keep (no checkpoint,
    no model), remove what it wrote into ``out``, so that the same ``--out`` works once the
    problem is fixed instead of being refused as an existing run. Resumed runs and runs with a
    checkpoint are left as they are (``--resume`` continues them)."""
    existed = out is not None and out.exists()
    fresh = out is not None and not resume and not (existed and any(out.iterdir()))
    try:
        yield
    except BaseException as exc:
        from cd2p.engine.trainer import TrainingInterrupted

        keep = isinstance(exc, TrainingInterrupted | SystemExit) or not is_main_process()
        if fresh and not keep and out.is_dir() and not _has_results(out):
            shutil.rmtree(out)
            if existed:  # the user's own empty directory stays
                out.mkdir()
        raise


def _has_results(run_dir: Path) -> bool:
    """Whether a run directory holds anything worth keeping: a checkpoint or a saved model."""
    return any(run_dir.rglob("step-*")) or any(run_dir.rglob("model.safetensors"))


def is_main_process() -> bool:
    """Whether this is rank 0 (under ``torchrun`` only rank 0 prints the summary)."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(name: str) -> torch.device:
    """``--device`` value -> device: ``"auto"`` is the GPU when there is one, else the CPU;
    ``cpu``, ``cuda``, ``cuda:1``... as given (a usage error if CUDA is missing)."""
    from cd2p.engine.distributed import resolve_device as resolve

    try:
        return resolve(name)
    except (ValueError, RuntimeError) as exc:  # no CUDA here / not a device name at all
        reason = "CUDA is not available on this machine" if name.startswith("cuda") else str(exc)
        raise click.BadParameter(reason, param_hint="--device") from None


def _pct(value: Any) -> str:
    if not isinstance(value, int | float) or value != value:  # None or NaN
        return "-"
    return f"{100 * value:.2f}"


def multirun_table(summary: dict[str, Any], title: str) -> Table:
    """Every metric of a multi-seed / few-shot run: mean ± std, min, max and each member's value
    (in %), one block of rows per group, with the splits the results were selected and
    evaluated on in the caption."""
    table = Table(title=title, title_justify="left")
    for header in ("group", "metric", "mean ± std", "min", "max", "n", "values"):
        table.add_column(header, justify="left" if header in ("group", "metric") else "right")
    for group, block in (summary.get("groups") or {}).items():
        for i, (metric, stats) in enumerate((block.get("metrics") or {}).items()):
            table.add_row(
                group if i == 0 else "",
                metric,
                f"{_pct(stats['mean'])} ± {_pct(stats['std'])}",
                _pct(stats["min"]),
                _pct(stats["max"]),
                str(stats["n"]),
                " ".join(_pct(v) for v in stats.get("values", [])),
            )
        table.add_section()
    selected = summary.get("selection_split")
    evaluated = summary.get("evaluation_split") or summary.get("split")
    parts = [f"selected on {selected}" if selected else "", f"evaluated on {evaluated}"
             if evaluated else "", "std: sample (n - 1)"]  # fmt: skip
    table.caption = "; ".join(p for p in parts if p)
    return table


def key_value_table(title: str) -> Table:
    """The two-column (name, value) summary table the commands print at the end."""
    table = Table(title=title, show_header=False)
    table.add_column(style="bold cyan")
    table.add_column()
    return table
