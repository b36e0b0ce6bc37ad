"""User mistakes and how every command-line tool reports them.

A mistake of the user's (a bad recipe, a malformed data record, a missing image or checkpoint, an unknown
benchmark name, a bad command-line value) raises ``UserError`` with a message that names the file and the
record. Every CLI's entry point is wrapped in ``run_cli``: a UserError prints one line ``error: ...`` on
stderr and exits with status 2, with no traceback unless ``--debug`` is on the command line or
``VLRECIPE_DEBUG=1`` is set. Anything else is a bug of ours and keeps its traceback. CLIs parse their
arguments with this module's ``ArgumentParser``, so a bad argument is reported the same way (usage, then the
``error:`` line, status 2).

It lives in ``models`` because that is the lowest package: data, train and eval_mm all import it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

EXIT_USER_ERROR = 2
# How torch's DataLoader re-raises an exception from a worker: the type is kept, the message becomes
# "Caught <Type> in DataLoader worker process N.\nOriginal Traceback (most recent call last):\n...".
_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"


class UserError(ValueError):
    """A mistake in the user's input; the message names the file and the record (or key)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (data, image, checkpoint, tokenizer) does not exist."""


def debug_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get("VLRECIPE_DEBUG", "") not in ("", "0")


def user_message(error: BaseException) -> str:
    """The one line printed for a user error: the message of the original exception (also when a DataLoader
    worker raised it and the main process re-raised it with the worker's traceback), on one line."""
    # args[0], not str(): a KeyError's str() is the repr of its message (quoted, newlines escaped)
    one_string = len(error.args) == 1 and isinstance(error.args[0], str)
    message = (error.args[0] if one_string else str(error)) or type(error).__name__
    if _WORKER_TRACEBACK in message:
        # The traceback text ends with "<module>.<Type>: <original message>"; keep the original message.
        marker = f"{type(error).__module__}.{type(error).__qualname__}: "
        cut = message.rfind(marker)
        message = (message[cut + len(marker) :] if cut >= 0 else message.rstrip().rsplit("\n", 1)[-1]).strip()
        if isinstance(error, KeyError) and message[:1] in ("'", '"') and message[-1:] == message[:1]:
            message = message[1:-1]  # the traceback shows a KeyError's message as its repr
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def run_cli(main: Callable[[], int | None], user_errors: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """Run a CLI's ``main()`` and exit with its status. ``--debug`` is removed from ``sys.argv`` before
    ``main`` parses it. ``user_errors`` adds exception types that count as the user's mistake for this tool
    (besides ``UserError``).

    Under torchrun every rank that meets the mistake prints its line and exits with status 2 (the launcher
    then stops the other ranks, so none waits in a collective)."""
    debug = debug_requested()
    sys.argv = [a for a in sys.argv if a != "--debug"]
    try:
        status = main()
    except (UserError, *user_errors) as e:
        if debug:
            raise
        # One write call, so that under torchrun two ranks' lines never interleave on the shared pipe
        # (print writes the text and its newline separately).
        sys.stderr.write(f"error: {user_message(e)}\n")
        sys.stderr.flush()
        sys.exit(EXIT_USER_ERROR)
    sys.exit(status or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line raises UserError (printed by run_cli as ``error: ...``, status 2)
    after printing the usage, instead of argparse's own ``prog: error: ...`` exit.

    ``examples``: command lines shown at the end of ``--help``, each after the parser's ``prog``, so that
    ``vlrecipe train --help`` and ``python -m train --help`` each show the command the user typed."""

    def __init__(self, *args, examples: Sequence[str] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.examples = tuple(examples)

    def format_help(self) -> str:
        # Not argparse's epilog: its formatter re-wraps an epilog, which would break a command across lines.
        if not self.examples:
            return super().format_help()
        lines = [f"  {self.prog} {example}".rstrip() for example in self.examples]
        heading = "example:" if len(lines) == 1 else "examples:"
        return super().format_help() + "\n".join(["", heading, *lines]) + "\n"

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UserError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value
