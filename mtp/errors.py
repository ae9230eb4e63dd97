"""Errors whose message tells the user what to fix; run.py prints them without a traceback."""


class ConfigError(ValueError):
    """A job's settings are invalid; the message says which and what is allowed."""
