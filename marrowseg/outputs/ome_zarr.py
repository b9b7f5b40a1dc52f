"""Label maps as OME-Zarr (OME-NGFF 0.4 multiscales): opens in napari, QuPath, Fiji/MoBIE.

Layout of ``masks.ome.zarr`` (zarr format 2, ``/`` chunk keys, as NGFF 0.4 requires)::

    masks.ome.zarr/           multiscales of the primary map (the analyzer's label classes)
        0/ 1/ 2/ ...          level k is level 0 downsampled by 2**k
        labels/               other maps (e.g. reticulin ``fibres``, ``skeleton``), each
            fibres/0 1 ...    a multiscale label image with ``image-label`` metadata

Axes are ``y``, ``x`` in micrometres; each level's ``scale`` transform is its pixel size in
µm (``map_mpp * 2**k``), so overlays line up with the slide in any NGFF viewer.

Memory is bounded by a strip of chunk rows: maps are copied and downsampled strip by strip.

References
----------
OME-NGFF 0.4 specification, https://ngff.openmicroscopy.org/0.4/ (multiscales, labels).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from marrowseg.outputs.atomic import replace_dir

__all__ = ["NGFF_VERSION", "write_ome_zarr", "read_level", "multiscales_meta"]

NGFF_VERSION = "0.4"
_KEYS = {"name": "v2", "separator": "/"}


def multiscales_meta(name: str, mpp: float, n_levels: int) -> dict[str, Any]:
    """The NGFF 0.4 ``multiscales`` entry of a 2-D map at ``mpp`` µm/px with ``n_levels`` levels."""
    return {
        "version": NGFF_VERSION,
        "name": name,
        "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [mpp * 2**k, mpp * 2**k]}]}
            for k in range(n_levels)
        ],
        "type": "nearest (labels) or 2x2 max (binary maps)",
    }


def _image_label(classes: Sequence[Any] | None, binary: bool) -> dict[str, Any]:
    if classes:
        colors = [{"label-value": int(c.value), "rgba": [*map(int, c.rgb), 255]} for c in classes if c.value]
        props = [{"label-value": int(c.value), "class": c.name} for c in classes]
    else:
        colors = [{"label-value": 1, "rgba": [255, 255, 255, 255]}] if binary else []
        props = []
    return {"version": NGFF_VERSION, "colors": colors, "properties": props, "source": {"image": "../../"}}


def _n_levels(shape: tuple[int, int], min_side_px: int) -> int:
    side = max(shape)
    return 1 + max(0, math.ceil(math.log2(side / min_side_px))) if side > min_side_px else 1


def _down(block: np.ndarray, binary: bool) -> np.ndarray:
    """Halve a block: nearest (top-left sample) for labels, 2x2 maximum for binary maps."""
    if not binary:
        return block[::2, ::2]
    h, w = block.shape
    if h % 2 or w % 2:
        block = np.pad(block, ((0, h % 2), (0, w % 2)))
    return block.reshape(block.shape[0] // 2, 2, block.shape[1] // 2, 2).max(axis=(1, 3))


def _write_pyramid(group: Any, src: Any, *, chunk_px: int, n_levels: int, binary: bool) -> list[tuple[int, int]]:
    shape = tuple(int(s) for s in src.shape)
    chunks = (min(chunk_px, shape[0]), min(chunk_px, shape[1]))
    prev = group.create_array("0", shape=shape, chunks=chunks, dtype=src.dtype, fill_value=0,
                              chunk_key_encoding=_KEYS)
    strip = max(2, chunks[0] // 2 * 2)
    for r in range(0, shape[0], strip):
        prev[r : r + strip] = np.asarray(src[r : r + strip])
    shapes = [shape]
    for k in range(1, n_levels):
        h, w = math.ceil(shapes[-1][0] / 2), math.ceil(shapes[-1][1] / 2)
        cur = group.create_array(str(k), shape=(h, w), chunks=(min(chunk_px, h), min(chunk_px, w)),
                                 dtype=src.dtype, fill_value=0, chunk_key_encoding=_KEYS)
        for r in range(0, shapes[-1][0], strip):
            d = _down(np.asarray(prev[r : r + strip]), binary)
            cur[r // 2 : r // 2 + d.shape[0]] = d
        prev = cur
        shapes.append((h, w))
    return shapes


def write_ome_zarr(
    labels_zarr: str | Path,
    dst: str | Path,
    *,
    mpp: float,
    label_classes: Sequence[Any] = (),
    primary: str = "labels",
    chunk_px: int = 512,
    min_side_px: int = 256,
    extra_attrs: dict[str, Any] | None = None,
) -> Path:
    """Write the maps of a ``labels.zarr`` group as an OME-Zarr multiscale image.

    Parameters
    ----------
    labels_zarr : path-like
        Zarr group with one 2-D array per map (what :class:`~marrowseg.outputs.sink.FileSink` writes).
    dst : path-like
        The ``.ome.zarr`` folder to create (written under a temporary name, then renamed).
    mpp : float
        Pixel size of the maps, µm/px (> 0).
    label_classes : sequence of LabelClass
        Values and colours of the primary map.
    primary : str
        Name of the map stored at the root; the others go under ``labels/``.
    chunk_px : int
        Chunk side, px.
    min_side_px : int
        Levels are added until the longest side is at most this.
    extra_attrs : dict, optional
        Stored under the root attribute ``marrowseg``.

    Returns
    -------
    dst : Path

    Raises
    ------
    ValueError
        ``mpp`` not positive, or the group holds no 2-D map.
    """
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be finite and > 0, got {mpp!r}")
    src = zarr.open_group(store=str(labels_zarr), mode="r")
    names = sorted(name for name, arr in src.arrays() if arr.ndim == 2)
    if not names:
        raise ValueError(f"{labels_zarr}: no 2-D maps to write")
    root_name = primary if primary in names else names[0]
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        root = zarr.open_group(store=str(tmp), mode="w", zarr_format=2)
        arr = src[root_name]
        n = _n_levels(arr.shape, min_side_px)
        _write_pyramid(root, arr, chunk_px=chunk_px, n_levels=n, binary=False)
        attrs: dict[str, Any] = {
            "multiscales": [multiscales_meta(root_name, mpp, n)],
            "image-label": _image_label(label_classes, binary=False) | {"source": {"image": "./"}},
            "marrowseg": {"map": root_name, "map_mpp": mpp,
                          "label_classes": [{"value": int(c.value), "name": c.name, "rgb": list(map(int, c.rgb))}
                                            for c in label_classes],
                          **(extra_attrs or {})},
        }
        root.attrs.update(attrs)
        others = [x for x in names if x != root_name]
        if others:
            lab = root.create_group("labels")
            lab.attrs.update({"labels": others})
            for name in others:
                g = lab.create_group(name)
                a = src[name]
                binary = bool(np.issubdtype(a.dtype, np.bool_) or a.dtype == np.uint8)
                n_k = _n_levels(a.shape, min_side_px)
                _write_pyramid(g, a, chunk_px=chunk_px, n_levels=n_k, binary=binary)
                g.attrs.update({"multiscales": [multiscales_meta(name, mpp, n_k)],
                                "image-label": _image_label(None, binary=True)})
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_level(store: str | Path, *, max_side_px: int | None = None, path: str = "") -> tuple[np.ndarray, float]:
    """Read the finest level of an OME-Zarr image whose longest side is at most ``max_side_px``.

    Parameters
    ----------
    store : path-like
        The ``.ome.zarr`` folder.
    max_side_px : int, optional
        Largest acceptable side; the coarsest level if none is small enough; level 0 if None.
    path : str
        Sub-group of the image (``''`` for the root, ``'labels/fibres'``).

    Returns
    -------
    data : (H, W) ndarray
    mpp : float
        Its pixel size, µm/px (from the level's scale transform).
    """
    g = zarr.open_group(store=str(store), mode="r")
    if path:
        g = g[path]
    ms = g.attrs["multiscales"][0]
    chosen = ms["datasets"][-1]
    for ds in ms["datasets"]:
        if max_side_px is None or max(g[ds["path"]].shape) <= max_side_px:
            chosen = ds
            break
    scale = chosen["coordinateTransformations"][0]["scale"]
    return np.asarray(g[chosen["path"]][:]), float(scale[-1])
