"""The terminal face shared by the commands: one stderr console, and user errors as messages.

Bad input ends a command with its message and exit code 2, never a traceback: every error the
library raises for something the user gave (a ValueError, KeyError, RuntimeError or OSError
subclass, with a message naming the problem) passes through `friendly_errors`."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, soft_wrap=True)  # soft wrap: one line per event in a pipe or log file

USER_ERRORS = (ValueError, KeyError, RuntimeError, OSError)
MAX_MESSAGE = 2000  # an error about a 50 KB expression need not print it whole


def message(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    text = str(text)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def friendly_errors(fn):
    """Bad input ends the command with its message and exit code 2, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            console.print(f"[bold red]error:[/] {escape(message(e))}", highlight=False)
            raise typer.Exit(2) from None
    return wrapper


def plain_when_piped() -> None:
    """Not a terminal (CI, | tee, nohup): transformers' progress bars redraw with carriage
    returns, which a log file shows as one line of many events — turn them off there."""
    if not sys.stderr.isatty():
        # transformers takes seconds to import: only a command that runs loads it (--help stays fast)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def log(msg: str) -> None:
    console.print(msg, markup=False, highlight=False)
