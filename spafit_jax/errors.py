"""Exception types. Every message is one line: what is wrong, then how to fix it."""


class SpafitError(Exception):
    """Base class of every error this package raises on bad input."""


class ConfigError(SpafitError):
    """A config file, field or override is invalid; `field` names the field at fault, when known."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class DataError(SpafitError):
    """A dataset, file or row is unusable."""


class LoadError(SpafitError):
    """Pre-trained weights or a tokenizer cannot be loaded."""


class MaskingError(SpafitError):
    """A trainability plan does not fit the parameter tree."""


class CheckpointError(SpafitError):
    """A checkpoint cannot be written or does not fit this run."""
