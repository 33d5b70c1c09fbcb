"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


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
        parts = [p for p in (self.where, self.key, self.message) if p]
        return "error: " + ": ".join(parts)


class RecipeError(UserError):
    """A recipe value is unknown, missing, of the wrong type or out of range."""


class DataError(UserError):
    """A data record or data file is malformed."""


class TrainingStopped(UserError):
    """Training stopped on a guard (non-finite loss/gradient); the message names step and quantity."""


class Interrupted(Exception):
    """Ctrl-C during training: a checkpoint was saved; the CLI says how to resume (exit 130)."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)
