"""The one exception base the CLI turns into a clean error message instead of a traceback."""


class ClipidError(Exception):
    """Bad input or configuration that the user can fix; the message says what and where."""
