"""The one runner of the ``moelpr`` commands: what turns a user's mistake into one line instead of a traceback.

A command module parses its arguments and calls the library; the library raises
:class:`~moelpr.errors.MoELPRUserError` for anything the user can fix. :func:`run_command` prints that error as
``moelpr <command>: error: <message>`` on stderr and returns its exit status; any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ..errors import MoELPRUserError


class UsageError(MoELPRUserError):
    """A mistake in the command line that argparse cannot see (a malformed NAME=PATH, a missing file...)."""


def run_command(
    name: str,
    parser: argparse.ArgumentParser,
    command: Callable[[argparse.Namespace], None],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` with ``parser`` (argparse exits with status 2 on a malformed command line) and run ``command``
    on the arguments: 0 when it returns, the error's exit status after one line on stderr when it raises a
    :class:`MoELPRUserError`."""
    args = parser.parse_args(argv)
    try:
        command(args)
    except MoELPRUserError as error:
        print(f"moelpr {name}: error: {error}", file=sys.stderr)
        return error.exit_status
    return 0
