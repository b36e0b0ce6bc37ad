"""User mistakes and how every command-line tool reports them.

A mistake of the user's (a bad recipe, a malformed data record, a missing image or checkpoint, an unknown
benchmark name) raises ``UserError`` with a message that names the file and the record. Every CLI's entry
point is wrapped in ``run_cli``: a UserError prints one line ``error: ...`` on stderr and exits with status 2,
with no traceback unless ``--debug`` is on the command line or ``VLRECIPE_DEBUG=1`` is set. Anything else is a
bug of ours and keeps its traceback.

It lives in ``models`` because that is the lowest package: data, train and eval_mm all import it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A mistake in the user's input; the message names the file and the record (or key)."""


def debug_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get("VLRECIPE_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[], int | None], user_errors: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """Run a CLI's ``main()`` and exit with its status. ``--debug`` is removed from ``sys.argv`` before
    ``main`` parses it. ``user_errors`` adds exception types that count as the user's mistake for this tool
    (besides ``UserError``)."""
    debug = debug_requested()
    sys.argv = [a for a in sys.argv if a != "--debug"]
    try:
        status = main()
    except (UserError, *user_errors) as e:
        if debug:
            raise
        message = str(e) or type(e).__name__
        if isinstance(e, KeyError) and message.startswith(("'", '"')):
            message = message[1:-1]  # KeyError quotes its message
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(status or 0)
