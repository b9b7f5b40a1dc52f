"""Accuracy of automatic stain recognition (marrowseg.stain_id) on phantoms and real images.

Usage::

    python scripts/eval_stain_id.py [--seeds 5] [--data ../shared/data] [--features]

Phantoms of every stain (several seeds, two pixel sizes) are rendered in memory; real images
are read from the shared data folder (skipped when absent). Prints one line per image with
--features, then accuracy per source. Expected classes: H&E sources -> he, DAB IHC (Ki67,
E-cadherin) -> ecad, Gomori silver -> reticulin.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from marrowseg.errors import MarrowsegError
from marrowseg.io import open_slide
from marrowseg.stain_id import identify_stain
from marrowseg.synth import make_phantom

REPO = Path(__file__).resolve().parents[1]

#: (source, glob under the data folder, expected stain, mpp to assume)
REAL = (
    ("mbm-dev H&E", "mbm-dev/BM_GRAZ_HE_*_0[0-9][0-9].png", "he", 0.25),
    ("monuseg H&E", "monuseg/*.tif", "he", 0.25),
    ("wsi H&E (CMU-1, OS-1)", "wsi/[CO][MS]*-1*", "he", None),
    ("ihc-ki67 DAB", "ihc-ki67/[0-9]*_[0-9].png", "ecad", 0.25),
    ("wsi OS-2 Ki67 DAB", "wsi/OS-2*", "ecad", None),
    ("reticulin-bombr silver", "reticulin-bombr/fig0_image.png", "reticulin", 1.0),
)


def _phantoms(seeds: int):
    for stain in ("he", "ecad", "reticulin"):
        for mpp in (0.5, 2.0):
            for seed in range(seeds):
                ph = make_phantom(stain, seed=100 + seed, size_px=(768, 768), mpp=mpp)
                yield f"phantom {stain}", f"{stain} seed {100 + seed} @{mpp}", stain, ph.render(0, 0, 768, 768)


def _real(data: Path):
    for source, pattern, stain, mpp in REAL:
        files = sorted(p for p in data.glob(pattern) if "_dots_" not in p.name and not p.name.endswith("_gt.png"))
        if not files:
            print(f"# {source}: no files under {data}/{pattern} (skipped)", file=sys.stderr)
        for path in files:
            with open_slide(path, mpp=mpp) as reader:
                yield source, path.name, stain, reader.thumbnail(1024)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--features", action="store_true", help="print each image's features and scores")
    args = ap.parse_args()
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # right, wrong, unknown
    for source, name, truth, rgb in [*_phantoms(args.seeds), *_real(args.data)]:
        try:
            g = identify_stain(rgb)
            got, conf = g.stain, g.confidence
        except MarrowsegError as exc:
            got, conf, g = None, 0.0, None
            print(f"{source:24s} {name:36s} error: {exc}")
        h = hits[source]
        h[0 if got == truth else (2 if got is None else 1)] += 1
        if args.features and g is not None:
            f = g.features
            print(f"{source:24s} {name[:36]:36s} -> {str(got):9s} conf {conf:.2f} "
                  f"[{', '.join(f'{k} {v:.2f}' for k, v in g.scores.items())}] "
                  f"blue {f['blue_frac']:.2f} pink {f['pink_frac']:.2f} brown {f['brown_frac']:.2f} "
                  f"chroma {f['chroma_ratio']:.2f} dark {f['dark_frac']:.3f} neutral_dark {f['neutral_dark_frac']:.2f}")
    print(f"{'source':28s} {'n':>4s} {'correct':>8s} {'wrong':>6s} {'unknown':>8s} {'accuracy':>9s}")
    tot = np.zeros(3, int)
    for source, (r, w, u) in hits.items():
        n = r + w + u
        tot += (r, w, u)
        print(f"{source:28s} {n:4d} {r:8d} {w:6d} {u:8d} {r / n:9.1%}")
    n = int(tot.sum())
    print(f"{'all':28s} {n:4d} {tot[0]:8d} {tot[1]:6d} {tot[2]:8d} {tot[0] / n:9.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
