"""One exception type for user errors: the CLI prints it as one line, without a traceback."""


class PodError(ValueError):
    """Bad input that the user can fix: the message names the field or path and what to do."""
