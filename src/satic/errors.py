"""One exception type for problems a user can fix; the CLI prints it and exits non-zero."""


class SaticError(Exception):
    """A user-facing error: the message names the file or option and how to fix it."""
