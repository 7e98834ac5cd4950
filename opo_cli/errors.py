"""The one exception type for mistakes a user can fix: the CLI prints it as one line."""


class UserError(Exception):
    """A bad config value, a missing file, a folder that is not what it should be."""
