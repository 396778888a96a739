"""User-facing errors. Each message names the key or path, what was wrong and what is allowed.

The entry point prints these as one line instead of a traceback; invariants stay ``assert``s.
"""


class GantrainError(ValueError):
    """Base of every error caused by user input (config values, data, checkpoints)."""


class ConfigError(GantrainError):
    """A config value that is out of range or not one of the allowed choices."""
