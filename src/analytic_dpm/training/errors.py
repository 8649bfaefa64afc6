"""Errors of the training half that the command line reports without a traceback."""


class ConfigError(ValueError):
    """A setting of the run config is wrong; the message says which and how to fix it."""
