"""One exception for a user's mistake. The CLI prints its message as one line and exits 1."""


class UserError(Exception):
    """Bad input from the user (a file, a flag, a missing download): message says what and how to fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty): for one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
