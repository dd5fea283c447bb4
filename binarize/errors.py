"""The exceptions binarize raises for problems a user can fix.

Every error that comes from bad input (an unknown model name, weights that do not fit, a
misspelt recipe key, missing data) is a :class:`BinarizeError`. Its message is one line that
says what is wrong and how to fix it; the command-line interface prints exactly that line and
exits non-zero. Programming errors inside the library stay ordinary Python exceptions.
"""

from __future__ import annotations

__all__ = [
    "BinarizeError",
    "ConfigError",
    "DataError",
    "FileFormatError",
    "ModelSpecError",
    "TrainingError",
    "TrainingInterrupted",
    "WeightsError",
]


class BinarizeError(Exception):
    """Base class of the errors a user can act on.

    Attributes:
        exit_code: The exit status the command line uses for this error.
    """

    exit_code = 2


class ConfigError(BinarizeError, ValueError):
    """A configuration value (Policy, recipe, option) is invalid."""


class ModelSpecError(BinarizeError):
    """A model specification cannot be resolved to a model."""


class WeightsError(BinarizeError):
    """A weights file cannot be read or does not fit the model."""


class FileFormatError(BinarizeError):
    """A binarize model file is missing, corrupt or of an unknown version."""


class DataError(BinarizeError):
    """A dataset is missing, empty or unreadable."""


class TrainingError(BinarizeError):
    """Training stopped for a reason the user must look at (e.g. a non-finite loss)."""


class TrainingInterrupted(TrainingError):
    """Training was interrupted (Ctrl-C); what was saved is in the message."""

    exit_code = 130
