"""The one base of every error that a user's input can cause (a bad path, option, checkpoint or environment).

The command-line runner (``moelpr.cli.runner``) prints such an error as one line and exits non-zero; anything else
is a bug and keeps its traceback. It sits at the bottom of the package so that every layer can raise it.
"""

from __future__ import annotations


class MoELPRUserError(Exception):
    """An error the user can fix: its message is the whole explanation, shown without a traceback."""

    # What the command exits with: 2 for a request it cannot serve (as argparse does for a bad command line),
    # 1 for a problem found in the data once the work has begun.
    exit_status = 2
