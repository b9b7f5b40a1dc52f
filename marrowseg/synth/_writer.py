"""Stream a phantom to a pyramidal, tiled JPEG TIFF in Aperio SVS layout.

Page 0 is level 0, page 1 a small thumbnail, pages 2.. the reduced levels (factor 4 each,
down to < 2048 px); every level is rendered from the world at its own pixel size, one
strip of tiles at a time, so memory is bounded by one strip (256 px x slide width).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile

TILE = 256
CHUNK_W = 2048
LEVEL_FACTOR = 4
JPEG_Q = 90


def level_shapes(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of every pyramid level, level 0 first."""
    out = [(width, height)]
    while max(out[-1]) >= 2048:
        w, h = out[-1]
        out.append((max(1, math.ceil(w / LEVEL_FACTOR)), max(1, math.ceil(h / LEVEL_FACTOR))))
    return out


def _tiles(render: Callable, width: int, height: int, mpp: float, on_chunk: Callable | None) -> Iterator[np.ndarray]:
    """Yield (256, 256, 3) tiles row-major; ``render(gx0, gy0, w, h, mpp, truth)`` draws a chunk."""
    ntx = math.ceil(width / TILE)
    nty = math.ceil(height / TILE)
    for ty in range(nty):
        strip = np.empty((TILE, ntx * TILE, 3), np.uint8)
        for cx in range(0, ntx * TILE, CHUNK_W):
            cw = min(CHUNK_W, ntx * TILE - cx)
            rgb, truth = render(cx, ty * TILE, cw, TILE, mpp, on_chunk is not None)
            strip[:, cx:cx + cw] = rgb
            if on_chunk is not None:
                on_chunk(cx, ty * TILE, cw, TILE, truth)
        for tx in range(ntx):
            yield strip[:, tx * TILE:(tx + 1) * TILE]


def write_pyramid(path: str | Path, render: Callable, width: int, height: int, mpp: float, *,
                  on_level0_chunk: Callable | None = None, thumbnail: np.ndarray | None = None) -> None:
    """Write the slide; ``on_level0_chunk(x, y, w, h, truth)`` sees every level-0 chunk."""
    path = Path(path)
    shapes = level_shapes(width, height)
    bigtiff = width * height * 3 * 1.4 > 2**31
    head = "Aperio Image Library v12.0.0 \n"
    meta = f"|AppMag = 40|MPP = {mpp:.6f}"
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for lv, (w, h) in enumerate(shapes):
            lmpp = mpp * LEVEL_FACTOR**lv
            if lv == 0:
                desc = f"{head}{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) JPEG/RGB Q={JPEG_Q}{meta}"
            else:
                desc = f"{head}{width}x{height} -> {w}x{h} - ({TILE}x{TILE}) JPEG/RGB Q={JPEG_Q}{meta}"
            tif.write(
                _tiles(render, w, h, lmpp, on_level0_chunk if lv == 0 else None),
                shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                compression="jpeg", compressionargs={"level": JPEG_Q}, description=desc,
                resolution=(1e4 / lmpp, 1e4 / lmpp), resolutionunit="CENTIMETER", metadata=None,
                maxworkers=2,
            )
            if lv == 0 and thumbnail is not None:
                tif.write(thumbnail, photometric="rgb", compression="jpeg", compressionargs={"level": JPEG_Q},
                          description=f"{head}{width}x{height} -> {thumbnail.shape[1]}x{thumbnail.shape[0]} - "
                                      f"JPEG/RGB Q={JPEG_Q}{meta}", metadata=None)
