"""The files a slide is made of, their stamp and their checksum.

Most slides are one file. A DICOM whole-slide image is a folder of ``.dcm`` files (one per
level, plus label and overview), and a MIRAX ``.mrxs`` is an index beside a folder of the same
stem that holds the pixels. The reader's "changed on disk" check, the input's SHA-256 in
``metrics.json`` and the batch's resume test must all look at the same files, or a DICOM folder
reads as changed the moment a worker reopens it, and a MIRAX slide's checksum names its index,
not its pixels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["dicom_files", "slide_files", "files_stamp", "files_sha256", "files_size"]

_HASH_CHUNK_BYTES = 2**20


def dicom_files(folder: Path) -> list[Path]:
    """The ``.dcm`` files directly in ``folder``, sorted by name (empty when there are none)."""
    try:
        return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
    except OSError:
        return []


def slide_files(path: str | Path) -> list[Path]:
    """Every file whose bytes make up the slide at ``path``, in a fixed order.

    Parameters
    ----------
    path : str or Path
        A slide file, a DICOM folder (or one ``.dcm`` file of it), or a MIRAX ``.mrxs`` index.

    Returns
    -------
    files : list of Path
        ``[path]`` for a one-file slide; the sorted ``.dcm`` files of a DICOM folder (OpenSlide,
        given one of them, reads the series from the folder); the ``.mrxs`` index followed by
        the sorted files of its data folder (``<stem>/``).
    """
    path = Path(path)
    if path.is_dir():
        return dicom_files(path)
    if path.suffix.lower() == ".dcm":
        return dicom_files(path.parent) or [path]
    if path.suffix.lower() == ".mrxs":
        data = path.with_suffix("")
        if data.is_dir():
            return [path, *sorted(p for p in data.iterdir() if p.is_file())]
    return [path]


def files_stamp(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """(name, size in bytes, mtime in ns) of each file: what a reopen compares.

    Raises
    ------
    OSError
        A file can no longer be read (removed, permissions).
    """
    out = []
    for f in files:
        st = f.stat()
        out.append((f.name, int(st.st_size), int(st.st_mtime_ns)))
    return tuple(out)


def files_size(files: list[Path]) -> int:
    """Total size of ``files`` in bytes."""
    return sum(int(f.stat().st_size) for f in files)


def files_sha256(files: list[Path]) -> str:
    """SHA-256 of a slide's bytes, hex.

    One file: the SHA-256 of its content (as ``sha256sum`` prints it). Several: of each file's
    name (UTF-8, NUL-terminated) followed by its content, in the given order, so that a renamed
    or swapped level changes the checksum too.

    Raises
    ------
    OSError
        A file cannot be read.
    """
    digest = hashlib.sha256()
    for f in files:
        if len(files) > 1:
            digest.update(f.name.encode("utf-8") + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()
