#!/usr/bin/env python
"""Measure E-cadherin phantoms against their truth.

``eval_ecad.py --seeds 1000-1009 [--size-px 2400] [--set KEY=VALUE ...]``

Each seed gets a phantom (``marrowseg.synth``, used as a black box) with a left-shift ratio
cycling over 0.05-0.8 and a stain jitter cycling over 0-0.3 (``--jitter``: one value for
all; a seed's tissue and ratio do not depend on it), written to a temporary
folder and analysed through :func:`marrowseg.pipeline.analyze_slide` (the path of
``marrowseg analyze``). Printed per phantom: truth vs measured E-cad+ cells, late
erythroid cells, left-shift ratio and nucleated cells, with relative count errors and the
absolute ratio error, and the haematopoietic area (µm², the denominator of ``ecad_pos_per_mm2``);
then the mean and largest absolute errors. Tune on seeds 0-99,
report on seeds >= 1000.

``--match`` also matches each detected cell to the nearest truth cell (within 3 µm) and
prints what the late-erythroid calls are in truth (late erythroid, lymphocyte, other,
none), the share of truth late erythroid cells that own a detection (nearest truth
cell of some detection), and what the truth late erythroid cells are called (the class of
their own detection, the nearest one they own; ``none`` when they own none).
It also prints, per truth class, the share of truth cells that own a detection (recall), and
the share of detections that are some truth cell's own (precision; the others are second
detections of a cell or lie on no cell).
``--sheets N`` draws N sheets of early erythroid precursors into every phantom (a neoplastic
erythroid proliferation; fewer where the marrow has no room): the ``clusters t/m`` column
compares the sheets placed with the analyzer's ``ecad_pos_clusters`` (without it, every
cluster counted is a false one).
``--size-bound`` prints, over the seeds run, the late count and ratio errors that a cut on
the phantoms' *true* nuclear area would give to a perfect detector that could not tell
late erythroid cells from lymphocytes otherwise: a bound on what any nuclear-size rule can
reach.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from marrowseg.config import load_config
from marrowseg.pipeline import analyze_slide
from marrowseg.stains import parse_stain_pair
from marrowseg.synth import parse_seeds, write_phantom

RATIOS = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8)
MATCH_UM = 3.0  # a detection lies on its nucleus: centroid within ~half a small nucleus' radius
SIZE_CUTS_UM2 = tuple(range(24, 46, 2))
JITTERS = (0.0, 0.1, 0.2, 0.3)
#: classes a truth late erythroid cell can be called (``none``: it owns no detection)
CALL_CLASSES = ("late_erythroid", "ecad_pos", "other", "megakaryocyte", "none")


def read_cells(path: Path) -> dict[str, np.ndarray]:
    """A cells CSV (analyzer output or phantom truth) as columns; numeric where possible."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, np.ndarray] = {}
    for key in rows[0] if rows else ():
        vals = [r[key] for r in rows]
        try:
            out[key] = np.array([float(v) if v != "" else np.nan for v in vals])
        except ValueError:
            out[key] = np.array(vals, dtype=object)
    return out


def match_calls(det: dict[str, np.ndarray], truth: dict[str, np.ndarray], radius_um: float = MATCH_UM) -> dict[str, int]:
    """What the late-erythroid calls are in truth, and how many truth late cells own a detection.

    Parameters
    ----------
    det : dict of columns
        Analyzer cells (``x_um``, ``y_um``, ``class``).
    truth : dict of columns
        Phantom truth cells (``x_um``, ``y_um``, ``cell_class``).
    radius_um : float
        A detection is matched to the nearest truth cell within this distance, µm.

    Returns
    -------
    dict of str to int
        ``late_calls_late``, ``late_calls_lymphocyte``, ``late_calls_other`` (matched to
        another class), ``late_calls_none`` (no truth cell within ``radius_um``);
        ``truth_late`` and ``truth_late_owned`` (the nearest truth cell of at least one
        detection); ``truth_late_as_<class>`` for each class in :data:`CALL_CLASSES`: truth
        late cells whose own detection (the nearest of the detections they own) has that
        class, ``none`` when they own no detection.
    """
    tcls = np.asarray(truth["cell_class"], dtype=object)
    t_late = tcls == "late_erythroid"
    out = {"late_calls_late": 0, "late_calls_lymphocyte": 0, "late_calls_other": 0, "late_calls_none": 0,
           "truth_late": int(t_late.sum()), "truth_late_owned": 0}
    out |= {f"truth_late_as_{c}": 0 for c in CALL_CLASSES}
    if len(det.get("x_um", ())) == 0 or len(tcls) == 0:
        out["late_calls_none"] = int((np.asarray(det.get("class", []), dtype=object) == "late_erythroid").sum())
        out["truth_late_as_none"] = int(t_late.sum())
        return out
    txy = np.column_stack([truth["x_um"], truth["y_um"]])
    dxy = np.column_stack([det["x_um"], det["y_um"]])
    dist, j = cKDTree(txy).query(dxy)
    hit = dist <= radius_um
    late_call = np.asarray(det["class"], dtype=object) == "late_erythroid"
    matched = np.where(hit, tcls[np.minimum(j, len(tcls) - 1)], None)
    out["late_calls_late"] = int((late_call & (matched == "late_erythroid")).sum())
    out["late_calls_lymphocyte"] = int((late_call & (matched == "lymphocyte")).sum())
    out["late_calls_none"] = int((late_call & ~hit).sum())
    out["late_calls_other"] = int(late_call.sum()) - out["late_calls_late"] - out["late_calls_lymphocyte"] - out["late_calls_none"]
    owned = np.zeros(len(tcls), bool)
    owned[j[hit]] = True
    out["truth_late_owned"] = int((owned & t_late).sum())
    # class of each truth cell's own detection: the nearest of those matched to it
    own_cls = np.full(len(tcls), "none", dtype=object)
    k = np.flatnonzero(hit)
    k = k[np.lexsort((dist[k], j[k]))]
    _, first = np.unique(j[k], return_index=True)
    own_cls[j[k[first]]] = np.asarray(det["class"], dtype=object)[k[first]]
    for c in CALL_CLASSES:
        out[f"truth_late_as_{c}"] = int((t_late & (own_cls == c)).sum())
    return out


def detection_by_class(det: dict[str, np.ndarray], truth: dict[str, np.ndarray],
                       radius_um: float = MATCH_UM) -> dict[str, int]:
    """How many truth cells of each class own a detection, and how many detections are a cell's own.

    Parameters
    ----------
    det, truth, radius_um
        As :func:`match_calls`.

    Returns
    -------
    dict of str to int
        ``n_<class>`` and ``owned_<class>`` for each truth ``cell_class`` (a truth cell owns a
        detection when it is the nearest truth cell within ``radius_um`` of one);
        ``detections`` and ``detections_own``: detections that are the nearest detection of
        the truth cell they are matched to (the others are a second detection of a cell, or
        lie farther than ``radius_um`` from every truth cell).
    """
    tcls = np.asarray(truth["cell_class"], dtype=object)
    n_det = len(det.get("x_um", ()))
    out = {"detections": int(n_det), "detections_own": 0}
    owned = np.zeros(len(tcls), bool)
    if n_det and len(tcls):
        dist, j = cKDTree(np.column_stack([truth["x_um"], truth["y_um"]])).query(
            np.column_stack([det["x_um"], det["y_um"]]))
        k = np.flatnonzero(dist <= radius_um)
        owned[j[k]] = True
        out["detections_own"] = int(len(np.unique(j[k])))
    for c in sorted(set(tcls.tolist())):
        out[f"n_{c}"] = int((tcls == c).sum())
        out[f"owned_{c}"] = int((owned & (tcls == c)).sum())
    return out


def size_bound_counts(truth: dict[str, np.ndarray], cuts_um2=SIZE_CUTS_UM2) -> np.ndarray:
    """Late erythroid + lymphocyte nuclei with true area <= each cut (µm²): (len(cuts),) int."""
    tcls = np.asarray(truth["cell_class"], dtype=object)
    small = (tcls == "late_erythroid") | (tcls == "lymphocyte")
    area = np.asarray(truth["nuclear_area_um2"], np.float64)
    return np.array([int((small & (area <= c)).sum()) for c in cuts_um2])


def run_one(seed: int, size_px: int, mpp: float, sets: list[str], tmp: Path, jitter: float | None = None,
            sheets: int = 0, od_scale: float = 1.0, hue: tuple | None = None) -> dict:
    ratio = RATIOS[seed % len(RATIOS)]
    jitter = JITTERS[seed % len(JITTERS)] if jitter is None else jitter
    tiff, truth_path = write_phantom(tmp, "ecad", name=f"ecad_{seed}", seed=seed, size_px=(size_px, size_px),
                                     mpp=mpp, left_shift_ratio=ratio, stain_jitter=jitter, sheets=sheets)
    if od_scale != 1.0 or hue is not None:
        tiff = _restained_copy(Path(tiff), od_scale, mpp, hue)
    truth_doc = json.loads(Path(truth_path).read_text())
    truth = truth_doc["readouts"]
    config = load_config("ecad", overrides=sets)
    metrics, _ = analyze_slide(tiff, "ecad", tmp / f"out_{seed}", config=config)
    truth_cells = read_cells(tmp / f"ecad_{seed}.cells.csv")
    det_cells = read_cells(tmp / f"out_{seed}" / "cells.csv")
    return {"seed": seed, "ratio_req": ratio, "jitter": jitter, "truth": truth, "meas": metrics["readouts"],
            "haem_um2": (truth_doc["areas_um2"]["haematopoietic"], metrics["areas_um2"]["haematopoietic"]),
            "vectors": metrics.get("stain_vectors_source"),
            "match": match_calls(det_cells, truth_cells), "by_class": detection_by_class(det_cells, truth_cells),
            "size_bound": size_bound_counts(truth_cells)}


def _restained_copy(tiff: Path, od_scale: float, mpp: float, hue: tuple | None = None) -> Path:
    """Level 0 of ``tiff`` with every OD x ``od_scale`` and, with ``hue`` (haematoxylin, DAB vectors),
    restained from the phantom's own vectors to those, as a tiled TIFF that states its pixel size."""
    import tifffile

    from marrowseg.stains import rehue, restain
    from marrowseg.synth._stains import stain_spec

    out = tiff.with_name(f"{tiff.stem}_x{od_scale:g}{'_hue' if hue else ''}.tif")
    rgb = tifffile.imread(tiff, level=0)
    if hue is not None:
        drawn = stain_spec("ecad")["vectors"]
        rgb = rehue(rgb, (drawn[0], drawn[1]), hue)
    rgb = restain(rgb, od_scale) if od_scale != 1.0 else rgb
    tifffile.imwrite(out, rgb, photometric="rgb", tile=(512, 512), resolution=(1e4 / mpp, 1e4 / mpp),
                     resolutionunit="CENTIMETER")
    return out


def rel(m: float, t: float) -> float:
    return (m - t) / t if t else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1000-1009")
    ap.add_argument("--size-px", type=int, default=2400, help="phantom side, level-0 pixels")
    ap.add_argument("--mpp", type=float, default=0.25, help="phantom pixel size, µm/px")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    ap.add_argument("--jitter", type=float, default=None,
                    help="stain jitter of every phantom (default: cycle over 0-0.3 by seed); the tissue and the "
                         "ratio of a seed do not depend on it, so runs at several values isolate the stain's effect")
    ap.add_argument("--match", action="store_true", help="also print what the late-erythroid calls are in truth")
    ap.add_argument("--size-bound", action="store_true", help="also print the true-nuclear-area bound (see docstring)")
    ap.add_argument("--sheets", type=int, default=0, help="sheets of early erythroid precursors in every phantom")
    ap.add_argument("--od-scale", type=float, default=1.0, metavar="F",
                    help="multiply every optical density of the phantoms by F (a paler or darker run; the truth "
                         "is the phantom's)")
    ap.add_argument("--hue", default=None, metavar="H1,H2,H3:D1,D2,D3",
                    help="restain the phantoms from their own haematoxylin and DAB vectors to these (another "
                         "lab's hue; the truth is the phantom's)")
    args = ap.parse_args(argv)
    hue = None
    if args.hue:
        try:
            hue = parse_stain_pair(args.hue)
        except ValueError as exc:
            ap.error(f"--hue {exc}")
    rows = []
    matches = []
    by_class: list[dict[str, int]] = []
    bound = []
    sheets: list[tuple[int, int]] = []
    print(f"{'seed':>5}{'jit':>5}{'vec':>5} | {'pos t/m':>11}{'err':>7} | {'late t/m':>11}{'err':>7} | "
          f"{'ratio t/m':>13}{'err':>7} | {'nucl t/m':>11}{'err':>7} | {'clusters t/m':>12} | {'haem 1e3um2 t/m':>15}{'err':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in parse_seeds(args.seeds):
            r = run_one(seed, args.size_px, args.mpp, args.set, Path(tmp), args.jitter, args.sheets, args.od_scale, hue)
            t, m = r["truth"], r["meas"]
            e_pos = rel(m["ecad_pos_cells"], t["ecad_pos_cells"])
            e_late = rel(m["late_erythroid_cells"], t["late_erythroid_cells"])
            e_n = rel(m["nucleated_cells"], t["nucleated_cells"])
            mr = m["left_shift_ratio"] if m["left_shift_ratio"] is not None else float("nan")
            e_r = mr - t["left_shift_ratio"]
            ht, hm = r["haem_um2"]
            e_h = rel(hm, ht)
            # E-cad+ cells per mm² of haematopoietic tissue, as ecad_pos_per_mm2 reports them
            e_d = rel(m["ecad_pos_cells"] / max(hm, 1e-9), t["ecad_pos_cells"] / ht) if t["ecad_pos_cells"] else float("nan")
            rows.append((e_pos, e_late, e_r, e_n, e_h, e_d))
            print(f"{seed:>5}{r['jitter']:>5.1f}{str(r['vectors'])[:4]:>5} | "
                  f"{t['ecad_pos_cells']:>5}/{m['ecad_pos_cells']:<5}{e_pos:>+7.2f} | "
                  f"{t['late_erythroid_cells']:>5}/{m['late_erythroid_cells']:<5}{e_late:>+7.2f} | "
                  f"{t['left_shift_ratio']:>6.3f}/{mr:<6.3f}{e_r:>+7.3f} | "
                  f"{t['nucleated_cells']:>5}/{m['nucleated_cells']:<5}{e_n:>+7.2f} | "
                  f"{t.get('ecad_sheets', 0):>5}/{m['ecad_pos_clusters']:<6} | "
                  f"{ht / 1e3:>7.1f}/{hm / 1e3:<7.1f}{e_h:>+7.2f}", flush=True)
            sheets.append((t.get("ecad_sheets", 0), m["ecad_pos_clusters"]))
            matches.append((seed, r["match"]))
            by_class.append(r["by_class"])
            bound.append((t["late_erythroid_cells"], t["ecad_pos_cells"], r["size_bound"]))
    a = np.abs(np.array(rows, dtype=np.float64))
    names = ("pos count (rel)", "late count (rel)", "ratio (abs)", "nucleated (rel)", "haem area (rel)",
             "pos per mm2 (rel)")
    for j, name in enumerate(names):
        print(f"{name:<18} mean |err| {np.nanmean(a[:, j]):.3f}   max |err| {np.nanmax(a[:, j]):.3f}")
    sh = np.array(sheets, np.int64).reshape(-1, 2)
    print(f"clusters           {int((sh[:, 0] == sh[:, 1]).sum())} of {len(sh)} phantoms exact; sheets {int(sh[:, 0].sum())}, "
          f"clusters {int(sh[:, 1].sum())}")
    if args.match:
        print(f"\nlate-erythroid calls by truth class (nearest truth cell within {MATCH_UM:g} µm)")
        print(f"{'seed':>5} | {'late':>5}{'lymph':>6}{'other':>6}{'none':>5} | {'truth late':>10}{'owned':>6}{'%':>5}")
        for seed, mt in matches:
            own = 100.0 * mt["truth_late_owned"] / mt["truth_late"] if mt["truth_late"] else float("nan")
            print(f"{seed:>5} | {mt['late_calls_late']:>5}{mt['late_calls_lymphocyte']:>6}{mt['late_calls_other']:>6}"
                  f"{mt['late_calls_none']:>5} | {mt['truth_late']:>10}{mt['truth_late_owned']:>6}{own:>5.0f}")
        print("\ntruth late erythroid cells by the class of their own detection, % (by requested ratio)")
        print(f"{'ratio':>6}{'truth':>7} | " + "".join(f"{c:>15}" for c in CALL_CLASSES))
        for ratio in sorted({RATIOS[s % len(RATIOS)] for s, _ in matches}):
            sel = [mt for s, mt in matches if RATIOS[s % len(RATIOS)] == ratio]
            n = sum(mt["truth_late"] for mt in sel)
            print(f"{ratio:>6.2f}{n:>7} | " + "".join(
                f"{100.0 * sum(mt[f'truth_late_as_{c}'] for mt in sel) / max(n, 1):>14.0f}%" for c in CALL_CLASSES))
    if args.match:
        tot: dict[str, int] = {}
        for bc in by_class:
            for key, v in bc.items():
                tot[key] = tot.get(key, 0) + v
        print(f"\ntruth cells with a detection of their own (nearest truth cell within {MATCH_UM:g} µm), all seeds")
        for c in sorted(key[2:] for key in tot if key.startswith("n_")):
            n = tot[f"n_{c}"]
            print(f"{c:>16} {tot[f'owned_{c}']:>6} of {n:>6}  {100.0 * tot[f'owned_{c}'] / max(n, 1):5.1f}%")
        print(f"{'detections':>16} {tot['detections_own']:>6} of {tot['detections']:>6}  "
              f"{100.0 * tot['detections_own'] / max(tot['detections'], 1):5.1f}% are a truth cell's own")
    if args.size_bound:
        print("\nbound: perfect detection, late = late erythroid + lymphocyte nuclei with TRUE area <= cut")
        print(f"{'cut um2':>8} | {'late err mean':>13}{'min':>7}{'max':>7} | {'ratio |err| max':>15}")
        for k, cut in enumerate(SIZE_CUTS_UM2):
            e, r = [], []
            for t_late, n_pos, counts in bound:
                n = counts[k]
                if t_late:
                    e.append((n - t_late) / t_late)
                if n_pos + t_late and n_pos + n:
                    r.append(n_pos / (n_pos + n) - n_pos / (n_pos + t_late))
            e, r = np.array(e), np.abs(np.array(r))
            print(f"{cut:>8} | {np.abs(e).mean():>13.3f}{e.min():>+7.2f}{e.max():>+7.2f} | {r.max():>15.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
