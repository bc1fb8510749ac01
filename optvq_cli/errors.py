"""One exception for a user's mistake. The CLI prints its message as one line and exits 1."""


class UserError(Exception):
    """Bad input from the user (a file, a flag, a missing download): message says what and how to fix."""
