"""One exception type for problems a user can fix; the CLI prints it and exits non-zero."""


class SaticError(Exception):
    """A user-facing error: the message names the file or option and how to fix it."""


def first_few(items, shown: int = 3, sep: str = ", ") -> str:
    """The first `shown` of `items` joined by `sep`, then how many more there are ("a, b, c and 4 more")."""
    items = [str(item) for item in items]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(items[:shown]) + more
