"""Errors the converter reports to the user (``main`` prints them without a traceback)."""


class PrepareError(Exception):
    """A problem with the input, the output directory or the command line; the message
    says where (file, line, field or flag) and what was expected."""


class BadLineError(PrepareError):
    """A malformed input line under ``--on-bad-line error``."""
