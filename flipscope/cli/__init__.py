"""The `flipscope` command: one module per command group, one error policy (`cli.common`)."""

from __future__ import annotations

import sys

import typer

from flipscope.cli import (  # noqa: F401 - registers the commands
    analysis,
    compare,
    dashboard,
    data,
    evaluation,
    evidence,
    guard,
    mitigate,
    organism,
    patching,
    sae,
    upstream,
)
from flipscope.cli.common import app

__all__ = ["app", "main"]

ORDER = (
    "families",
    "hooks",
    "convert",
    "evaluate",
    "import_answers",
    "summarize",
    "merge",
    "repair",
    "export",
    "curate",
    "discover",
    "dashboard",
    "patch",
    "trace",
    "lens",
    "evidence",
    "clamp",
    "compare",
    "demo",
)  # the order of the pipeline
app.registered_commands.sort(key=lambda info: ORDER.index(info.callback.__name__))


def main() -> None:
    """The `flipscope` command: usage errors (a missing or malformed option, a path that does not
    exist) come out as one line that names the problem and the help to read, never a traceback."""
    from typer._click import exceptions as usage  # typer 0.29 raises its vendored click's errors

    try:
        code = app(standalone_mode=False)
    except usage.NoArgsIsHelpError:  # the help is already printed
        code = 0
    except usage.UsageError as err:
        where = err.ctx.command_path if err.ctx else "flipscope"
        typer.echo(f"error: {err.format_message()} (see `{where} --help`)", err=True)
        code = err.exit_code
    except usage.ClickException as err:
        typer.echo(f"error: {err.format_message()}", err=True)
        code = err.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
