#!/usr/bin/env python
"""Estimate the reference H&E stain vectors (``he.stain.reference_h`` / ``reference_e``) from a folder of images.

``stain_reference.py DIR [--mpp 0.25]``

Every PNG/TIFF image in DIR (files named ``*_dots_*`` are skipped) is brought to the H&E analysis
resolution (``he.mpp``) by area averaging and its pixels are pooled; the Macenko estimate of the pool,
with the analyzer's own settings (``he.stain.macenko_min_od``, ``macenko_percentile``), is the
reference. With MBM-style names (``..._PPPP_...``) the estimate of each patient and of each
leave-one-patient-out pool is printed too, with its angle to the reference: how much the
reference would move had one patient been kept aside.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from marrowseg.config import load_config
from marrowseg.io._resample import area_reduce
from marrowseg.stains import RUIFROK_E, RUIFROK_H, estimate_two_stains, od_from_rgb, stain_matrix


def read_rgb(path: Path) -> np.ndarray:
    """RGB uint8 pixels of a PNG or TIFF file (alpha dropped, grey repeated)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        img = np.asarray(tifffile.imread(path))
    else:
        from skimage import io

        img = np.asarray(io.imread(path))
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two vectors, degrees."""
    c = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def estimate(od: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """(h, e) Macenko vectors of OD pixels, assigned to haematoxylin and eosin by angle to Ruifrok's."""
    vecs, info = estimate_two_stains(od, min_od=cfg.macenko_min_od, percentile=cfg.macenko_percentile)
    if vecs is None:
        raise SystemExit(f"no estimate: {info}")
    ruifrok = stain_matrix(RUIFROK_H, RUIFROK_E)
    swap = angle_deg(vecs[0], ruifrok[0]) + angle_deg(vecs[1], ruifrok[1]) > (
        angle_deg(vecs[0], ruifrok[1]) + angle_deg(vecs[1], ruifrok[0]))
    return (vecs[1], vecs[0]) if swap else (vecs[0], vecs[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images_dir", type=Path)
    ap.add_argument("--mpp", type=float, default=0.25, help="pixel size of the images, µm/px")
    args = ap.parse_args(argv)
    cfg = load_config("he").he
    factor = cfg.mpp / args.mpp
    k = int(round(factor))
    if k < 1 or abs(factor - k) > 1e-6:
        ap.error(f"--mpp {args.mpp}: he.mpp {cfg.mpp} must be a whole multiple of it")
    paths = sorted(p for p in args.images_dir.iterdir()
                   if p.suffix.lower() in (".png", ".tif", ".tiff") and "_dots_" not in p.name)
    if not paths:
        ap.error(f"{args.images_dir}: no PNG or TIFF images")
    od_by_image = {}
    for p in paths:
        rgb = read_rgb(p)
        if k > 1:
            rgb = area_reduce(rgb, k)
        od_by_image[p.name] = od_from_rgb(rgb).reshape(-1, 3)
    h, e = estimate(np.concatenate(list(od_by_image.values())), cfg.stain)
    ruifrok = stain_matrix(RUIFROK_H, RUIFROK_E)
    print(f"{len(paths)} images at {cfg.mpp} µm/px (x{k} area average)")
    print(f"reference_h: [{h[0]:.3f}, {h[1]:.3f}, {h[2]:.3f}]   ({angle_deg(h, ruifrok[0]):.1f} deg from Ruifrok)")
    print(f"reference_e: [{e[0]:.3f}, {e[1]:.3f}, {e[2]:.3f}]   ({angle_deg(e, ruifrok[1]):.1f} deg from Ruifrok)")
    patients = sorted({m.group(1) for n in od_by_image if (m := re.search(r"_(\d{4})_", n))})
    if len(patients) > 1:
        print("| pool | H deg to reference | E deg to reference |")
        print("|---|---|---|")
        for pid in patients:
            for label, keep in ((f"patient {pid}", lambda n, pid=pid: f"_{pid}_" in n),
                                (f"all but {pid}", lambda n, pid=pid: f"_{pid}_" not in n)):
                ph, pe = estimate(np.concatenate([v for n, v in od_by_image.items() if keep(n)]), cfg.stain)
                print(f"| {label} | {angle_deg(ph, h):.1f} | {angle_deg(pe, e):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
