"""The one exception type for mistakes a user can cause: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input, a missing file, a wrong combination: shown to the user as `error: <message>`."""

    exit_code = 2


class Interrupted(UserError):
    """Stopped by Ctrl-C or SIGTERM after saving what was done: `stopped: <message>`, exit 130 (as a shell's)."""

    exit_code = 130
