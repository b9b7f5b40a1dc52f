"""Synthetic bone-marrow trephine phantoms with exact ground truth.

A phantom is a resolution-independent world (core, bone, fat, cells, fibres) drawn from a
seed; any region renders independently at any pixel size by Beer-Lambert absorbance, and
whole slides stream to pyramidal JPEG TIFFs (Aperio SVS layout) with the truth summed
tile by tile while level 0 is written.

This package imports nothing from marrowseg except :mod:`marrowseg.errors`: a phantom that
knew how it will be measured would prove nothing.

Examples
--------
>>> ph = make_phantom("he", seed=1, size_px=(2048, 2048), cellularity_pct=40)
>>> rgb = ph.render(512, 512, 256, 256)            # (256, 256, 3) uint8 at 0.25 µm/px
>>> truth = ph.truth_region(512, 512, 256, 256)    # labels, fibres, cells of that region
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np

from marrowseg.errors import ConfigError
from marrowseg.synth import _render, _stains, _world
from marrowseg.synth._world import CLASSES, STAGES, Params
from marrowseg.synth.crush import crush_field

__all__ = ["make_phantom", "Phantom", "write_phantom", "parse_seeds", "crush_field", "STAINS", "LABELS", "CELL_CLASSES"]

log = logging.getLogger(__name__)

STAINS = _stains.STAINS
#: label map classes
LABELS = {0: "background", 1: "haematopoietic", 2: "fat", 3: "bone", 4: "haemorrhage"}
CELL_CLASSES = CLASSES
_LINEAGE = ("myeloid", "myeloid", "myeloid", "myeloid", "myeloid", "erythroid", "erythroid", "erythroid",
            "erythroid", "lymphoid", "megakaryocytic")
_CELL_COLUMNS = ("id", "x_px", "y_px", "x_um", "y_um", "lineage", "stage", "cell_class", "ecad_pos",
                 "nuclear_area_um2", "diameter_um")
#: a heterogeneous core is graded by the highest grade covering at least this fraction of the
#: haematopoietic area (WHO / European consensus practice for heterogeneous fibrosis)
HETEROGENEOUS_GRADE_FRAC = 0.30


def make_phantom(stain: str, *, seed: int = 0, size_px: tuple[int, int] = (4096, 4096), mpp: float = 0.25,
                 cellularity_pct: float | None = None, left_shift_ratio: float | None = None,
                 grade: int | None = None, heterogeneous: str | None = None,
                 stain_jitter: float = 0.1, haemorrhage_pct: float = 0.0, sheets: int = 0) -> Phantom:
    """Create a phantom world (cheap: only the coarse layout is built).

    Parameters
    ----------
    stain : {'he', 'ecad', 'reticulin'}
        H&E, E-cadherin IHC (DAB + haematoxylin) or Gomori reticulin (silver).
    seed : int
        Everything follows from it; phantoms of different stains with one seed share layout and
        cells (like serial sections), except that MF-3 adds bone.
    size_px : (width, height)
        Level-0 slide size, pixels.
    mpp : float
        Level-0 pixel size, µm per pixel.
    cellularity_pct : float, optional
        Requested haematopoietic / (haematopoietic + fat) area, % (default 50).
    left_shift_ratio : float, optional
        Requested early / (early + late) erythroid fraction (default 0.1).
    grade : int, optional
        Reticulin MF grade 0-3 (default 0); also the default of ``heterogeneous`` parts.
    heterogeneous : str, optional
        ``'half-A-B'`` (two halves of the core at grades A and B) or ``'patch-A-B[-PCT]'``
        (PCT %, default 25, of the core at grade B inside grade A).
    stain_jitter : float
        s.d. of the per-slide log stain intensity, and half the amplitude of slow intensity drift.
    haemorrhage_pct : float
        Share of the marrow space (about; the truth is exact) taken by lakes of packed red cells
        spilled from the sinusoids: no nucleated cells, no fat, label 4 in the truth, outside the
        marrow space. Default 0 (none; a seed's phantom is then the same pixel for pixel).
    sheets : int
        Sheets of early erythroid (E-cadherin-positive) precursors to place, each a disc 60-150 µm
        across wholly inside the marrow, replacing its fat, at least 60 µm from the next: a
        neoplastic erythroid proliferation. Fewer are placed when the marrow has no room; the truth
        lists those placed (``sheets``). Default 0 (none; the phantom is then the same pixel for pixel).

    Raises
    ------
    ConfigError
        A parameter outside its range; the message names it.
    """
    if stain not in STAINS:
        raise ConfigError(f"stain={stain!r}: expected one of {', '.join(STAINS)}")
    try:
        w, h = (int(v) for v in size_px)
    except (TypeError, ValueError):
        raise ConfigError(f"size_px={size_px!r}: expected (width, height)") from None
    if w < 16 or h < 16:
        raise ConfigError(f"size_px={size_px!r}: at least 16 x 16 pixels")
    if not (0.05 <= mpp <= 16):
        raise ConfigError(f"mpp={mpp!r}: expected 0.05-16 µm per pixel")
    cell = 50.0 if cellularity_pct is None else float(cellularity_pct)
    if not 0 <= cell <= 100:
        raise ConfigError(f"cellularity_pct={cellularity_pct!r}: expected 0-100")
    ls = 0.1 if left_shift_ratio is None else float(left_shift_ratio)
    if not 0 <= ls <= 1:
        raise ConfigError(f"left_shift_ratio={left_shift_ratio!r}: expected 0-1")
    g = 0 if grade is None else int(grade)
    if not 0 <= g <= 3:
        raise ConfigError(f"grade={grade!r}: expected 0-3")
    if heterogeneous is not None and stain != "reticulin":
        raise ConfigError(f"heterogeneous={heterogeneous!r}: only the reticulin stain has fibrosis grades")
    try:
        _world.parse_heterogeneous(heterogeneous, g)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not 0 <= stain_jitter <= 1:
        raise ConfigError(f"stain_jitter={stain_jitter!r}: expected 0-1")
    if not 0 <= haemorrhage_pct < 100:
        raise ConfigError(f"haemorrhage_pct={haemorrhage_pct!r}: expected 0 to under 100")
    if isinstance(sheets, bool) or not isinstance(sheets, (int, np.integer)) or not 0 <= sheets <= 100:
        raise ConfigError(f"sheets={sheets!r}: expected a whole number 0-100")
    p = Params(stain=stain, seed=int(seed), size_px=(w, h), mpp=float(mpp), cellularity_pct=cell,
               left_shift_ratio=ls, grade=g if stain == "reticulin" else 0, heterogeneous=heterogeneous,
               stain_jitter=float(stain_jitter), haemorrhage_pct=float(haemorrhage_pct), sheets=int(sheets))
    return Phantom(p)


class Phantom:
    """The world model of one phantom slide; rendering and truth are pure functions of position."""

    def __init__(self, params: Params):
        self.params = params
        self.world = _world.World(params)
        self._renderer = _render.Renderer(self.world, _stains.stain_spec(params.stain))

    def __repr__(self) -> str:
        p = self.params
        return (f"Phantom(stain={p.stain!r}, seed={p.seed}, size_px={p.size_px}, mpp={p.mpp}, "
                f"cellularity_pct={p.cellularity_pct}, left_shift_ratio={p.left_shift_ratio}, "
                f"grade={p.grade}, heterogeneous={p.heterogeneous!r}, haemorrhage_pct={p.haemorrhage_pct}, "
                f"sheets={p.sheets})")

    @property
    def size_px(self) -> tuple[int, int]:
        return self.params.size_px

    @property
    def mpp(self) -> float:
        return self.params.mpp

    # ------------------------------------------------------------------ pixels
    def render(self, x_px: int, y_px: int, w_px: int, h_px: int, mpp: float | None = None) -> np.ndarray:
        """Render a region.

        Parameters
        ----------
        x_px, y_px : int
            Top-left corner in level-0 pixels (as ``read_region``).
        w_px, h_px : int
            Output size in pixels at ``mpp``.
        mpp : float, optional
            Output pixel size, µm per pixel (default: level 0).

        Returns
        -------
        (h_px, w_px, 3) uint8 ndarray
        """
        mpp = self.params.mpp if mpp is None else float(mpp)
        g0 = (x_px * self.params.mpp / mpp, y_px * self.params.mpp / mpp)
        rgb, _ = self._renderer.region(g0[0], g0[1], int(w_px), int(h_px), mpp)
        return rgb

    def truth_region(self, x_px: int, y_px: int, w_px: int, h_px: int) -> dict:
        """Truth rasters and cells of a level-0 region.

        Returns
        -------
        dict
            ``labels`` (h, w) uint8 (0 glass, 1 haematopoietic, 2 fat, 3 bone, 4 haemorrhage); ``fibres`` (h, w) bool
            (reticulin centre line within half a fibre width; all False in other stains); ``grade``
            (h, w) uint8 intended local MF grade; ``cells`` dict of columns (centres inside the region;
            ``x_px, y_px`` level-0 pixels); ``fibre_length_um``, ``thick_fibre_length_um``,
            ``crossings`` (count) and ``crossing_points_px`` (K, 2) (x, y) inside the region.
        """
        mpp = self.params.mpp
        _, t = self._renderer.region(float(x_px), float(y_px), int(w_px), int(h_px), mpp, truth=True)
        xs = (x_px + np.arange(w_px) + 0.5) * mpp
        ys = (y_px + np.arange(h_px) + 0.5) * mpp
        t["grade"] = self.world.grade_grid(xs, ys)
        box = (x_px * mpp, y_px * mpp, (x_px + w_px) * mpp, (y_px + h_px) * mpp)
        t.update(self._region_objects(box))
        return t

    def _region_objects(self, box) -> dict:
        mpp = self.params.mpp
        x0, y0, x1, y1 = box
        cells, _ = self.world.cells_in(x0, y0, x1, y1)
        out = {"cells": _cell_table(cells, box, mpp), "fibre_length_um": 0.0, "thick_fibre_length_um": 0.0,
               "crossings": 0, "crossing_points_px": np.zeros((0, 2))}
        ff = self._renderer.fibres
        if ff is not None:
            f = ff.near(x0, y0, x1, y1)
            seg, own = _world._segments(f)
            ln = _world.clipped_length(seg, x0, y0, x1, y1)
            out["fibre_length_um"] = float(ln.sum())
            out["thick_fibre_length_um"] = float(ln[f["thick"][own]].sum()) if ln.size else 0.0
            pts = ff.crossings_in(x0, y0, x1, y1)
            out["crossings"] = int(pts.shape[0])
            out["crossing_points_px"] = pts / mpp
        return out

    def grade_map(self) -> tuple[np.ndarray, float]:
        """Intended local MF grade on the layout grid ((ny, nx) uint8, 255 outside the core) and its µm/px."""
        w = self.world
        gx = np.arange(w.nx) * w.lm
        gy = np.arange(w.ny) * w.lm
        core = w.core_grid(gx, gy)
        return np.where(core, w.grade_map, 255).astype(np.uint8), w.lm

    # ------------------------------------------------------------------ slide
    def write(self, path: str | Path) -> dict:
        """Stream the pyramidal TIFF to ``path``; returns the slide-level truth dict."""
        from marrowseg.synth import _writer

        p = self.params
        W, H = p.size_px
        acc = {"labels": np.zeros(len(LABELS), np.int64), "grade_haem": np.zeros(4, np.int64), "cells": [],
               "fibre_length_um": 0.0, "thick_fibre_length_um": 0.0, "crossings": 0}
        r = self._renderer

        def render(gx0, gy0, w, h, mpp, truth):
            return r.region(float(gx0), float(gy0), w, h, mpp, truth=truth)

        def on_chunk(x, y, w, h, t):
            w_in, h_in = min(w, W - x), min(h, H - y)
            if w_in <= 0 or h_in <= 0:
                return
            lab = t["labels"][:h_in, :w_in]
            acc["labels"] += np.bincount(lab.ravel(), minlength=len(LABELS))[: len(LABELS)]
            haem = lab == 1
            if haem.any():
                xs = (x + np.arange(w_in) + 0.5) * p.mpp
                ys = (y + np.arange(h_in) + 0.5) * p.mpp
                acc["grade_haem"] += np.bincount(self.world.grade_grid(xs, ys)[haem], minlength=4)[:4]
            box = (x * p.mpp, y * p.mpp, (x + w_in) * p.mpp, (y + h_in) * p.mpp)
            o = self._region_objects(box)
            acc["cells"].append(o["cells"])
            acc["fibre_length_um"] += o["fibre_length_um"]
            acc["thick_fibre_length_um"] += o["thick_fibre_length_um"]
            acc["crossings"] += o["crossings"]

        thumb_mpp = p.mpp * max(W, H) / 768.0
        tw, th = max(1, round(W * p.mpp / thumb_mpp)), max(1, round(H * p.mpp / thumb_mpp))
        thumb = self.render(0, 0, tw, th, mpp=thumb_mpp)
        _writer.write_pyramid(path, render, W, H, p.mpp, on_level0_chunk=on_chunk, thumbnail=thumb)
        cells = {k: np.concatenate([c[k] for c in acc["cells"]]) for k in _CELL_COLUMNS} if acc["cells"] else {}
        truth = self._summarise(acc, cells)
        self._last_cells = cells
        log.info("wrote %s: %s", path, json.dumps(truth["readouts"]))
        return truth

    def _sheet_truth(self, cells: dict) -> list[dict]:
        """The sheets placed: centre and diameter (µm, level-0 px) and the listed cells inside each."""
        xyr = self.world.sheet_xyr
        mpp = self.params.mpp
        return [{"x_um": float(x), "y_um": float(y), "x_px": float(x / mpp), "y_px": float(y / mpp),
                 "diameter_um": float(2 * r), "cells": n}
                for (x, y, r), n in zip(xyr, _sheet_cells(cells, xyr), strict=True)]

    def _summarise(self, acc: dict, cells: dict) -> dict:
        p = self.params
        px_area = p.mpp * p.mpp
        n_bg, n_haem, n_fat, n_bone, n_hmr = (int(v) for v in acc["labels"])
        areas = {"haematopoietic": n_haem * px_area, "fat": n_fat * px_area, "bone": n_bone * px_area,
                 "background": n_bg * px_area}
        if p.haemorrhage_pct > 0:
            areas["haemorrhage"] = n_hmr * px_area
        cls = cells.get("cell_class", np.zeros(0, dtype=object))
        counts = {c: int(np.sum(cls == c)) for c in CLASSES}
        nucleated = int(sum(counts.values()))
        marrow = n_haem + n_fat
        core = marrow + n_bone
        ro: dict = {
            "cellularity_pct": 100.0 * n_haem / marrow if marrow else None,
            "bone_area_frac": n_bone / core if core else None,
            "nucleated_cells": nucleated,
        }
        early, late = counts["early_erythroid"], counts["late_erythroid"]
        if p.stain == "ecad":
            ecad = int(np.sum(cells["ecad_pos"])) if cells else 0
            ro.update({
                "late_erythroid_cells": late,
                "late_erythroid_per_100": 100.0 * late / nucleated if nucleated else None,
                "ecad_pos_cells": ecad,
                "ecad_pos_per_100_nucleated": 100.0 * ecad / nucleated if nucleated else None,
                "left_shift_ratio": early / (early + late) if early + late else None,
            })
        grade_frac = None
        if p.stain == "reticulin":
            haem_um2 = areas["haematopoietic"]
            gh = acc["grade_haem"]
            grade_frac = {str(g): float(gh[g] / gh.sum()) if gh.sum() else 0.0 for g in range(4)}
            if p.heterogeneous is None:
                mf = p.grade
            else:
                present = [g for g in range(4) if gh.sum() and gh[g] / gh.sum() >= HETEROGENEOUS_GRADE_FRAC]
                mf = max(present) if present else int(np.argmax(gh))
            L = acc["fibre_length_um"]
            ro.update({
                "fibre_length_um_per_1e4um2": L / haem_um2 * 1e4 if haem_um2 else None,
                "intersections_per_mm2": acc["crossings"] / (haem_um2 / 1e6) if haem_um2 else None,
                "thick_fibre_frac": acc["thick_fibre_length_um"] / L if L else 0.0,
                "mf_grade": int(mf),
            })
        out = {
            "stain": p.stain,
            "params": {"seed": p.seed, "size_px": list(p.size_px), "mpp": p.mpp,
                       "cellularity_pct": p.cellularity_pct, "left_shift_ratio": p.left_shift_ratio,
                       "grade": p.grade, "heterogeneous": p.heterogeneous, "stain_jitter": p.stain_jitter,
                       "haemorrhage_pct": p.haemorrhage_pct, "sheets": p.sheets},
            "readouts": ro,
            "areas_um2": areas,
            "counts": counts,
            "pixel_counts": {LABELS[k]: int(v) for k, v in enumerate(acc["labels"]) if k < 4 or p.haemorrhage_pct > 0},
        }
        if p.sheets:
            out["sheets"] = self._sheet_truth(cells)
            ro["ecad_sheets"] = len(out["sheets"])
        if p.stain == "reticulin":
            out["fibres"] = {"length_um": acc["fibre_length_um"], "thick_length_um": acc["thick_fibre_length_um"],
                             "crossings": acc["crossings"], "thick_width_um": _world.THICK_FIBRE_UM,
                             "grade_area_frac": grade_frac}
        return out


def _sheet_cells(cells: dict, xyr: np.ndarray) -> list[int]:
    """Number of listed cells inside each sheet disc."""
    if not cells or not len(cells.get("x_um", ())):
        return [0] * len(xyr)
    x, y = np.asarray(cells["x_um"], np.float64), np.asarray(cells["y_um"], np.float64)
    return [int(_world.in_disc(x, y, disc).sum()) for disc in xyr]


def _cell_table(cells: dict, box, mpp: float) -> dict:
    x0, y0, x1, y1 = box
    if not cells:
        return {k: np.zeros(0) for k in _CELL_COLUMNS}
    x, y = cells["x_um"], cells["y_um"]
    ins = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    st = cells["stage"][ins]
    return {
        "id": cells["id"][ins],
        "x_px": x[ins] / mpp, "y_px": y[ins] / mpp, "x_um": x[ins], "y_um": y[ins],
        "lineage": np.array([_LINEAGE[s] for s in st], dtype=object),
        "stage": np.array([STAGES[s] for s in st], dtype=object),
        "cell_class": np.array([CLASSES[c] for c in cells["cls"][ins]], dtype=object),
        "ecad_pos": cells["ecad_pos"][ins],
        "nuclear_area_um2": cells["nuc_area_um2"][ins],
        "diameter_um": cells["diameter_um"][ins],
    }


def write_phantom(out_dir: str | Path, stain: str, *, name: str | None = None, **kw) -> tuple[Path, Path]:
    """Write ``OUT/<name>.tiff``, ``OUT/<name>.truth.json`` and ``OUT/<name>.cells.csv``.

    Reticulin phantoms also get ``OUT/<name>.grade.tiff``: the intended local MF grade on the
    layout grid (255 outside the core), its µm/px in ``truth.json``.

    Returns
    -------
    (tiff_path, truth_path)
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ph = make_phantom(stain, **kw)
    name = name or f"{stain}_seed{ph.params.seed}"
    tiff = out_dir / f"{name}.tiff"
    truth = ph.write(tiff)
    cells = ph._last_cells
    csv_path = out_dir / f"{name}.cells.csv"
    with open(csv_path, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(_CELL_COLUMNS)
        n = len(cells.get("id", ()))
        for i in range(n):
            wr.writerow([_fmt(cells[k][i]) for k in _CELL_COLUMNS])
    truth["files"] = {"slide": tiff.name, "cells": csv_path.name}
    if stain == "reticulin":
        import tifffile

        gm, lm = ph.grade_map()
        gpath = out_dir / f"{name}.grade.tiff"
        tifffile.imwrite(gpath, gm, compression="zlib", resolution=(1e4 / lm, 1e4 / lm),
                         resolutionunit="CENTIMETER", metadata=None)
        truth["files"]["grade_map"] = gpath.name
        truth["grade_map_mpp"] = lm
    truth_path = out_dir / f"{name}.truth.json"
    truth_path.write_text(json.dumps(truth, indent=2))
    return tiff, truth_path


def _fmt(v):
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.3f}" if math.isfinite(v) else ""
    return v


def parse_seeds(spec: str) -> list[int]:
    """Phantom seeds from a range list, as the evaluation scripts take them.

    Parameters
    ----------
    spec : str
        Comma-separated seeds and inclusive ranges: ``"1000-1004,1010"``.

    Returns
    -------
    list of int
        ``[1000, 1001, 1002, 1003, 1004, 1010]``, in the order given.

    Raises
    ------
    ValueError
        A part that is not a seed or an ascending range.
    """
    out: list[int] = []
    for part in spec.split(","):
        a, sep, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b) if sep else int(a)
        except ValueError:
            raise ValueError(f"seeds {spec!r}: {part!r} is not a seed or a range like 1000-1004") from None
        if hi < lo:
            raise ValueError(f"seeds {spec!r}: range {part!r} runs backwards")
        out.extend(range(lo, hi + 1))
    return out
