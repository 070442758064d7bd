"""Exception types with messages that name the culprit (file, line, key or value)."""

from __future__ import annotations


class MlicError(Exception):
    """Base class of every error mlic raises on purpose; the message is one line for the user."""


class ConfigError(MlicError):
    """A config key or value is unknown or invalid."""


class DataError(MlicError):
    """A dataset folder, annotation file or image is missing or malformed."""


class CheckpointError(MlicError):
    """A checkpoint or resume file is missing, untrusted, or does not match its model."""


class WriteError(MlicError):
    """A file mlic writes could not be written (disk full, permission); the previous one is kept."""


class RunBusyError(MlicError):
    """A run folder is being written by another mlic process (its lock is held)."""
