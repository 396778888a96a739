"""User-facing errors. Each message names the key or path, what was wrong and what is allowed.

The entry point prints these as one line instead of a traceback; invariants stay ``assert``s. :mod:`gantrain.checks`
raises them; :meth:`ConfigError.within` puts the config path of the node that built the object in front.
"""

from __future__ import annotations


class GantrainError(ValueError):
    """Base of every error caused by user input (config values, data, checkpoints)."""


class ConfigError(GantrainError):
    """A config value that is out of range or not one of the allowed choices. ``key``: the argument the message starts
    with, relative to the raising object (None: it names a file, say)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key

    def within(self, node: str) -> "ConfigError":
        """The same error with ``node.`` in front of its key (``weight=...`` -> ``loss.gp.weight=...``);
        unchanged when it has no relative key or already names ``node``."""
        if not node or self.key is None or self.key.startswith(f"{node}."):
            return self
        return type(self)(f"{node}.{self}", key=f"{node}.{self.key}")


class NonFiniteError(GantrainError):
    """Training produced a NaN or an infinity (a loss term, a gradient norm, a weight or a buffer that
    would be checkpointed): one line naming the step, the phase and the value, and what to change."""


class CheckpointError(GantrainError):
    """A checkpoint that cannot be used for what was asked (missing, corrupt, or from another model)."""
