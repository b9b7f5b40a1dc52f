"""Is a JPEG stream whole? libjpeg decodes one cut short without an error.

libjpeg(-turbo), through imagecodecs and tifffile, answers a stream that stops in the middle
of its image data with a warning ("Premature end of JPEG file") that no caller sees, and fills
the rows it never got with mid-grey (128, 128, 128). An H&E analysis takes that grey for
tissue: a JPEG field cut short by an interrupted download, or one short tile of a slide, would
be measured as haematopoietic tissue without a word. So every JPEG stream is checked for its
end-of-image marker before it is decoded.
"""

from __future__ import annotations

__all__ = ["jpeg_problem"]

_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"
_SOS = 0xDA
# markers without a length field: TEM, RST0-7 (SOI and EOI are handled on their own)
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def _first_scan(data: bytes) -> int:
    """Offset of the first start-of-scan marker, walking the header segments by their lengths.

    Walking (rather than searching for the bytes FF DA) steps over an EXIF thumbnail, itself a
    whole JPEG stream inside an APP1 segment. -1 when the header ends first or is malformed.
    """
    pos, n = 2, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return -1
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == _SOS:
            return pos
        elif marker in _STANDALONE:
            pos += 2
        elif marker == 0xD9:  # end of image before any scan: a tables-only stream
            return -1
        else:
            if pos + 3 >= n:
                return -1
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return -1


def jpeg_problem(data: bytes) -> str | None:
    """Why ``data`` is not a whole JPEG stream, or None when it is.

    Parameters
    ----------
    data : bytes
        One JPEG stream: a ``.jpg`` file, or one tile or strip of a JPEG-compressed TIFF
        (an abbreviated stream whose tables are in the JPEGTables tag is checked the same way).

    Returns
    -------
    problem : str or None
        ``'no start-of-image marker'``, ``'no image data'`` (the header never reaches a scan)
        or ``'no end-of-image marker (cut short)'``; None for a whole stream.

    Notes
    -----
    The entropy-coded data that follows a start-of-scan marker never holds the bytes FF D9
    (a 0xFF data byte is followed by a stuffed 00), so a stream is whole when an end-of-image
    marker follows its first scan. Bytes after that marker (padding, appended metadata) are
    allowed, as libjpeg allows them.
    """
    if not data.startswith(_SOI):
        return "no start-of-image marker"
    scan = _first_scan(data)
    if scan < 0:
        return "no image data"
    if data.find(_EOI, scan + 2) < 0:
        return "no end-of-image marker (cut short)"
    return None
