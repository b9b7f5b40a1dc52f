"""Resident memory of a CPU run by tile-worker count and tile size: the analyzers' memory model.

Runs the engine on a generated slide (``benchmark.py``'s phantoms) with 1 and 4 tile workers
at two tile sizes, reads the peak PSS of all processes (shared pages split between them), and
fits ``PSS = main + main_mpx * T + n * (worker + worker_mpx * T)`` (``T`` the tile's Mpx),
the figures of ``Analyzer.memory_model_mb``. Prints one table row per run and the fit.

    python scripts/worker_memory.py --workdir DIR [--side 8192] [--stains he,ecad,reticulin]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import benchmark as bench  # noqa: E402

_RUN = bench._CHILD.replace('overrides=[f"engine.device={device}"]',
                            'overrides=[f"engine.device={device}", *sys.argv[4:]]')


def pss_mb(path: Path, stain: str, workers: int, tile_px: int) -> tuple[float, float]:
    """Peak PSS (MB, all processes) and seconds of one engine run."""
    out = subprocess.run([sys.executable, "-c", _RUN, str(path), stain, "cpu", f"engine.workers={workers}",
                          f"tiling.tile_px={tile_px}"], capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    return doc["tree_pss_kb"] / 1024, doc["seconds"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--side", type=int, default=8192, help="slide side, px at 0.25 µm/px")
    ap.add_argument("--stains", default="he,ecad,reticulin")
    ap.add_argument("--tiles", default="1024,2048", help="two tile sizes, analysis px")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = [int(t) for t in args.tiles.split(",")]
    print("| stain | tile px | workers | peak PSS MB | s |")
    print("|---|---|---|---|---|")
    fits = {}
    for stain in args.stains.split(","):
        path = bench._slide(args.workdir, stain, args.side)
        per = {}
        for tile in sizes:
            for n in (1, 4):
                per[tile, n], sec = pss_mb(path, stain, n, tile)
                print(f"| {stain} | {tile} | {n} | {per[tile, n]:.0f} | {sec:.1f} |", flush=True)
        (t1, t2), m = sizes, [s * s / 1e6 for s in sizes]
        worker = [(per[t, 4] - per[t, 1]) / 3 for t in (t1, t2)]
        main_ = [per[t, 1] - w for t, w in zip((t1, t2), worker, strict=True)]
        w_mpx = (worker[1] - worker[0]) / (m[1] - m[0])
        m_mpx = (main_[1] - main_[0]) / (m[1] - m[0])
        fits[stain] = (main_[0] - m_mpx * m[0], m_mpx, worker[0] - w_mpx * m[0], w_mpx)
    print("\nmemory_model_mb fits (main, main per Mpx, worker, worker per Mpx):")
    for stain, f in fits.items():
        print(f"  {stain}: " + ", ".join(f"{v:.0f}" for v in f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
