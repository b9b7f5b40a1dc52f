"""Per-tile statistics as CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from marrowseg.outputs.atomic import atomic_write_text

__all__ = ["rows_to_csv", "write_rows_csv", "write_windows_csv", "WINDOWS_CSV"]

WINDOWS_CSV = "windows.csv"


def rows_to_csv(rows: Sequence[dict[str, Any]], *, first: Sequence[str] = ()) -> str:
    """CSV text of dict rows; columns are ``first`` then every other key in first-seen order."""
    cols: list[str] = list(first)
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, restval="", extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(v) for k, v in r.items()})
    return buf.getvalue()


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.10g}"
    return v


def write_rows_csv(path: str | Path, rows: Sequence[dict[str, Any]], *, first: Sequence[str] = ()) -> Path:
    return atomic_write_text(path, rows_to_csv(rows, first=first))


def write_windows_csv(out_dir: str | Path, windows: dict[tuple[int, int], dict[str, float]]) -> Path | None:
    """Write per-window sums to ``OUT/windows.csv`` (None when there are none).

    Columns: ``win_row``, ``win_col`` (window index = floor(slide µm / window_um)), then the
    analyzer's window sums (pixel counts at the analysis resolution recorded in
    ``metrics.json`` ``tiles.analysis_mpp``).
    """
    if not windows:
        return None
    keys = sorted({k for w in windows.values() for k in w})
    rows = [{"win_row": r, "win_col": c, **{k: w.get(k, 0) for k in keys}}
            for (r, c), w in sorted(windows.items())]
    return write_rows_csv(Path(out_dir) / WINDOWS_CSV, rows, first=("win_row", "win_col"))
