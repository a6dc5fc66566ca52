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


#: Exit status of a usage or data error: bad input, a config error, a missing or unreadable file.
EXIT_USAGE = 2
#: Exit status of anything else: a bug in deephash (or a library under it).
EXIT_INTERNAL = 1


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` comes from what the user gave (exit status 2), not from a bug (1).

    User errors: :class:`DeephashError` and its subclasses; ``OSError`` (a missing, unreadable or
    unwritable file, a permission denied, a full disk); a TOML or UTF-8 decoding error.
    """
    import tomllib

    return isinstance(error, (DeephashError, OSError, tomllib.TOMLDecodeError, UnicodeDecodeError))


def failure_line(error: BaseException, prog: str = "deephash") -> tuple[int, str]:
    """The exit status and the one line a command line prints for an error that reached it.

    A user error names the problem (a file error: ``PATH: reason``); anything else is an internal
    error whose line names the exception and asks for a report with the ``--debug`` traceback.
    """
    if isinstance(error, OSError) and not isinstance(error, DeephashError) and error.filename is not None:
        return EXIT_USAGE, f"{prog}: error: {error.filename}: {error.strerror or first_line(error)}"
    if is_user_error(error):
        import tomllib

        text = first_line(error) or "unknown error"
        if isinstance(error, tomllib.TOMLDecodeError):
            text = f"not valid TOML: {text}"
        return EXIT_USAGE, f"{prog}: error: {text}"
    return EXIT_INTERNAL, (f"{prog}: internal error: {type(error).__name__}: {first_line(error)} "
                           f"(a bug: please report it with the output of the same command under --debug)")
