"""CLI commands contributed by plugins."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Callable

import attrs

from . import hookspec

if TYPE_CHECKING:
    from ..kernel import Kernel


@attrs.frozen(kw_only=True)
class CliCommand:
    """A ``risoluto <name>`` subcommand. ``run(args)`` returns the exit status."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Any], int]


@hookspec
def risoluto_cli_commands(kernel: Kernel) -> list[CliCommand]:
    """Contribute subcommands. Called once when the CLI starts; collected.

    Example::

        @hookimpl
        def risoluto_cli_commands():
            return [CliCommand(name="hello", help="say hello",
                               configure=lambda p: None, run=lambda args: print("hi") or 0)]
    """
