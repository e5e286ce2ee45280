"""``cd2p push`` and ``cd2p pull``: share models through the Hugging Face Hub.

Authentication is huggingface_hub's own: ``hf auth login`` or the ``HF_TOKEN`` variable. There
is deliberately no token option, so a token never lands in shell history or logs.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from rich.table import Table

from cd2p._text import styled
from cd2p.cli._common import EXISTING_DIR, OUTPUT_DIR, Cd2pError, console, user_errors

# Exception classes of the HTTP stacks that huggingface_hub has used (httpx2 / httpx / httpcore
# in recent releases, requests / urllib3 before) that mean "no answer from the server".
_NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")
_NETWORK_CLASSES = ("TransportError", "NetworkError", "TimeoutException", "ConnectionError",
                    "Timeout", "NewConnectionError", "MaxRetryError", "ProtocolError")  # fmt: skip


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its causes and contexts (huggingface_hub wraps the transport's error)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def network_failure(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain that says the Hub could not be reached: a refused or
    failed connection, a timeout, an unknown host. ``None`` for anything else (the Hub
    answered, offline mode, or a local error)."""
    for current in _chain(exc):
        if isinstance(current, OfflineModeIsEnabled):
            return None  # not a failure of the network: HF_HUB_OFFLINE is set
        if isinstance(current, ConnectionError | TimeoutError | socket.gaierror):
            return current
        module = type(current).__module__.split(".")[0]
        if module in _NETWORK_MODULES and any(
            c.__name__ in _NETWORK_CLASSES for c in type(current).__mro__
        ):
            return current
    return None


def hub_errors(func: Callable) -> Callable:
    """Hub failures (not logged in, no such repo, offline, no network) as one clean line,
    with a hint."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except OfflineModeIsEnabled as exc:
            raise Cd2pError(f"{exc} (HF_HUB_OFFLINE is set)") from exc
        except Cd2pError:
            raise
        except Exception as exc:
            if isinstance(exc, HfHubHTTPError) and exc.response is not None:
                raise _refused(exc) from exc
            cause = network_failure(exc)
            if cause is not None:
                from huggingface_hub import constants

                # Only the first line of the cause: the libraries add paragraphs of advice.
                detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
                what = type(cause).__name__ + (f": {detail}" if detail else "")
                # A push commits last: when it cannot reach the Hub nothing is published.
                outcome = "; nothing was pushed" if func.__name__ == "push" else ""
                raise Cd2pError(
                    f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({what}): check "
                    f"your connection, HF_ENDPOINT and any proxy settings{outcome}"
                ) from exc
            if any(isinstance(e, OfflineModeIsEnabled) for e in _chain(exc)):
                raise Cd2pError(
                    f"{str(exc).strip().splitlines()[0]} (HF_HUB_OFFLINE is set: only models "
                    "already in the local cache can be used)"
                ) from exc
            if isinstance(exc, HfHubHTTPError):
                raise _refused(exc) from exc
            raise

    return wrapper


def _refused(exc: HfHubHTTPError) -> Cd2pError:
    """The Hub answered with an error."""
    status = exc.response.status_code if exc.response is not None else None
    hint = (
        "; log in with `hf auth login` or set HF_TOKEN to a token with write access"
        if status in (401, 403)
        else ""
    )
    first = str(exc).splitlines()[0]
    return Cd2pError(f"the Hub refused the request: {first}{hint}")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@click.command()
@click.argument("path", type=EXISTING_DIR)
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private (new repos only).")
@click.option("--revision", default=None, help="Branch to commit to (created if missing).")
@click.option("--commit-message", default=None, help="Commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@click.option(
    "--dry-run",
    "dry_run",
    type=OUTPUT_DIR,
    default=None,
    metavar="DIR",
    help="Write exactly what would be uploaded into DIR; upload nothing.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Push a model distilled from a RANDOM teacher, trained on synthetic data or from an "
    "unfinished run (its card says so).",
)
@user_errors
@hub_errors
def push(
    path: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    create_pr: bool,
    dry_run: Path | None,
    force: bool,
) -> None:
    """Upload a run's exported model (or a model directory) PATH to the Hub repo REPO_ID.

    \b
    Uploaded, in one commit: config.json, model.safetensors, README.md (model card with
    how the model was made: teacher, data, initialisation, whether training finished; the
    run's metrics and recipe), recipe.yaml, metrics.jsonl / metrics.json / eval/metrics.json
    and *.png plots, with local paths replaced by <data>/..., <run>/..., ~/... Never
    checkpoints, optimizer states or data; a file holding an access token stops the push.
    A model distilled from a RANDOM teacher, trained on synthetic data or from an unfinished
    run needs --force.
    """
    from cd2p.hub import push as push_model

    with console.status("rendering the model card and checking files"):
        result = push_model(
            path,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            dry_run_dir=dry_run,
            force=force,
        )
    table = Table(title=f"{'would upload' if dry_run else 'uploaded'} to {repo_id}")
    table.add_column("file", style="cyan")
    table.add_column("size", justify="right")
    for name in result.files:
        table.add_row(name, _size(result.sizes[name]))
    console.print(table)
    if dry_run is not None:
        console.print(styled("dry run: nothing uploaded; the files are in [bold]{path}[/]",
                             path=dry_run))
        if result.concerns and not force:
            console.print(styled("[bold yellow]warning:[/] a real push needs --force: {why}",
                                 why="; ".join(result.concerns)), soft_wrap=True)
    elif result.pr_url:
        console.print(f"pull request: {result.pr_url}")
    else:
        console.print(f"commit: {result.commit_url}")


@click.command()
@click.argument("repo_id")
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
@user_errors
@hub_errors
def pull(repo_id: str, revision: str | None) -> None:
    """Download the Hub repo REPO_ID into the Hugging Face cache and print its local path.

    Load it in Python with cd2p.from_pretrained(REPO_ID) (the cache is reused).
    """
    from cd2p.hub import pull as pull_model

    with console.status(f"downloading {repo_id}"):
        path = pull_model(repo_id, revision=revision)
    # Only the path on stdout, so that scripts can use $(cd2p pull org/name).
    click.echo(str(path))
