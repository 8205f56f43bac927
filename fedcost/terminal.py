"""What the `fedcost` commands show on the terminal: errors, lines and progress.

A user's own mistake (a ``FedcostError``) is a line per problem naming the file, field or
argument, exit code 2, no traceback. Anything else is fedcost's fault: one short line, exit
code 1, and the traceback (never its local variables, which hold patient rows and keys)
goes to a log file whose path is printed. Light on purpose: rich and typer only, so that
`fedcost --help` and a config error answer in well under two seconds.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fedcost.errors import FedcostError

console = Console(emoji=False)
USER_ERROR, INTERNAL_ERROR = 2, 1


def say(line: str) -> None:
    """A line of plain text: messages name TOML tables such as [nodes.st-mary], never markup."""
    console.print(escape(line), soft_wrap=True, highlight=False)


def fail(error: FedcostError) -> typer.Exit:
    """Print a user's mistake, one line per problem and its notes, and give the exit to raise."""
    for line in str(error).splitlines():
        console.print(f"[red]error:[/red] {escape(line)}", soft_wrap=True, highlight=False)
    for note in getattr(error, "__notes__", ()):
        say(note)
    return typer.Exit(code=USER_ERROR)


def log_unexpected(error: BaseException) -> Path:
    """Write ``error``'s traceback, without local variables, to a new file only the user can read."""
    handle, name = tempfile.mkstemp(prefix="fedcost-error-", suffix=".log")
    with os.fdopen(handle, "w", encoding="utf-8") as log:
        log.write(f"fedcost {' '.join(sys.argv[1:])}\n")
        log.write("".join(traceback.format_exception(error)))
    return Path(name)


class PoliteTyper(typer.Typer):
    """The top-level app: a user's mistake that no command caught is one line and exit code
    2; an unexpected error is one line, exit code 1 and a log file (never rich's traceback,
    which would print local variables)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return typer.main.get_command(self)(*args, **kwargs)
        except FedcostError as error:
            fail(error)
            sys.exit(USER_ERROR)
        except Exception as error:
            log = log_unexpected(error)
            say(
                f"fedcost stopped on an unexpected error ({type(error).__name__}); this is a bug, not your "
                f"mistake: please report it with the traceback in {log}"
            )
            sys.exit(INTERNAL_ERROR)


class RoundProgress:
    """A progress bar over federated rounds, shown once the data has passed its checks, then
    the stages after the last round (baselines, site steps, the report): the bar's text says
    what is under way and its clock keeps running, so the terminal never sits still."""

    def __init__(self, rounds: int):
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]federated rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
        )
        self.task = self.progress.add_task("starting nodes…", total=rounds)

    def __enter__(self) -> RoundProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def start(self) -> None:
        self.progress.start()

    def advance(self, record: dict) -> None:
        self.progress.update(self.task, advance=1, description=round_text(record))

    def stage(self, text: str) -> None:
        """What is under way between rounds or after the last one."""
        self.progress.update(self.task, description=escape(text))

    def say(self, line: str) -> None:
        """A line above the bar."""
        self.progress.console.print(escape(line), soft_wrap=True, highlight=False)


def round_text(record: dict) -> str:
    """A round's federated scores, as the bar shows them."""
    parts = []
    if "readmission_auroc" in record:
        parts.append(f"AUROC {record['readmission_auroc']:.3f}")
    if "cost_r2" in record and not math.isnan(record["cost_r2"]):
        parts.append(f"cost R² {record['cost_r2']:.3f}")
    return "  ".join(parts)
