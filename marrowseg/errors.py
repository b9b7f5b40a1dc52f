"""The exception tree: everything a user can fix derives from :class:`MarrowsegError`.

Each class also derives from the matching builtin so that generic handlers
(``except OSError``, ``except ValueError``) still catch it.
"""

from __future__ import annotations

__all__ = [
    "MarrowsegError",
    "SlideError",
    "SlideReadError",
    "UnsupportedFormatError",
    "MissingMppError",
    "ConfigError",
    "NoTissueError",
    "AnalysisError",
]


class MarrowsegError(Exception):
    """Anything the user can fix: a file, a flag, a config."""


class SlideError(MarrowsegError, OSError):
    """A slide cannot be opened or read; the message names the file and the reason."""


# Alias kept for readability at call sites that read a region rather than open a file.
SlideReadError = SlideError


class UnsupportedFormatError(SlideError):
    """The file is not an image format any installed backend can read."""


class MissingMppError(SlideError):
    """The slide carries no pixel size and none was given (``--mpp``)."""


class ConfigError(MarrowsegError, ValueError):
    """A configuration file, key or override is invalid; the message names the key."""


class NoTissueError(MarrowsegError, ValueError):
    """Tissue detection found nothing to analyse on a slide."""


class AnalysisError(MarrowsegError, RuntimeError):
    """An analysis could not produce a result (e.g. every tile failed)."""
