"""Slide readers: one factory, one interface, one backend per file.

>>> from marrowseg.io import open_slide
>>> reader = open_slide("slide.svs")            # doctest: +SKIP
>>> tile = reader.read_region(0, 0, 512, 512, mpp=0.5)  # doctest: +SKIP
"""

from marrowseg.io.base import SlideReader
from marrowseg.io.factory import open_slide

__all__ = ["open_slide", "SlideReader"]
