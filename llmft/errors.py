"""User errors: one base class, and the one function every entry point uses to print them.

A user mistake (a bad config key, a bad input file, a run directory that cannot be resumed, a missing extra) is a
`UserError`, or one of its subclasses that say which layer found it. Every `python -m llmft.X` turns it into one line
on stderr, `llmft: <sentence naming the key, file or line and the fix>`, and exit code 2. Anything else is a bug in
llmft and keeps its traceback.

This module imports nothing: every layer, the login node's included, depends on it.
"""

from __future__ import annotations

import sys
from typing import Callable

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake the user can fix: printed as one sentence, never with a traceback."""


class ConfigError(UserError):
    """A configuration the schema or the validation refuses."""


def report(error: UserError) -> int:
    """Print a user error as one line on stderr; the exit code for it."""
    print(f"llmft: {error}", file=sys.stderr)
    return USER_ERROR_EXIT_CODE


def run_command(command: Callable[[list[str]], int | None], argv: list[str] | None = None,
                help_text: str | None = None) -> int:
    """Run a command on its arguments (sys.argv's by default): `-h` / `--help` prints `help_text`; a UserError becomes
    one line and exit code 2; anything else (a bug in llmft) propagates with its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if help_text is not None and any(a in ("-h", "--help") for a in argv):
        print(help_text.strip())
        return 0
    try:
        return command(argv) or 0
    except UserError as error:
        return report(error)


def missing_extra(package: str, extra: str, what: str) -> UserError:
    """The error for an optional dependency that is not installed, naming the pip command that installs it."""
    return UserError(f"{what} needs {package}, which is not installed: pip install 'llmft[{extra}]' "
                     f"(from a clone: pip install -e '.[{extra}]').")
