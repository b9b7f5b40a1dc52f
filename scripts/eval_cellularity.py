"""Cellularity, bone fraction and tissue-class pixel agreement of the H&E analyzer on phantoms.

``eval_cellularity.py --seeds 1000-1004 --sizes 1024@0.5,4096@0.25 --cellularity 10,50,95 [--od-scale F]``
    Per (size, cellularity, seed): truth and measured cellularity (haematopoietic /
    (haematopoietic + fat) x 100) and bone fraction (bone / (bone + haematopoietic + fat)),
    both through the engine as ``marrowseg analyze``, and per-class pixel agreement of the
    label map with the phantom's truth labels (recall of each truth class; background
    truth is compared with ``excluded``). Seeds >= 1000 are held out; tune on 0-99.
    ``--cellularity default`` uses the generator's own cellularity. ``--haemorrhage PCT`` gives
    the phantoms lakes of spilled blood (about PCT % of the marrow space; truth label 4, which
    belongs to ``excluded`` here) and adds a column: the share of them read as bone.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from marrowseg.analyzers.he import HEAnalyzer
from marrowseg.config import Config, load_config, parse_overrides
from marrowseg.stains import restain
from marrowseg.synth import parse_seeds

CLASS_NAMES = ("excluded", "haem", "fat", "bone")


def parse_sizes(spec: str) -> list[tuple[int, float]]:
    """``"1024@0.5,4096@0.25"`` -> [(1024, 0.5), (4096, 0.25)] (side px @ µm/px)."""
    out = []
    for part in spec.split(","):
        px, _, mpp = part.partition("@")
        out.append((int(px), float(mpp)))
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def fractions(counts: np.ndarray) -> tuple[float, float]:
    """(cellularity_pct, bone_frac) from class pixel counts (excluded, haem, fat, bone)."""
    marrow = counts[1] + counts[2]
    cell = 100.0 * counts[1] / marrow if marrow else float("nan")
    tot = marrow + counts[3]
    return cell, (counts[3] / tot if tot else float("nan"))


def agreement(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(4,) recall of each truth class in ``pred`` (nan where the class is absent)."""
    out = np.full(4, np.nan)
    for c in range(4):
        m = truth == c
        if m.any():
            out[c] = float(np.mean(pred[m] == c))
    return out


def run_one(seed: int, size_px: int, mpp: float, cellularity: float | None, cfg: Config,
            haemorrhage: float = 0.0, od_scale: float = 1.0) -> dict:
    from marrowseg import synth
    from marrowseg.engine import analyze_array

    kw = {} if cellularity is None else {"cellularity_pct": cellularity}
    ph = synth.make_phantom("he", seed=seed, size_px=(size_px, size_px), mpp=mpp, haemorrhage_pct=haemorrhage, **kw)
    truth = ph.truth_region(0, 0, size_px, size_px)["labels"]
    spilled = truth == 4
    truth = np.where(spilled, np.uint8(0), truth)  # spilled blood is excluded from the marrow space
    rgb = ph.render(0, 0, size_px, size_px)
    if od_scale != 1.0:
        rgb = restain(rgb, od_scale)
    res = analyze_array(rgb, mpp, HEAnalyzer(cfg.he), cfg, device="cpu")
    t_cell, t_bone = fractions(np.bincount(truth.ravel(), minlength=4))
    r = res.readouts
    row = {"seed": seed, "size": f"{size_px}@{mpp:g}", "c_req": cellularity, "t_cell": t_cell,
           "p_cell": float(r["cellularity_pct"]), "t_bone": t_bone, "p_bone": float(r["bone_area_frac"])}
    lab = res.maps.get("labels")
    if lab is not None:
        # the map holds every k-th analysis pixel from the slide origin: sample truth alike
        step = cfg.he.tissue.class_mpp / mpp
        rr = np.minimum(np.round(np.arange(lab.shape[0]) * step).astype(int), truth.shape[0] - 1)
        cc = np.minimum(np.round(np.arange(lab.shape[1]) * step).astype(int), truth.shape[1] - 1)
        row["agree"] = agreement(np.asarray(lab), truth[np.ix_(rr, cc)])
        sp = spilled[np.ix_(rr, cc)]
        row["blood_as_bone"] = float(np.mean(np.asarray(lab)[sp] == 3)) if sp.any() else float("nan")
    else:
        row["agree"] = np.full(4, np.nan)
        row["blood_as_bone"] = float("nan")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1000-1004", help="phantom seeds (0-99 tuning, >= 1000 held out)")
    ap.add_argument("--sizes", default="1024@0.5,4096@0.25", help="side_px@mpp list")
    ap.add_argument("--cellularity", default="10,30,50,70,95", help="requested cellularity %% list, or 'default'")
    ap.add_argument("--haemorrhage", type=float, default=0.0, metavar="PCT",
                    help="spilled blood, %% of the marrow space (default 0: none)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. he.tissue.envelope_um=60")
    ap.add_argument("--od-scale", type=float, default=1.0, metavar="F",
                    help="multiply every optical density of the phantoms by F (a paler or darker run)")
    args = ap.parse_args(argv)

    base = load_config("he").model_dump(mode="json")
    cfg = Config.model_validate(_merge(base, parse_overrides(args.set)))
    cells = [None] if args.cellularity == "default" else [float(c) for c in args.cellularity.split(",")]
    print("| size px@mpp | req. % | seed | truth cell. % | meas. cell. % | err points | truth bone | meas. bone "
          "| agree excl | agree haem | agree fat | agree bone |" + (" blood as bone |" if args.haemorrhage else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.haemorrhage else ""))
    rows = []
    t0 = time.time()
    for size_px, mpp in parse_sizes(args.sizes):
        for c in cells:
            for seed in parse_seeds(args.seeds):
                r = run_one(seed, size_px, mpp, c, cfg, args.haemorrhage, args.od_scale)
                rows.append(r)
                a = r["agree"]
                print(f"| {r['size']} | {'-' if c is None else f'{c:g}'} | {seed} | {r['t_cell']:.1f} | {r['p_cell']:.1f} "
                      f"| {r['p_cell'] - r['t_cell']:+.1f} | {r['t_bone']:.3f} | {r['p_bone']:.3f} | "
                      + " | ".join(f"{x:.3f}" for x in a) + " |"
                      + (f" {r['blood_as_bone']:.3f} |" if args.haemorrhage else ""), flush=True)
    err = np.array([r["p_cell"] - r["t_cell"] for r in rows])
    berr = np.array([r["p_bone"] - r["t_bone"] for r in rows]) * 100
    agree = np.nanmean(np.array([r["agree"] for r in rows]), axis=0)
    print(f"\ncellularity error, points: mean {err.mean():+.2f}, mean abs {np.abs(err).mean():.2f}, "
          f"max abs {np.abs(err).max():.2f}; within 3: {int((np.abs(err) <= 3).sum())}/{len(err)}")
    print(f"bone fraction error, points: mean {berr.mean():+.2f}, max abs {np.abs(berr).max():.2f}")
    print("mean agreement " + ", ".join(f"{n} {x:.3f}" for n, x in zip(CLASS_NAMES, agree, strict=True)))
    print(f"({time.time() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
