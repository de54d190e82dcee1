"""Error types raised by Sonde.

Every user-facing failure is a :class:`SondeError` whose message says what was given, what is
allowed, and how to fix it. The CLI prints the message on one line and exits non-zero; the
dashboard shows it in an error box; Python callers can catch the subclass they care about.
"""

from __future__ import annotations

__all__ = [
    "SondeError",
    "ConfigError",
    "InputError",
    "ModelLoadError",
    "UnknownSiteError",
    "UnsupportedModelError",
    "DeviceError",
    "OutOfMemoryError",
    "SondeWarning",
]


class SondeError(Exception):
    """Base class of every error Sonde raises on purpose (bad input, missing model, ...)."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} {hint}")


class ConfigError(SondeError, ValueError):
    """An analysis or probe configuration value is out of range."""


class InputError(SondeError, ValueError):
    """A prompt, file or dataset line cannot be used (empty, too long, not UTF-8, malformed)."""


class ModelLoadError(SondeError):
    """A model name, path or file could not be resolved or loaded."""


class UnknownSiteError(SondeError, KeyError):
    """A hook name is not in Sonde's site vocabulary or does not exist in this model."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return Exception.__str__(self)


class UnsupportedModelError(SondeError):
    """The model's architecture lacks something an analysis needs."""


class DeviceError(SondeError):
    """The requested device is not available (e.g. `cuda` on a machine without a GPU)."""


class OutOfMemoryError(SondeError):
    """The run did not fit in memory; the message suggests a smaller batch or chunk."""


class SondeWarning(UserWarning):
    """Something was skipped or ignored but the run goes on (a malformed input line with
    ``on_error="skip"``, an unreadable result folder in a listing). The CLI prints each as one
    ``warning: ...`` line on stderr; Python callers can filter or record them as usual."""
