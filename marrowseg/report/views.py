"""The pictures of one analysed slide, as RGB arrays: overview, zoomed fields, local-grade heatmap.

Shared by the HTML report (:mod:`marrowseg.report.html`) and the QA notebook. Everything is read
back from the slide's output folder and, for full-resolution fields and the heatmap's
background, from the slide file recorded in ``metrics.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from marrowseg.errors import MarrowsegError
from marrowseg.report.figures import (
    GRADE_RGB,
    cell_class_colours,
    draw_cells,
    draw_fibres,
    fit_size,
    grade_heatmap,
)
from marrowseg.report.slides import SlideOutput, local_grade_grid, read_windows

__all__ = ["Figure", "overview", "fields", "heatmap", "slide_figures"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Figure:
    """One picture with a title and a caption (what it shows, its scale)."""

    title: str
    caption: str
    rgb: np.ndarray


def _read_png(path: Path) -> np.ndarray | None:
    if not path.exists():
        return None
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _open(slide: SlideOutput):
    """The slide file as a reader, at the pixel size the analysis used; None when it is gone."""
    from marrowseg.io import open_slide

    path = slide.slide_path
    if not str(path) or not path.exists():
        log.warning("%s: slide file %s not found; figures from the output folder only", slide.slide_id, path)
        return None
    try:
        return open_slide(path, mpp=float(slide.metrics["slide"]["mpp"]))
    except MarrowsegError as exc:
        log.warning("%s: cannot reopen %s (%s); figures from the output folder only", slide.slide_id, path, exc)
        return None


def overview(slide: SlideOutput, *, max_px: int = 900) -> Figure | None:
    """``overlay.png`` (tissue classes over the slide; cells for small inputs), shrunk to ``max_px``."""
    img = _read_png(slide.out_dir / "overlay.png")
    if img is None:
        return None
    w_um = float(slide.metrics["slide"]["width"]) * float(slide.metrics["slide"]["mpp"])
    small = fit_size(img, max_px)
    return Figure("Overview", f"tissue classes over the whole slide; image width {w_um / 1000:.2f} mm "
                  f"({w_um / small.shape[1]:.2g} µm per pixel)", small)


def _cell_fields(slide: SlideOutput, n: int, field_px: int) -> list[tuple[int, int, str]]:
    """Top-left (x, y) level-0 px of the ``n`` field-sized squares with the most cells."""
    cells = slide.cells()
    if not len(cells["x"]):
        return []
    bx = np.floor(cells["x"] / field_px).astype(np.int64)
    by = np.floor(cells["y"] / field_px).astype(np.int64)
    keys, counts = np.unique(np.stack([by, bx], 1), axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:n]
    return [(int(keys[i][1]) * field_px, int(keys[i][0]) * field_px, f"{int(counts[i])} cells")
            for i in order]


def _fibre_fields(slide: SlideOutput, n: int, field_um: float) -> list[tuple[float, float, str]]:
    """Top-left (x_um, y_um) of fields centred on the ``n`` windows with the most fibre."""
    windows, side_um, source = read_windows(slide)
    if not windows:
        return []
    mpp = float(slide.metrics.get("tiles", {}).get("analysis_mpp") or 0.5)
    ranked = sorted(windows.items(), key=lambda kv: -kv[1].get("fibre_length_um", 0.0))[:n]
    out = []
    for (r, c), w in ranked:
        if source == "tiles":
            y_um, x_um = w["row_px"] * mpp, w["col_px"] * mpp
        else:
            y_um, x_um = r * side_um, c * side_um
        cy, cx = y_um + side_um / 2, x_um + side_um / 2
        out.append((max(0.0, cx - field_um / 2), max(0.0, cy - field_um / 2),
                    f"{w.get('fibre_length_um', 0.0):.0f} µm of fibre in this {side_um:.0f} µm window"))
    return out


def fields(slide: SlideOutput, *, n: int = 3, field_um: float = 150.0, max_px: int = 600) -> list[Figure]:
    """Zoomed fields at full resolution: detected cells coloured by class, or fibres and skeleton.

    Parameters
    ----------
    slide : SlideOutput
    n : int
        Number of fields: where the cells are densest (H&E, E-cadherin) or where most fibre
        was measured (reticulin).
    field_um : float
        Side of a field, µm.
    max_px : int
        Fields wider than this (fine scans) are shrunk for display.

    Returns
    -------
    list of Figure
        Empty when the slide file cannot be reopened.
    """
    reader = _open(slide)
    if reader is None:
        return []
    figs = []
    with reader:
        mpp = reader.mpp
        side = max(16, int(round(field_um / mpp)))
        if slide.stain == "reticulin":
            maps = _zarr_maps(slide.out_dir / "labels.zarr", ("fibres", "skeleton"))
            for x_um, y_um, note in _fibre_fields(slide, n, field_um):
                x0, y0 = int(round(x_um / mpp)), int(round(y_um / mpp))
                rgb = reader.read_region(x0, y0, side, side, mpp)
                crops = {k: _map_crop(a, m_mpp, x_um, y_um, field_um) for k, (a, m_mpp) in maps.items()}
                img = draw_fibres(rgb, crops.get("fibres"), crops.get("skeleton"))
                figs.append(Figure(f"Field at x {x_um:.0f} µm, y {y_um:.0f} µm",
                                   f"{field_um:.0f} µm square at {mpp:.2g} µm/px; {note}; "
                                   "fibres cyan, skeleton magenta", fit_size(img, max_px)))
        else:
            lut = cell_class_colours(slide.stain)
            cells = slide.cells()
            for x0, y0, note in _cell_fields(slide, n, side):
                rgb = reader.read_region(x0, y0, side, side, mpp)
                m = (cells["x"] >= x0 - 0.5) & (cells["x"] < x0 + side - 0.5) & \
                    (cells["y"] >= y0 - 0.5) & (cells["y"] < y0 + side - 0.5)
                rc = np.column_stack([cells["y"][m] - y0, cells["x"][m] - x0])
                col = np.array([lut.get(str(k), (255, 255, 0)) for k in cells["class"][m]], np.uint8).reshape(-1, 3)
                img = draw_cells(rgb, rc, col, radius_px=max(3, int(round(4.0 / mpp))))
                figs.append(Figure(f"Field at x {x0 * mpp:.0f} µm, y {y0 * mpp:.0f} µm",
                                   f"{field_um:.0f} µm square at {mpp:.2g} µm/px; {note}", fit_size(img, max_px)))
    return figs


def _zarr_maps(store: Path, names: tuple[str, ...]) -> dict[str, tuple[object, float]]:
    """Lazily opened map arrays and their µm/px (nothing is read yet)."""
    import zarr

    out: dict[str, tuple[object, float]] = {}
    ngff = store.parent / "masks.ome.zarr"
    if not store.exists() and ngff.exists():
        # batch outputs may carry only the OME-NGFF copy: labels/<name>/0 is full resolution
        try:
            for k in names:
                g = zarr.open_group(str(ngff / "labels" / k), mode="r")
                scale = g.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
                out[k] = (g["0"], float(scale[0]))
        except Exception as exc:  # noqa: BLE001 - a picture, not a measurement
            log.warning("%s: cannot read maps (%s); fields without fibre overlay", ngff, exc)
        return out
    if not store.exists():
        return out
    try:
        group = zarr.open_group(str(store), mode="r")
        m_mpp = float(group.attrs.get("marrowseg", {}).get("mpp"))
        for k in names:
            if k in group:
                out[k] = (group[k], m_mpp)
    except Exception as exc:  # noqa: BLE001 - a picture, not a measurement: show the field without it
        log.warning("%s: cannot read maps (%s); fields without fibre overlay", store, exc)
    return out


def _map_crop(arr: object, m_mpp: float, x_um: float, y_um: float, side_um: float) -> np.ndarray:
    r0, c0 = int(y_um / m_mpp), int(x_um / m_mpp)
    n = max(1, int(round(side_um / m_mpp)))
    crop = np.asarray(arr[r0 : r0 + n, c0 : c0 + n])  # type: ignore[index]
    full = np.zeros((n, n), crop.dtype)
    full[: crop.shape[0], : crop.shape[1]] = crop
    return full


def heatmap(slide: SlideOutput, *, max_px: int = 900) -> Figure | None:
    """Local MF grades over the slide (reticulin only), from the window stats.

    The grades come from :func:`marrowseg.report.slides.local_grade_grid`, i.e. from the
    analyzer's own grading functions and the config in the slide's provenance.
    """
    grid = local_grade_grid(slide)
    if grid is None:
        return None
    reader = _open(slide)
    if reader is not None:
        with reader:
            thumb = reader.thumbnail(max_px)
    else:
        thumb = _read_png(slide.out_dir / "overlay.png")
        if thumb is None:
            return None
        thumb = fit_size(thumb, max_px)
    width_um = float(slide.metrics["slide"]["width"]) * float(slide.metrics["slide"]["mpp"])
    thumb_mpp = width_um / thumb.shape[1]
    side = grid["side_um"]
    img = grade_heatmap(thumb, grid["grades"], origin_um=grid["origin_um"], side_um=side, thumb_mpp=thumb_mpp)
    total = sum(grid["area_by_grade"].values())
    shares = ", ".join(f"MF-{g} {100 * a / total:.0f}%" for g, a in grid["area_by_grade"].items()) if total else "none graded"
    unit = "window" if grid["source"] == "windows" else "tile (no windows.csv: tile cores used)"
    return Figure("Local grades", f"one square per {side:.0f} µm {unit}; haematopoietic area by local grade: "
                  f"{shares}; unshaded squares have too little haematopoietic tissue to grade", img)


def grade_legend() -> list[tuple[str, tuple[int, int, int]]]:
    """(label, RGB) of the heatmap colours."""
    return [(f"MF-{g}", c) for g, c in enumerate(GRADE_RGB)]


def slide_figures(slide: SlideOutput, *, n_fields: int = 3) -> dict[str, object]:
    """``overview``, ``fields`` and ``heatmap`` figures of one slide (missing ones None / [])."""
    return {"overview": overview(slide), "fields": fields(slide, n=n_fields), "heatmap": heatmap(slide)}
