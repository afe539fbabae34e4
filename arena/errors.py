"""Errors a user can fix. The CLI prints them as one line and exits with status 2, never a traceback."""


class ArenaError(Exception):
    """Bad input: a config key, a file, a component name. The message names it and says what was expected."""


class ConfigError(ArenaError):
    """A config value or key is wrong. `path` is the full dotted key."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.detail = message
        super().__init__(f"{path}: {message}" if path else message)


class ArenaWarning(UserWarning):
    """Something the user should know that does not stop the run: printed as one line `arena: warning: ...`."""
