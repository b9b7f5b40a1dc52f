"""Read what an analysis left on disk: one slide's output folder, a batch folder, window stats.

Everything the report and the QA notebook show is read back from the output contract
(``metrics.json``, ``cells.csv``, ``tiles.csv``, ``labels.zarr``, ``overlay.png``) plus
``windows.csv``: the per-window sums of an analyzer with a window grid (reticulin local
grades), written by :func:`write_windows_csv` from a :class:`~marrowseg.engine.SlideResult`.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from marrowseg.errors import MarrowsegError
from marrowseg.outputs.tables import WINDOWS_CSV
from marrowseg.outputs.tables import write_windows_csv as _write_windows

__all__ = [
    "SlideOutput",
    "load_slide_output",
    "load_batch",
    "read_failures",
    "write_windows_csv",
    "read_windows",
    "local_grade_grid",
]

log = logging.getLogger(__name__)



@dataclass
class SlideOutput:
    """One analysed slide as found on disk.

    Attributes
    ----------
    slide_id : str
        The output folder's name.
    out_dir : Path
    metrics : dict
        The parsed ``metrics.json``.
    """

    slide_id: str
    out_dir: Path
    metrics: dict[str, Any]
    _cells: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def stain(self) -> str:
        return str(self.metrics.get("stain", ""))

    @property
    def readouts(self) -> dict[str, Any]:
        return self.metrics.get("readouts") or {}

    @property
    def slide_path(self) -> Path:
        return Path(self.metrics.get("slide", {}).get("path", ""))

    @property
    def manifest(self) -> dict[str, Any]:
        return self.metrics.get("manifest") or {}

    def cells(self) -> dict[str, np.ndarray]:
        """``cells.csv`` as columns: ``x``, ``y`` (float, level-0 px) and ``class`` (str)."""
        if self._cells is None:
            self._cells = _read_cells(self.out_dir / "cells.csv")
        return self._cells

    def tiles(self) -> list[dict[str, str]]:
        path = self.out_dir / "tiles.csv"
        if not path.exists():
            return []
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))


def _read_cells(path: Path) -> dict[str, np.ndarray]:
    empty = {"x": np.zeros(0), "y": np.zeros(0), "class": np.zeros(0, dtype=object)}
    if not path.exists():
        return empty
    xs, ys, cls = [], [], []
    with path.open(newline="") as fh:
        for r in csv.DictReader(fh):
            xs.append(float(r["x"]))
            ys.append(float(r["y"]))
            cls.append(r.get("class", ""))
    if not xs:
        return empty
    return {"x": np.asarray(xs), "y": np.asarray(ys), "class": np.asarray(cls, dtype=object)}


def load_slide_output(out_dir: str | Path) -> SlideOutput:
    """Open one analysed slide's folder.

    Raises
    ------
    MarrowsegError
        No ``metrics.json`` (analysis missing or unfinished) or it is not JSON.
    """
    out = Path(out_dir)
    path = out / "metrics.json"
    if not path.exists():
        raise MarrowsegError(f"{out}: no metrics.json (not analysed, or the analysis did not finish)")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MarrowsegError(f"{path}: not valid JSON ({exc})") from None
    return SlideOutput(slide_id=out.name, out_dir=out, metrics=metrics)


def load_batch(out_dir: str | Path) -> list[SlideOutput]:
    """Every analysed slide in a batch folder (``OUT/<slide-id>/metrics.json``), sorted by id.

    Raises
    ------
    MarrowsegError
        The folder does not exist.
    """
    root = Path(out_dir)
    if not root.is_dir():
        raise MarrowsegError(f"{root}: no such output folder (run `marrowseg demo` or a batch first)")
    return [load_slide_output(p.parent) for p in sorted(root.glob("*/metrics.json"))]


def read_failures(out_dir: str | Path) -> list[dict[str, str]]:
    """Rows of ``OUT/failures.csv`` (slides whose analysis failed); empty when absent.

    Also picks up rows of ``summary.csv`` whose ``status`` is ``failed``, so a batch that records
    failures only there is covered too. Each row keeps its columns; ``slide_id`` and ``reason``
    are filled from the usual alternatives (``id``/``slide``/``path``, ``error``).
    """
    root = Path(out_dir)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for name, only_failed in (("failures.csv", False), ("summary.csv", True)):
        path = root / name
        if not path.exists():
            continue
        with path.open(newline="") as fh:
            for r in csv.DictReader(fh):
                if only_failed and str(r.get("status", "")).lower() != "failed":
                    continue
                sid = _first(r, ("slide_id", "id", "slide", "name", "path"))
                if sid in seen:
                    continue
                seen.add(sid)
                rows.append({**r, "slide_id": sid, "reason": _first(r, ("reason", "error", "message"))})
    return rows


def _first(row: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    for k in keys:
        v = row.get(k)
        if v not in (None, ""):
            return str(v)
    return ""


# ----------------------------------------------------------------------------- windows
def write_windows_csv(out_dir: str | Path, result: Any) -> Path | None:
    """Write a SlideResult's per-window sums to ``OUT/windows.csv`` (see
    :func:`marrowseg.outputs.tables.write_windows_csv`; ``analyze_slide`` already does this)."""
    return _write_windows(out_dir, getattr(result, "windows", None) or {})


def read_windows(slide: SlideOutput) -> tuple[dict[tuple[int, int], dict[str, float]], float, str]:
    """Window sums of a slide, their side in µm and where they came from.

    Reads ``windows.csv`` when the folder has one. Otherwise falls back to the tile cores of
    ``tiles.csv`` (the same additive sums per tile core, so the heatmap is coarser and its cells
    are tiles, not windows).

    Returns
    -------
    windows : dict of (int, int) to dict
        Sums per (row, col) cell.
    side_um : float
        Side of a cell, µm.
    source : {'windows', 'tiles', 'none'}
    """
    path = slide.out_dir / WINDOWS_CSV
    cfg = slide.metrics.get("provenance", {}).get("config", {}).get(slide.stain, {})
    if path.exists():
        out: dict[tuple[int, int], dict[str, float]] = {}
        with path.open(newline="") as fh:
            for r in csv.DictReader(fh):
                key = (int(r.pop("win_row")), int(r.pop("win_col")))
                out[key] = {k: float(v) for k, v in r.items() if v not in ("", None)}
        return out, float(cfg.get("window_um") or 0.0), "windows"
    tiles = [t for t in slide.tiles() if t.get("status") == "ok"]
    if not tiles or "haem_px" not in tiles[0]:
        return {}, 0.0, "none"
    mpp = float(slide.metrics.get("tiles", {}).get("analysis_mpp") or cfg.get("mpp") or 0.0)
    side_px = max(int(float(t["core_rows"])) for t in tiles)
    out = {}
    for t in tiles:
        key = (int(float(t["grid_row"])), int(float(t["grid_col"])))
        out[key] = {k: float(v) for k, v in t.items()
                    if k not in ("tile", "status", "error", "grid_row", "grid_col") and v not in ("", None)}
    return out, side_px * mpp, "tiles"


def local_grade_grid(slide: SlideOutput) -> dict[str, Any] | None:
    """Local MF grade of every window of a reticulin slide, by the analyzer's own rules.

    Uses :func:`marrowseg.analyzers.reticulin.local_grades` with the config recorded in the
    slide's provenance: each cell of ``windows.csv`` is graded over the ``grade_window_um``
    window centred on it (with ``grade_window_placement: homogeneous``, at region borders the
    most homogeneous window containing it), foci smaller than ``grade_min_focus_um2`` take the
    grade around them, and cells whose window holds less than
    ``window_min_haem_frac`` of haematopoietic area are not graded. Tile cores (no
    ``windows.csv``) are graded one by one, each when it holds any marrow.

    Returns
    -------
    dict or None
        ``grades`` ((R, C) int8, -1 = not graded), ``index`` ((R, C) float32 fibrosis index,
        nan = not graded), ``haem_um2`` ((R, C) float64), ``origin`` ((row, col) of cell [0, 0]
        in window indices), ``origin_um`` (its top-left corner, µm from the slide's), ``side_um``, ``source`` ('windows' or 'tiles'), ``area_by_grade``
        (µm² per grade 0..3). None for other stains or when no window stats exist.
    """
    if slide.stain != "reticulin":
        return None
    from marrowseg.analyzers.reticulin import local_grades
    from marrowseg.config.reticulin import GradeThresholds

    windows, side_um, source = read_windows(slide)
    if not windows or side_um <= 0:
        return None
    # Only the grading keys of the recorded config are read: outputs of an older version,
    # whose config lacked keys added since, must still show their heatmap (without
    # grade_window_um each window was graded on its own).
    recorded = slide.metrics["provenance"]["config"]["reticulin"]
    thresholds = GradeThresholds.model_validate(recorded["grade_thresholds"])
    mpp = float(slide.metrics.get("tiles", {}).get("analysis_mpp") or recorded["mpp"])
    grade_window_um = float(recorded.get("grade_window_um") or side_um) if source == "windows" else side_um
    max_window_um = recorded.get("grade_window_max_um") if source == "windows" else None
    # a tile core is several grading windows wide: any marrow in one is enough to grade it
    min_frac = float(recorded["window_min_haem_frac"]) if source == "windows" else 0.0
    # outputs from before the border-aware grade recorded no placement: their cells were centred
    placement = str(recorded.get("grade_window_placement") or "centred") if source == "windows" else "centred"
    border = {"border_ratio": float(recorded["grade_border_ratio"]),
              "density_floor": float(recorded["grade_border_density_floor_um_per_1e4um2"])} \
        if placement != "centred" else {}
    # outputs from before small foci were absorbed recorded no size: every window kept its grade
    min_focus = float(recorded.get("grade_min_focus_um2") or 0.0) if source == "windows" else 0.0
    loc = local_grades(windows, mpp, thresholds, cell_um=side_um, window_um=max(grade_window_um, side_um),
                       min_haem_frac=min_frac, max_window_um=None if max_window_um is None else float(max_window_um),
                       placement=placement, min_focus_um2=min_focus, **border)
    grades, index = loc["grades"], loc["index"].astype(np.float32)
    haem, area_by_grade = loc["haem_um2"], loc["area_by_grade"]
    r0, c0 = loc["origin"]
    if source == "tiles":
        origin_um = (min(w.get("row_px", 0.0) for w in windows.values()) * mpp,
                     min(w.get("col_px", 0.0) for w in windows.values()) * mpp)
    else:
        origin_um = (r0 * side_um, c0 * side_um)
    return {"grades": grades, "index": index, "haem_um2": haem, "origin": (r0, c0), "origin_um": origin_um,
            "side_um": side_um, "source": source, "area_by_grade": area_by_grade}
