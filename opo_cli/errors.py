"""The one exception type for mistakes a user can fix: the CLI prints it as one line."""


class UserError(Exception):
    """A bad config value, a missing file, a folder that is not what it should be."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, else its type's name."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
