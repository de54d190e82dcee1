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
    "check_input_file",
    "user_file",
    "is_file_error",
    "from_file_library",
    "reason",
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


# ----------------------------------------------------------------------------- files the user gives
def _kind(mode: int) -> str:
    import stat

    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_input_file(path, what: str = "file", *, hint: str | None = None, allow_empty: bool = False,
                     error: type[SondeError] | None = None):
    """The path of a file the user gave to read, as a :class:`pathlib.Path`, once it is known to be a regular,
    readable file (and not empty unless ``allow_empty``). Otherwise one :class:`InputError` (or ``error``) saying
    what the path is instead: missing, a folder, a FIFO or a device (``/dev/null``), unreadable, or empty."""
    import os
    import stat
    from pathlib import Path

    err = error or InputError
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise err(f"{what} {str(p)!r} does not exist.", hint=hint) from None
    except NotADirectoryError:
        raise err(f"{what} {str(p)!r} does not exist (a part of its path is a file, not a folder).", hint=hint) from None
    except (OSError, ValueError) as e:  # permission, a name too long, an embedded NUL
        raise err(f"cannot read {what} {str(p)!r} ({getattr(e, 'strerror', None) or e}).", hint=hint) from None
    if not stat.S_ISREG(st.st_mode):
        raise err(f"{what} {str(p)!r} is {_kind(st.st_mode)}, not a regular file.", hint=hint)
    if not os.access(p, os.R_OK):
        raise err(f"cannot read {what} {str(p)!r} (permission denied).", hint=hint)
    if not allow_empty and st.st_size == 0:
        raise err(f"{what} {str(p)!r} is empty.", hint=hint)
    return p


#: Packages whose exceptions mean "this file is not what it claims to be" (safetensors, Parquet, GGUF readers).
_FILE_LIBRARIES = ("safetensors", "pyarrow", "gguf")


def from_file_library(exc: BaseException) -> bool:
    """Whether ``exc`` is one of the file readers' own exception types (``SafetensorError``, ``ArrowInvalid``...)."""
    return any(c.__module__.split(".")[0] in _FILE_LIBRARIES for c in type(exc).__mro__)


def is_file_error(exc: BaseException) -> bool:
    """Whether ``exc`` is what reading or writing a damaged, truncated or foreign file raises: an OS error (a full
    disk, a vanished file), a decoding error, or a file reader's own exception type."""
    import struct

    if isinstance(exc, SondeError):
        return False
    return isinstance(exc, (OSError, ValueError, EOFError, struct.error)) or from_file_library(exc)


def reason(exc: BaseException, limit: int = 240) -> str:
    """One line about ``exc``: the OS reason (``No space left on device``) or the library's first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split()) or type(exc).__name__
    if from_file_library(exc) or not isinstance(exc, (OSError, ValueError)):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class user_file:
    """``with user_file(path, "matrix file"): load(path)``: the errors a file library raises on a damaged or
    foreign file (and OS errors: a full disk, a vanished file) become one :class:`InputError` (or ``error``)
    naming the file; anything else (a bug) passes through unchanged.

    ``action`` is the verb of the message (``read`` or ``write``); ``also`` adds exception types to convert
    (e.g. ``RuntimeError`` around a loader known to raise it for bad files).
    """

    def __init__(self, path, what: str = "file", *, action: str = "read", hint: str | None = None,
                 error: type[SondeError] = InputError, also: tuple[type[BaseException], ...] = ()):
        self.path, self.what, self.action, self.hint, self.error, self.also = path, what, action, hint, error, also

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or isinstance(exc, SondeError) or not isinstance(exc, Exception):
            return False
        if not (is_file_error(exc) or isinstance(exc, self.also)):
            return False
        why = reason(exc).rstrip(".")
        raise self.error(f"cannot {self.action} {self.what} {str(self.path)!r}: {why}.", hint=self.hint) from exc
