"""Slides per hour of ``marrowseg batch`` with 1 and 2 local Dask workers (and serial).

Usage::

    python scripts/batch_scaling.py [--slides 6] [--size 1024] [--workers 1 2]

Writes small H&E phantoms (``--size`` px square at 0.5 µm/px) to a temporary folder, runs
the batch into a fresh output folder per setting and prints slides/hour. Cluster start-up
time is included (it is part of what a user waits for).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from marrowseg.batch import run_batch
from marrowseg.synth import write_phantom

SETS = ["engine.workers=0", "engine.device=cpu"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--serial", action="store_true", help="also time the serial (no Dask) run")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="marrowseg-scaling-"))
    try:
        for i in range(args.slides):
            write_phantom(root / "in", "he", name=f"s{i}_he", seed=200 + i, size_px=(args.size, args.size), mpp=0.5)
        runs = [("serial", None, 1)] if args.serial else []
        runs += [(f"dask local, {w} worker{'s' if w > 1 else ''}", "local", w) for w in args.workers]
        print(f"{args.slides} H&E phantoms of {args.size}x{args.size} px at 0.5 µm/px")
        for label, cluster, w in runs:
            out = root / f"out-{label.replace(' ', '_').replace(',', '')}"
            t0 = time.perf_counter()
            res = run_batch(root / "in", out, workers=w, cluster=cluster, sets=SETS)
            dt = time.perf_counter() - t0
            assert res.n_ok == args.slides, [r["reason"] for r in res.rows if r["status"] != "ok"]
            print(f"{label:24s} {dt:7.1f} s  {args.slides / dt * 3600:7.0f} slides/h")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
