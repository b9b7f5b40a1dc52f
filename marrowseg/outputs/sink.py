"""A :class:`~marrowseg.engine.ResultSink` that streams maps to zarr and cells to CSV."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from marrowseg.outputs.atomic import replace_dir

__all__ = ["FileSink"]


class FileSink:
    """Streams per-tile maps into ``labels.zarr`` and cells into ``cells.csv``.

    Both are written under temporary names and renamed by :meth:`commit`, which the
    caller runs once the analysis has succeeded; :meth:`abort` removes them.

    Parameters
    ----------
    out_dir : path-like
        Output folder of one slide.
    chunk_px : int
        Zarr chunk side, map pixels.
    keep_in_memory_px : int
        Maps whose sides are at most this are also kept as arrays (``.maps``) for PNGs.
    """

    def __init__(self, out_dir: str | Path, *, chunk_px: int = 512, keep_in_memory_px: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.chunk_px = chunk_px
        self.keep_in_memory_px = keep_in_memory_px
        self.maps: dict[str, np.ndarray] = {}
        self.cells: dict[str, np.ndarray] = {}
        self.n_cells = 0
        self._arrays: dict[str, Any] = {}
        self._csv_fh = None
        self._csv: Any = None
        self._columns: list[str] | None = None

    def begin(self, layout: Any, analyzer: Any) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._layout = layout
        self._zarr_tmp = self.out_dir / ".labels.zarr.tmp"
        shutil.rmtree(self._zarr_tmp, ignore_errors=True)
        self._group = zarr.open_group(store=str(self._zarr_tmp), mode="w", zarr_format=3)
        self._group.attrs.update({
            "marrowseg": {
                "mpp": layout.map_mpp,
                "axes": ["y", "x"],
                "label_classes": [
                    {"value": c.value, "name": c.name, "rgb": list(c.rgb)} for c in analyzer.label_classes
                ],
            }
        })
        self._csv_tmp = self.out_dir / ".cells.csv.tmp"
        self._csv_fh = open(self._csv_tmp, "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._csv_fh)
        self._small = max(layout.map_shape_px) <= self.keep_in_memory_px
        self._cell_parts: list[dict[str, np.ndarray]] = []

    def write_maps(self, tile: Any, map_slice: tuple[slice, slice], maps: dict[str, np.ndarray]) -> None:
        shape = self._layout.map_shape_px
        for name, arr in maps.items():
            if name not in self._arrays:
                chunks = (min(self.chunk_px, shape[0]), min(self.chunk_px, shape[1]))
                self._arrays[name] = self._group.create_array(
                    name, shape=shape, chunks=chunks, dtype=arr.dtype, fill_value=0)
                if self._small:
                    self.maps[name] = np.zeros(shape, dtype=arr.dtype)
            self._arrays[name][map_slice] = arr
            if self._small:
                self.maps[name][map_slice] = arr

    def write_cells(self, cells: dict[str, np.ndarray]) -> None:
        n = len(next(iter(cells.values())))
        if self._columns is None:
            self._columns = list(cells.keys())
            self._csv.writerow(self._columns)
        # column-wise formatting over Python scalars, rows written by the C writer
        self._csv.writerows(zip(*[_format_column(np.asarray(cells[c])) for c in self._columns], strict=True))
        self.n_cells += n
        if self._small:
            self._cell_parts.append(cells)

    def end(self) -> None:
        if self._columns is None:
            self._csv.writerow(["x", "y", "x_um", "y_um", "tile", "class"])
        self._csv_fh.close()
        if self._small and self._cell_parts:
            from marrowseg.engine import concat_columns

            self.cells = concat_columns(self._cell_parts)
        self._cell_parts = []

    def commit(self) -> None:
        """Rename the finished outputs into place."""
        replace_dir(self._zarr_tmp, self.out_dir / "labels.zarr")
        self._csv_tmp.replace(self.out_dir / "cells.csv")

    def abort(self) -> None:
        if self._csv_fh is not None and not self._csv_fh.closed:
            self._csv_fh.close()
        shutil.rmtree(getattr(self, "_zarr_tmp", self.out_dir / ".none"), ignore_errors=True)
        if hasattr(self, "_csv_tmp"):
            self._csv_tmp.unlink(missing_ok=True)


def _format_column(col: np.ndarray) -> list[str]:
    """The CSV text of each value: floats ``%.10g``, booleans 1/0, anything else ``str``."""
    values = col.tolist()
    if np.issubdtype(col.dtype, np.floating):
        return [f"{v:.10g}" for v in values]
    if col.dtype == bool:
        return ["1" if v else "0" for v in values]
    return [str(v) for v in values]
