"""marrowseg: quantitative bone-marrow trephine analysis.

Cellularity from H&E, the erythroid left shift from E-cadherin IHC and the
reticulin fibrosis grade from Gomori silver stain, read tile by tile from
whole-slide images at a physical resolution (µm per pixel).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("marrowseg")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from marrowseg.errors import (  # noqa: E402
    ConfigError,
    MarrowsegError,
    MissingMppError,
    SlideError,
    UnsupportedFormatError,
)

__all__ = [
    "__version__",
    "MarrowsegError",
    "SlideError",
    "MissingMppError",
    "UnsupportedFormatError",
    "ConfigError",
]
