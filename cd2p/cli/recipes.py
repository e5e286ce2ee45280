"""``cd2p recipes``: the shipped recipes, what each reproduces, and one recipe's text."""

from __future__ import annotations

import click
from rich.syntax import Syntax

from cd2p._text import styled
from cd2p.cli._common import console, user_errors


@click.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx: click.Context) -> None:
    """List the shipped recipes: task, what each is, the paper's result it reproduces and
    the hardware it is meant for. `cd2p recipes show NAME` prints one.

    \b
    Use one with --recipe NAME (or a path to your own YAML file), override any value with
    --set section.key=value.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_recipes)


@recipes.command("list")
def list_recipes() -> None:
    """List the shipped recipes (the default of `cd2p recipes`)."""
    from cd2p.catalog import shipped_recipes

    # One block per recipe: it reads at any terminal width (and in a log file).
    console.print(styled("[bold]shipped recipes[/] (cd2p <command> --recipe NAME):\n"))
    for info in shipped_recipes():
        hardware = info.hardware.split(" (")[0]
        console.print(styled("[bold cyan]{name}[/]  [dim]{task} · {hardware}[/]", name=info.name,
                             task=info.task, hardware=hardware))
        console.print(f"    {info.description}", soft_wrap=False)
        console.print(styled("    [green]paper:[/] {paper}", paper=info.paper))


@recipes.command("show")
@click.argument("name")
@user_errors
def show(name: str) -> None:
    """Print the shipped recipe NAME (a mistyped name suggests the closest)."""
    from cd2p.catalog import recipe_info

    info = recipe_info(name)
    console.print(styled("[bold]{name}[/] ({path})", name=info.name, path=info.path))
    console.print(Syntax(info.path.read_text(), "yaml", background_color="default"))
