"""The one exception type that command-line tools turn into a single clear line."""


class UsageError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""
