"""Exception types. Every message is one line: what is wrong, then how to fix it.

`SpafitError` is the base of them all (the commands catch it and print its line). The two raised
for a bad value the caller passed, `ConfigError` (a config field, a LoRA argument) and
`MaskingError` (a trainability plan or its arguments), are also `ValueError`s, so library users can
catch them as Python's own; the others are about files and state, not argument values.
"""


class SpafitError(Exception):
    """Base class of every error this package raises on bad input."""


class ConfigError(SpafitError, ValueError):
    """A config file, field or override is invalid; `field` names the field at fault, when known."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class DataError(SpafitError):
    """A dataset, file or row is unusable."""


class LoadError(SpafitError):
    """Pre-trained weights or a tokenizer cannot be loaded."""


class MaskingError(SpafitError, ValueError):
    """A trainability plan does not fit the parameter tree."""


class CheckpointError(SpafitError):
    """A checkpoint cannot be written or does not fit this run."""
