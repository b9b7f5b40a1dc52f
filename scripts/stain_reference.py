#!/usr/bin/env python
"""Estimate the reference H&E stain vectors (``he.stain.reference_h`` / ``reference_e``) from a folder of images.

``stain_reference.py DIR [--mpp 0.25] [--each] [--set KEY=VALUE ...]``

Every PNG/TIFF image in DIR (files named ``*_dots_*`` are skipped) is read at the H&E analysis
resolution (``he.mpp``) as ``marrowseg analyze`` reads it, and its pixels are pooled; the Macenko estimate of the pool,
with the analyzer's own settings (``he.stain.macenko_min_od``, ``macenko_percentile``), is the
reference. With MBM-style names (``..._PPPP_...``) the estimate of each patient and of each
leave-one-patient-out pool is printed too, with its angle to the reference: how much the
reference would move had one patient been kept aside. ``--each`` prints every image's own estimate
as an ``--hue`` value for ``eval_cell_detection.py`` (another lab's hue, from its own slide).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from marrowseg.config import load_config, parse_overrides
from marrowseg.io import open_slide
from marrowseg.stains import (
    RUIFROK_E,
    RUIFROK_H,
    angle_deg,
    estimate_two_stains,
    od_from_rgb,
    stain_matrix,
    white_balance,
    white_point,
)


def read_od(path: Path, mpp: float, analysis_mpp: float, tissue_cfg) -> np.ndarray:
    """(N, 3) OD pixels of a whole image at the analysis resolution, read as the engine reads it
    (brought to its white point when ``tissue.white_balance`` is on; an image is a field, all tissue)."""
    with open_slide(path, mpp=mpp) as reader:
        w, h = reader.dimensions
        f = mpp / analysis_mpp
        rgb = reader.read_region(0, 0, max(1, round(w * f)), max(1, round(h * f)), analysis_mpp)
    if tissue_cfg.white_balance:
        rgb = white_balance(rgb, white_point(rgb, min_level=tissue_cfg.white_min_level))
    return od_from_rgb(rgb).reshape(-1, 3)


def estimate(od: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """(h, e) Macenko vectors of OD pixels, paired with Ruifrok's as the analyzer pairs them."""
    vecs, info = estimate_two_stains(od, min_od=cfg.macenko_min_od, percentile=cfg.macenko_percentile,
                                     reference=stain_matrix(RUIFROK_H, RUIFROK_E))
    if vecs is None:
        raise SystemExit(f"no estimate: {info}")
    return vecs[0], vecs[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images_dir", type=Path)
    ap.add_argument("--mpp", type=float, default=0.25, help="pixel size of the images, µm/px")
    ap.add_argument("--each", action="store_true", help="also each image's estimate, written as an --hue value")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. tissue.white_balance=false (read against 255, not the white point)")
    args = ap.parse_args(argv)
    config = load_config("he", overrides=parse_overrides(args.set))
    cfg = config.he
    paths = sorted(p for p in args.images_dir.iterdir()
                   if p.suffix.lower() in (".png", ".tif", ".tiff") and "_dots_" not in p.name)
    if not paths:
        ap.error(f"{args.images_dir}: no PNG or TIFF images")
    od_by_image = {p.name: read_od(p, args.mpp, cfg.mpp, config.tissue) for p in paths}
    h, e = estimate(np.concatenate(list(od_by_image.values())), cfg.stain)
    ruifrok = stain_matrix(RUIFROK_H, RUIFROK_E)
    print(f"{len(paths)} images at {cfg.mpp} µm/px")
    print(f"reference_h: [{h[0]:.3f}, {h[1]:.3f}, {h[2]:.3f}]   ({angle_deg(h, ruifrok[0]):.1f} deg from Ruifrok)")
    print(f"reference_e: [{e[0]:.3f}, {e[1]:.3f}, {e[2]:.3f}]   ({angle_deg(e, ruifrok[1]):.1f} deg from Ruifrok)")
    if args.each:
        print("| image | H deg to the pooled estimate | E deg to the pooled estimate | --hue |")
        print("|---|---|---|---|")
        for name, od in od_by_image.items():
            ih, ie = estimate(od, cfg.stain)
            hue = ",".join(f"{v:.4f}" for v in ih) + ":" + ",".join(f"{v:.4f}" for v in ie)
            print(f"| {name} | {angle_deg(ih, h):.1f} | {angle_deg(ie, e):.1f} | {hue} |")
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
