"""Project error types.

A message is shown to the user as-is, so it names the file or field, says what is wrong and how to
get out of it. Callers (CLI, UI) catch `LoraStudioError` and print the message without a traceback.
"""

from collections.abc import Sequence


class LoraStudioError(Exception):
    """Base class for errors whose message is meant for the user."""


class ConfigError(LoraStudioError):
    """A config, preset or override is invalid. `problems` holds one line per problem."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems)


class DatasetError(LoraStudioError):
    """No usable training images (missing folder, empty folder, every file skipped)."""


class ModelError(LoraStudioError):
    """A base model cannot be found, downloaded or recognised."""


class AdapterError(LoraStudioError):
    """An adapter file is unreadable, of an unknown layout or for another architecture."""


class TrainingError(LoraStudioError):
    """Training cannot start or continue (out of memory, non-finite loss, bad resume state)."""
