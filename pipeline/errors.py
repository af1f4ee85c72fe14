"""The one exception type for mistakes a user can cause: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input, a missing file, a wrong combination: shown to the user as `error: <message>`."""
