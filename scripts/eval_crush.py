#!/usr/bin/env python
"""How the H&E and E-cadherin analyzers read crushed marrow, and whether they leave crush out.

``eval_crush.py [DIR [--whole]] [--stain he|ecad] [--phantoms SEEDS] [--others DATA] [--strength NAME ...]
[--set KEY=VALUE ...]``

No real trephine with outlined crush artefact was at hand, so crush is drawn
(:func:`marrowseg.synth.crush_field`: squeezed, stretched and smeared by Beer-Lambert absorbance) onto
real fields (the ``*.png`` images of DIR at ``--mpp``: H&E marrow ``../shared/data/mbm-dev``, whose four
crops per source image ``--whole`` joins; DAB IHC ``../shared/data/ihc-ki67``) and onto phantoms of the
stain. For each field and strength the analyzer (``--set`` applies) reads the intact field alone (its
area left out as crush is all false), and the intact field with a crushed copy of it joined below (a
core crushed along one side), with the stain's ``tissue...crush`` as configured and off: two readouts
against the intact field's (H&E: cellularity and late erythroid precursors per 100 nucleated cells;
E-cadherin: the left-shift ratio and late erythroid per 100), the share of the crushed band's tissue
left out (``band found``) and of the intact part's marrow (``intact part lost``).

``--others DATA`` also reads other real tissue for area left out as crush: H&E ``DATA/monuseg/*.tif``,
``DATA/wsi/CMU-1-Small-Region.svs``, ``DATA/wsi/OS-1-detail.ome.tif``; E-cadherin ``DATA/wsi/OS-2-ndpi.ome.tif``.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

import numpy as np

from marrowseg.analyzers import get_analyzer
from marrowseg.config import Config, load_config, parse_overrides
from marrowseg.engine import analyze_array
from marrowseg.io import open_slide
from marrowseg.synth import crush_field, make_phantom, parse_seeds

#: drawn crush strengths: (stretch, squeeze, smear_um, wave_um)
STRENGTHS = {
    "mild": (1.3, 0.6, 4.0, 3.0),
    "moderate": (1.6, 0.45, 8.0, 2.0),
    "strong": (2.0, 0.35, 12.0, 2.0),
}


def _read(path: Path, mpp: float | None = None) -> tuple[np.ndarray, float]:
    """The whole of a small image or slide's level 0, and its pixel size (``mpp`` where it has none)."""
    with open_slide(path, mpp=mpp) as reader:
        w, h = reader.dimensions
        return np.asarray(reader.read_region(0, 0, w, h, reader.mpp)), float(reader.mpp)


def whole_images(crops: list[Path], mpp: float) -> list[tuple[str, np.ndarray]]:
    """The source images of the MBM crops: each source's four crops ``_000``-``_003`` are its
    quadrants (top-left, top-right, bottom-left, bottom-right; their edges join without a seam)."""
    groups: dict[str, list[Path]] = {}
    for p in crops:
        groups.setdefault(p.stem.rsplit("_", 1)[0], []).append(p)
    out = []
    for stem, ps in sorted(groups.items()):
        if [p.stem[-3:] for p in sorted(ps)] != ["000", "001", "002", "003"]:
            continue
        q = [_read(p, mpp)[0] for p in sorted(ps)]
        out.append((stem, np.vstack([np.hstack(q[:2]), np.hstack(q[2:])])))
    return out


#: per stain: the config key of the crush rule, the two readouts compared and their names
STAIN_SETUP = {
    "he": ("he.tissue.crush", ("cellularity_pct", "late_per_100"), "cellularity, late per 100"),
    "ecad": ("ecad.tissue.classes.crush", ("left_shift_ratio", "late_per_100"), "left shift, late per 100"),
}


def measure(rgb: np.ndarray, mpp: float, cfg: Config, stain: str) -> dict:
    """Readouts, crush area (µm²) and the tissue label map (resized to the field) of one field."""
    import cv2

    analyzer = get_analyzer(stain, cfg)
    res = analyze_array(rgb, mpp, analyzer, cfg, device="cpu", workers=0)
    t, ro = res.totals, dict(res.readouts)
    n = ro.get("nucleated_cells") or 0
    ro["late_per_100"] = 100.0 * float(t.get("n_late_erythroid", 0)) / n if n else None
    px_um2 = float(getattr(cfg, stain).mpp) ** 2
    labels = cv2.resize(np.asarray(res.maps["labels"], np.uint8), (rgb.shape[1], rgb.shape[0]),
                        interpolation=cv2.INTER_NEAREST)
    crush_um2 = float(t.get("crush_px", 0)) * px_um2
    return {"crush_um2": crush_um2, "labels": labels, "tissue_um2": float(np.count_nonzero(labels)) * mpp**2 + crush_um2,
            "a": ro.get(STAIN_SETUP[stain][1][0]), "b": ro.get(STAIN_SETUP[stain][1][1])}


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("images_dir", type=Path, nargs="?", default=None, help="folder of real fields (*.png)")
    ap.add_argument("--stain", choices=sorted(STAIN_SETUP), default="he")
    ap.add_argument("--mpp", type=float, default=0.25, help="pixel size of the crops, µm/px")
    ap.add_argument("--whole", action="store_true", help="join each source image's four MBM crops (its quadrants)")
    ap.add_argument("--phantoms", default=None, metavar="SEEDS",
                    help="phantoms, e.g. 1000-1004 (H&E 1,024 px at 0.5 µm/px, E-cadherin 2,048 px at 0.25)")
    ap.add_argument("--cellularity", type=float, default=None, help="phantom cellularity, %% (H&E default 60)")
    ap.add_argument("--left-shift", type=float, default=0.3, help="E-cadherin phantom left-shift ratio")
    ap.add_argument("--strength", action="append", choices=sorted(STRENGTHS), default=None)
    ap.add_argument("--others", type=Path, default=None, metavar="DATA", help="../shared/data: other organs' tissue")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    strengths = args.strength or ["moderate"]
    stain = args.stain
    key, _, names = STAIN_SETUP[stain]
    cfg = load_config(stain, overrides=parse_overrides(args.set))
    off = load_config(stain, overrides=parse_overrides([*args.set, f"{key}=null"]))

    fields: list[tuple[str, np.ndarray, float]] = []
    if args.images_dir is not None:
        # truth files beside the images: MBM dots, DeepLIIF masks
        crops = [p for p in sorted(args.images_dir.glob("*.png")) if "_dots" not in p.name and not p.stem.endswith("_gt")]
        if args.whole:
            for stem, rgb in whole_images(crops, args.mpp):
                fields.append((stem, rgb, args.mpp))
        else:
            fields += [(p.stem, _read(p, args.mpp)[0], args.mpp) for p in crops]
    if args.phantoms:
        side, mpp = (1024, 0.5) if stain == "he" else (2048, 0.25)
        kw = {"cellularity_pct": args.cellularity or 60.0} if stain == "he" else {
            "left_shift_ratio": args.left_shift, "cellularity_pct": args.cellularity}
        for seed in parse_seeds(args.phantoms):
            ph = make_phantom(stain, seed=seed, size_px=(side, side), mpp=mpp, **kw)
            fields.append((f"phantom {seed}", ph.render(0, 0, side, side), mpp))

    print(f"| field | strength | intact: {names} | + crushed band, rule off | rule on | band found | intact part lost |")
    print("|---|---|---|---|---|---|---|")
    found_by: dict[str, list[float]] = {s: [] for s in strengths}
    err_by: dict[str, list[tuple[float, float]]] = {s: [] for s in strengths}
    lost_px = lost_of = 0
    false_um2 = 0.0
    for name, rgb, mpp in fields:
        intact = measure(rgb, mpp, cfg, stain)
        false_um2 += intact["crush_um2"]
        for s in strengths:
            stretch, squeeze, smear, wave = STRENGTHS[s]
            band = crush_field(rgb, mpp, stretch=stretch, squeeze=squeeze, smear_um=smear, wave_um=wave,
                               seed=zlib.crc32(name.encode()) % 1000)
            both = np.vstack([rgb, band])
            a, b = measure(both, mpp, off, stain), measure(both, mpp, cfg, stain)
            h = rgb.shape[0]
            tissue_b = a["labels"][h:] != 0
            found = float((b["labels"][h:][tissue_b] == 0).mean()) if tissue_b.any() else 0.0
            marrow_i = np.isin(a["labels"][:h], (1, 2))
            lost = int((b["labels"][:h][marrow_i] == 0).sum())
            lost_px, lost_of = lost_px + lost, lost_of + int(marrow_i.sum())
            found_by[s].append(found)
            if intact["a"] is not None and a["a"] is not None and b["a"] is not None:
                err_by[s].append((a["a"] - intact["a"], b["a"] - intact["a"]))
            spec = ".1f" if stain == "he" else ".3f"
            print(f"| {name} | {s} | {_fmt(intact['a'], spec)}, {_fmt(intact['b'])} | "
                  f"{_fmt(a['a'], spec)}, {_fmt(a['b'])} | {_fmt(b['a'], spec)}, {_fmt(b['b'])} | "
                  f"{found:.2f} | {lost / max(int(marrow_i.sum()), 1):.3f} |")
    for s in strengths:
        f = np.asarray(found_by[s])
        if f.size:
            e = np.abs(np.asarray(err_by[s])) if err_by[s] else np.zeros((0, 2))
            what = names.split(",")[0]
            print(f"{s}: band found {f.mean():.2f} mean (min {f.min():.2f}); {what} off the intact field's, "
                  f"mean abs {e[:, 0].mean():.3g} -> {e[:, 1].mean():.3g} (max {e[:, 0].max():.3g} -> "
                  f"{e[:, 1].max():.3g})" if e.size else f"{s}: band found {f.mean():.2f}")
    if fields:
        print(f"intact fields alone: {false_um2:.0f} µm² left out "
              f"as crush; intact parts beside a band: {lost_px / max(lost_of, 1):.4f} of their marrow")

    if args.others is not None:
        if stain == "he":
            others = sorted((args.others / "monuseg").glob("*.tif"))
            others += [args.others / "wsi" / "CMU-1-Small-Region.svs", args.others / "wsi" / "OS-1-detail.ome.tif"]
        else:
            others = [args.others / "wsi" / "OS-2-ndpi.ome.tif"]
        print("| other tissue | crush µm² | tissue µm² |")
        print("|---|---|---|")
        for p in others:
            rgb, mpp = _read(p, 0.25 if p.parent.name == "monuseg" else None)  # MoNuSeg: 40x, no size in the file
            m = measure(rgb, mpp, cfg, stain)
            print(f"| {p.name} | {m['crush_um2']:.0f} | {m['tissue_um2']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
