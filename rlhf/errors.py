"""Errors a user can cause (the CLI prints them as one line and exits with code 2), and the one-line forms
of warnings and of any other exception."""

import os
import sys


class UserError(Exception):
    """Bad input from the user: a recipe key, a data record, a path. Printed as one line, exit 2.

    `where` is the file (optionally `file:line`), `key` the dotted recipe key or record field.
    """

    def __init__(self, message: str, where: str | None = None, key: str | None = None):
        self.message = message
        self.where = where
        self.key = key
        super().__init__(self.line())

    def line(self) -> str:
        # never a screenful: whatever a bad value holds, each part is cut to a short excerpt
        parts = [_cut(p, limit) for p, limit in ((self.where, 300), (self.key, 200), (self.message, 800)) if p]
        return "error: " + ": ".join(parts)


def _cut(text: str, limit: int) -> str:
    text = " ".join(str(text).split("\n"))
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class RecipeError(UserError):
    """A recipe value is unknown, missing, of the wrong type or out of range."""


class DataError(UserError):
    """A data record or data file is malformed."""


class TrainingStopped(UserError):
    """Training stopped on a guard (non-finite loss/gradient); the message names step and quantity."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during training: a checkpoint was saved; the CLI says how to resume and exits
    with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM). `runtime.Interrupt` fills `signum`."""

    def __init__(self, message: str, signum: int | None = None):
        self.message = message
        self.signum = signum
        super().__init__(message)


def warn(message: str) -> None:
    """One warning line on stderr, from the main process only (RANK unset or 0)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr)


def describe(err: BaseException) -> str:
    """An exception as one short line: a UserError's own line, else its type and first line of text
    (an OSError with the file it is about)."""
    if isinstance(err, UserError):
        return err.line().removeprefix("error: ")
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = (str(err).strip().splitlines() or [""])[0]
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
