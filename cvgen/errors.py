"""Errors that are the user's to fix: the CLI prints their message, not a traceback."""


class CVGenError(Exception):
    """A problem with the user's input, files or configuration; the message says which."""
