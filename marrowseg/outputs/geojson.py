"""Cells and tissue regions as GeoJSON that QuPath imports (File > Import objects).

``cells.geojson``
    one ``Point`` feature per detected cell at its level-0 pixel position ``(x_px, y_px)``,
    ``properties.objectType = "detection"``, ``classification = {name, color: [r, g, b]}``
    and the cell's numeric measurements.
``regions.geojson``
    one ``MultiPolygon`` annotation per tissue class of the label map (outer rings and holes
    from the map's contours), in level-0 pixels.

Both are streamed to a temporary file and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from marrowseg.outputs.atomic import atomic_open

__all__ = ["write_feature_collection", "cells_features", "label_polygons", "region_features",
           "write_cells_geojson", "write_regions_geojson"]

#: columns of cells.csv that are position or bookkeeping, not measurements
_NOT_MEASURED = frozenset({"x", "y", "x_um", "y_um", "tile", "class"})
_DEFAULT_RGB = (255, 255, 0)


def write_feature_collection(path: str | Path, features: Iterable[dict[str, Any]]) -> int:
    """Stream features into a GeoJSON FeatureCollection at ``path``; returns their number."""
    n = 0
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        for feat in features:
            fh.write(",\n" if n else "\n")
            fh.write(json.dumps(feat, allow_nan=False, separators=(",", ":")))
            n += 1
        fh.write("\n]}\n")
    return n


def _number(text: str) -> float | int | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v):
        return None
    return int(v) if v.is_integer() and "." not in text and "e" not in text.lower() else v


def cells_features(cells_csv: str | Path, classes: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
    """Yield one QuPath detection feature per row of a ``cells.csv``.

    Parameters
    ----------
    cells_csv : path-like
        Columns ``x, y`` (level-0 pixels), ``class`` and measurements (see the pipeline).
    classes : sequence of LabelClass
        Colour of each class name; unknown names are yellow.
    """
    lut = {c.name: [int(v) for v in c.rgb] for c in classes}
    with open(cells_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            x, y = _number(row.get("x", "")), _number(row.get("y", ""))
            if x is None or y is None:
                continue
            name = str(row.get("class", "") or "cell")
            meas = {}
            for k, v in row.items():
                if k in _NOT_MEASURED or k is None:
                    continue
                num = _number(v)
                if num is not None:
                    meas[k] = num
            yield {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [float(x), float(y)]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": name, "color": lut.get(name, list(_DEFAULT_RGB))},
                    "measurements": meas,
                },
            }


def write_cells_geojson(cells_csv: str | Path, dst: str | Path, classes: Sequence[Any] = ()) -> int:
    """Write ``cells.geojson`` from ``cells.csv``; returns the number of cells."""
    return write_feature_collection(dst, cells_features(cells_csv, classes))


def label_polygons(mask: np.ndarray) -> list[list[np.ndarray]]:
    """Polygons (outer ring, then holes) of the foreground of a boolean mask.

    Parameters
    ----------
    mask : (H, W) bool ndarray

    Returns
    -------
    polygons : list of list of (N, 2) float64 ndarray
        Each polygon is ``[outer, hole, ...]``; rings hold ``(x, y)`` pixel-centre positions,
        closed (first point repeated) and at least 4 points long. Objects thinner than a
        ring (single pixels, one-pixel lines) are dropped.
    """
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    if not m.any():
        return []
    contours, hier = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    hier = hier[0]

    def ring(c: np.ndarray) -> np.ndarray | None:
        pts = c.reshape(-1, 2).astype(np.float64)
        if len(np.unique(pts, axis=0)) < 3:
            return None
        return np.vstack([pts, pts[:1]])

    polys = []
    for i, c in enumerate(contours):
        if hier[i][3] != -1:
            continue  # a hole: attached to its parent below
        outer = ring(c)
        if outer is None:
            continue
        rings = [outer]
        child = hier[i][2]
        while child != -1:
            hole = ring(contours[child])
            if hole is not None:
                rings.append(hole)
            child = hier[child][0]
        polys.append(rings)
    return polys


def region_features(labels: np.ndarray, classes: Sequence[Any], *, scale_px: float,
                    area_um2_per_px: float | None = None) -> Iterable[dict[str, Any]]:
    """Yield one QuPath annotation (MultiPolygon) per non-zero class present in ``labels``.

    Parameters
    ----------
    labels : (H, W) integer ndarray
        Label map; value 0 is left out.
    classes : sequence of LabelClass
    scale_px : float
        Level-0 pixels per label-map pixel; a map pixel's centre ``(c, r)`` goes to
        ``((c + 0.5) * scale_px, (r + 0.5) * scale_px)``.
    area_um2_per_px : float, optional
        Adds ``measurements.area_um2`` (map pixel count times this).
    """
    for c in classes:
        if not c.value:
            continue
        mask = labels == c.value
        polys = label_polygons(mask)
        if not polys:
            continue
        coords = [[((r + 0.5) * scale_px).round(2).tolist() for r in rings] for rings in polys]
        props: dict[str, Any] = {"objectType": "annotation", "name": c.name,
                                 "classification": {"name": c.name, "color": [int(v) for v in c.rgb]},
                                 "isLocked": True}
        if area_um2_per_px is not None:
            props["measurements"] = {"area_um2": float(mask.sum() * area_um2_per_px)}
        yield {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": coords},
               "properties": props}


def write_regions_geojson(labels: np.ndarray, dst: str | Path, classes: Sequence[Any], *, scale_px: float,
                          area_um2_per_px: float | None = None) -> int:
    """Write ``regions.geojson`` from a label map; returns the number of class features."""
    return write_feature_collection(dst, region_features(labels, classes, scale_px=scale_px,
                                                         area_um2_per_px=area_um2_per_px))
