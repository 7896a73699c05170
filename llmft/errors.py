"""User errors: one base class, and the one function every entry point uses to print them.

A user mistake (a bad config key, a bad input file, a run directory that cannot be resumed, a missing extra) is a
`UserError`, or one of its subclasses that say which layer found it. Every `python -m llmft.X` turns it into one line
on stderr, `llmft: <sentence naming the key, file or line and the fix>`, and exit code 2; so does a file the user
may not read or write (PermissionError). Anything else is a bug in llmft and keeps its traceback. Output piped into
a command that stops reading (`| head`) ends the command quietly (`closed_pipe_ends_quietly`).

This module imports nothing of llmft: every layer, the login node's included, depends on it.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

USER_ERROR_EXIT_CODE = 2
BROKEN_PIPE_EXIT_CODE = 128 + 13  # as a process that SIGPIPE ended: the shell's code for "the reader went away"


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
    one line and exit code 2, and so does a file or folder the user cannot read or write (PermissionError, e.g. on a
    shared project space); output piped into a command that stops reading (`| head`) ends quietly
    (`closed_pipe_ends_quietly`); anything else (a bug in llmft) propagates with its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)

    def run() -> int:
        if help_text is not None and any(a in ("-h", "--help") for a in argv):
            print(help_text.strip())
            return 0
        try:
            return command(argv) or 0
        except UserError as error:
            return report(error)
        except PermissionError as error:
            return report(UserError(permission_denied(error)))

    return closed_pipe_ends_quietly(run)


def permission_denied(error: PermissionError) -> str:
    """The sentence for a file or folder this user may not read or write."""
    where = error.filename if error.filename is not None else "a file"
    return (f"{where}: permission denied (ask its owner to open it to you, e.g. chmod g+r, or copy it to a folder of "
            f"yours).")


def closed_pipe_ends_quietly(main: Callable[[], int | None]) -> int:
    """`main()`'s exit code, or BROKEN_PIPE_EXIT_CODE without a word when what reads its output stopped reading
    (`python -m llmft.data inspect ... | head`): Python would print a BrokenPipeError traceback, then "Exception
    ignored ... BrokenPipeError" when it flushes stdout on exit. Every entry point's main goes through this."""
    try:
        try:
            code = main()
        except SystemExit:
            sys.stdout.flush()  # what was printed before the exit reaches the pipe now, or fails here
            raise
        sys.stdout.flush()
        return code or 0
    except BrokenPipeError:
        try:  # stdout's buffer cannot be written: point stdout at /dev/null so Python's exit does not try again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # stdout is no file (a test's capture): nothing to redirect
            pass
        return BROKEN_PIPE_EXIT_CODE


def missing_extra(package: str, extra: str, what: str) -> UserError:
    """The error for an optional dependency that is not installed, naming the pip command that installs it."""
    return missing_extras([(package, extra, what)])


def missing_extras(needs: list[tuple[str, str, str]]) -> UserError:
    """One error for every optional dependency a command needs and lacks, so that one pip command installs them all:
    `needs` holds (package, extra, what needs it), e.g. ("deepspeed", "deepspeed", "parallelism=zero3")."""
    clauses = [f"{what} needs {package}" for package, _, what in needs]
    said = clauses[0] if len(clauses) == 1 else f"{', '.join(clauses[:-1])} and {clauses[-1]}"
    extras = ",".join(dict.fromkeys(extra for _, extra, _ in needs))
    return UserError(f"{said}, which {'is' if len(needs) == 1 else 'are'} not installed: pip install "
                     f"'llmft[{extras}]' (from a clone: pip install -e '.[{extras}]').")
