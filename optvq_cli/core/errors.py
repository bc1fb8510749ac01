"""Errors. Library code raises ordinary exceptions (ValueError, FileNotFoundError, OSError and
their subclasses) whose message is one line naming the file or flag and the fix; the CLI prints it."""


class UserError(ValueError):
    """Bad input (a file, a flag, a missing download). A ValueError, so library callers catch it as one."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty): for one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
