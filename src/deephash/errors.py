"""Errors a user can cause. Each carries a one-line message that names the problem."""

from __future__ import annotations


class DeephashError(ValueError):
    """Base class for every error deephash raises because of bad input."""


class DataFormatError(DeephashError):
    """A file is corrupt, truncated, of the wrong format, or hostile."""


class ConfigError(DeephashError):
    """A configuration is unreadable, has an unknown key or a value of the wrong type."""


class CodeLengthError(DeephashError):
    """Hash codes of one length were given where another length is expected."""


class NotFoundError(DeephashError):
    """A file, run directory, index or data set does not exist."""


class TrainingDiverged(DeephashError):
    """A loss or gradient became NaN or infinite during training."""


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of an error's message, or its type's name when it has none.

    Library errors (a corrupt zip, a bad tensor) can carry multi-line messages; deephash's own
    errors and the command line show one line.
    """
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if isinstance(error, BaseException) else ""
