#!/usr/bin/env python
"""Check the DAB positive/negative call of the E-cadherin analyzer on Ki67 IHC tiles.

``eval_ki67.py DIR [--mpp 0.25] [--set KEY=VALUE ...]``

DIR holds ``NAME.png`` tiles and ``NAME_gt.png`` masks (DeepLIIF layout: red = positive
nucleus, blue = negative nucleus, green = outline). Ki67 is nuclear, so the analyzer runs
with ``ecad.positivity_compartment=nucleus`` through :func:`marrowseg.pipeline.analyze_slide`,
the path of ``marrowseg analyze TILE --stain ecad --mpp 0.25 --set
ecad.positivity_compartment=nucleus``, and its ``class`` column is read (``ecad_pos`` is
positive, every other class negative).

Matching: each ground-truth nucleus is a connected red or blue region; a detection matches
the region that contains its centre (at most one detection per region, the one nearest to
the region's centroid). Reported per tile and pooled: detection recall (matched regions /
regions), detection precision (matched detections / detections), the F1 of the
positive class among matched pairs (``F1+``), and the stricter ``F1+all`` that also counts a
positive nucleus without a detection as a miss and an unmatched detection called positive as a
false positive. The DeepLIIF tiles do not outline every nucleus: on 34_3 most unmatched positive
calls sit on brown nuclei without an outline (checked by eye), so ``F1+all`` is a lower bound.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from marrowseg.config import load_config
from marrowseg.pipeline import analyze_slide


def read_gt(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Regions of a DeepLIIF mask: labels (H, W) int32 and positive flag per label (index 0 unused)."""
    from skimage import io

    g = np.asarray(io.imread(path))[..., :3].astype(np.int16)
    r, gr, b = g[..., 0], g[..., 1], g[..., 2]
    red = (r > 128) & (gr < 100) & (b < 100)
    blue = (b > 128) & (r < 100) & (gr < 100)
    labels, n = ndi.label(red | blue)
    pos = np.zeros(n + 1, bool)
    if n:
        red_frac = ndi.mean(red.astype(np.float64), labels, index=np.arange(1, n + 1))
        pos[1:] = np.asarray(red_frac) > 0.5
    return labels.astype(np.int32), pos


def match(labels: np.ndarray, det_rc: np.ndarray) -> np.ndarray:
    """Ground-truth label matched by each detection (0: none), one detection per label."""
    h, w = labels.shape
    out = np.zeros(len(det_rc), np.int64)
    if len(det_rc) == 0:
        return out
    r = np.clip(np.round(det_rc[:, 0]).astype(int), 0, h - 1)
    c = np.clip(np.round(det_rc[:, 1]).astype(int), 0, w - 1)
    hit = labels[r, c]
    n = int(labels.max())
    cen = np.array(ndi.center_of_mass(np.ones_like(labels), labels, np.arange(1, n + 1))).reshape(-1, 2)
    best: dict[int, tuple[float, int]] = {}
    for i, lab in enumerate(hit):
        if lab == 0:
            continue
        d = float(np.hypot(*(det_rc[i] - cen[lab - 1])))
        if lab not in best or d < best[lab][0]:
            best[lab] = (d, i)
    for lab, (_, i) in best.items():
        out[i] = lab
    return out


def evaluate(image: Path, gt: Path, mpp: float, sets: list[str], od_scale: float = 1.0) -> dict[str, float]:
    config = load_config("ecad", overrides=["ecad.positivity_compartment=nucleus", *sets])
    with tempfile.TemporaryDirectory() as tmp:
        if od_scale != 1.0:
            from eval_cell_detection import read_rgb
            from skimage import io

            from marrowseg.stains import restain

            image_scaled = Path(tmp) / image.name
            io.imsave(image_scaled, restain(read_rgb(image), od_scale), check_contrast=False)
            image = image_scaled
        _, result = analyze_slide(image, "ecad", Path(tmp) / "out", mpp=mpp, config=config)
        cells = result.cells
    labels, gpos = read_gt(gt)
    det = np.column_stack([cells["y"], cells["x"]]) if len(cells.get("x", ())) else np.zeros((0, 2))
    pred_pos = np.asarray(cells.get("class", []), dtype=str) == "ecad_pos"
    m = match(labels, det)
    ok = m > 0
    truth = gpos[m[ok]]
    pred = pred_pos[ok]
    tp = int((truth & pred).sum())
    fp = int((~truth & pred).sum())
    fn = int((truth & ~pred).sum())
    n_gt = int(labels.max())
    pos_missed = int(gpos[1:].sum()) - int(truth.sum())  # positive nuclei with no detection
    fp_unmatched = int((pred_pos & ~ok).sum())
    return {
        "gt_nuclei": n_gt, "gt_pos": int(gpos[1:].sum()), "detections": len(det), "matched": int(ok.sum()),
        "recall": ok.sum() / max(n_gt, 1), "precision": ok.sum() / max(len(det), 1),
        "tp": tp, "fp": fp, "fn": fn, "f1_pos": 2 * tp / max(2 * tp + fp + fn, 1),
        "fp_all": fp + fp_unmatched, "fn_all": fn + pos_missed,
        "f1_pos_all": 2 * tp / max(2 * tp + fp + fp_unmatched + fn + pos_missed, 1),
        "vectors": result.report.get("stain_vectors_source"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--mpp", type=float, default=0.25, help="pixel size of the tiles, µm/px")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    ap.add_argument("--od-scale", type=float, default=1.0, metavar="F",
                    help="multiply every optical density of the tiles by F (a paler or darker staining run)")
    args = ap.parse_args(argv)
    tiles = sorted(p for p in args.dir.glob("*.png") if not p.stem.endswith("_gt"))
    tiles = [p for p in tiles if (p.parent / f"{p.stem}_gt.png").exists()]
    if not tiles:
        print(f"{args.dir}: no NAME.png with NAME_gt.png", file=sys.stderr)
        return 1
    print(f"{'tile':<12}{'gt':>5}{'gt+':>5}{'det':>5}{'match':>6}{'recall':>8}{'prec':>7}{'tp':>4}{'fp':>4}{'fn':>4}{'F1+':>7}{'F1+all':>8}  vectors")
    tot = {"gt_nuclei": 0, "detections": 0, "matched": 0, "tp": 0, "fp": 0, "fn": 0, "gt_pos": 0, "fp_all": 0,
           "fn_all": 0}
    for p in tiles:
        r = evaluate(p, p.parent / f"{p.stem}_gt.png", args.mpp, args.set, args.od_scale)
        for k in tot:
            tot[k] += r[k]
        print(f"{p.stem:<12}{r['gt_nuclei']:>5}{r['gt_pos']:>5}{r['detections']:>5}{r['matched']:>6}{r['recall']:>8.3f}"
              f"{r['precision']:>7.3f}{r['tp']:>4}{r['fp']:>4}{r['fn']:>4}{r['f1_pos']:>7.3f}{r['f1_pos_all']:>8.3f}  {r['vectors']}")
    f1 = 2 * tot["tp"] / max(2 * tot["tp"] + tot["fp"] + tot["fn"], 1)
    f1_all = 2 * tot["tp"] / max(2 * tot["tp"] + tot["fp_all"] + tot["fn_all"], 1)
    print(f"{'pooled':<12}{tot['gt_nuclei']:>5}{tot['gt_pos']:>5}{tot['detections']:>5}{tot['matched']:>6}"
          f"{tot['matched'] / max(tot['gt_nuclei'], 1):>8.3f}{tot['matched'] / max(tot['detections'], 1):>7.3f}"
          f"{tot['tp']:>4}{tot['fp']:>4}{tot['fn']:>4}{f1:>7.3f}{f1_all:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
