#!/usr/bin/env python
"""CPU and CUDA give the same analysis: one phantom per stain run on both, compared.

For each stain a phantom (default 4,096 px at 0.25 µm/px) is analysed by the engine on the CPU
and on the other device (CUDA by default; with mixed precision where the analyzer allows it, and
once more with it off), and the runs are compared with the CPU run: every slide-level sum
(areas, counts, lengths) as a relative difference (sums under 100 against 100), every numeric
readout (values under 0.01 against 0.01), and the cells (share of CPU
cells with a cell of the other run within 1 px, and of those the share with the same class).
Wall seconds of each run are printed too (with CUDA start-up; `scripts/benchmark.py` measures
throughput).

Usage::

    python scripts/gpu_check.py --json gpu_check.json
    python scripts/gpu_check.py --other cpu --size 2048     # a dry run of this script without a GPU
    python scripts/gpu_check.py --other-set engine.post_threads=1     # CUDA with one post thread
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

_PARAMS = {"he": {"cellularity_pct": 50.0}, "ecad": {"left_shift_ratio": 0.3}, "reticulin": {"grade": 2}}


def run(path: Path, stain: str, device: str, overrides: list[str]) -> dict:
    """The engine on ``device``; totals, readouts, cells and wall seconds."""
    from marrowseg.analyzers import get_analyzer
    from marrowseg.config import load_config
    from marrowseg.engine import MemorySink, run_slide
    from marrowseg.io import open_slide

    cfg = load_config(stain, overrides=[f"engine.device={device}", *overrides])
    t0 = time.perf_counter()
    with open_slide(path) as reader:
        sink = MemorySink()
        res = run_slide(reader, get_analyzer(stain, cfg), cfg, sink=sink)
    cells = sink.cells if isinstance(sink.cells, dict) else {}
    return {"seconds": time.perf_counter() - t0, "totals": res.totals, "readouts": res.readouts,
            "cells": cells, "device": res.provenance["device"]}


def _rel(a: float, b: float, floor: float) -> float:
    # the floor keeps a count of 2 against 3, or a fraction of 0 against 1e-5, from reading as 50 % or infinite
    return abs(a - b) / max(abs(a), floor)


def compare(ref: dict, other: dict) -> dict:
    """Largest relative differences of sums and readouts, and cell agreement, of ``other`` to ``ref``."""
    sums = {k: _rel(float(v), float(other["totals"].get(k, 0)), 100.0) for k, v in ref["totals"].items()}
    reads = {k: _rel(float(v), float(other["readouts"][k]), 0.01) for k, v in ref["readouts"].items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(other["readouts"].get(k), (int, float))}
    worst_sum = max(sums, key=sums.get) if sums else None
    worst_read = max(reads, key=reads.get) if reads else None
    out = {"max_rel_sum": sums.get(worst_sum, 0.0), "worst_sum": worst_sum,
           "max_rel_readout": reads.get(worst_read, 0.0), "worst_readout": worst_read,
           "mf_grade": (ref["readouts"].get("mf_grade"), other["readouts"].get("mf_grade"))}
    a, b = ref["cells"], other["cells"]
    if a.get("x") is not None and len(a["x"]) and b.get("x") is not None and len(b["x"]):
        pa = np.column_stack([a["x"], a["y"]]).astype(float)
        pb = np.column_stack([b["x"], b["y"]]).astype(float)
        d, j = cKDTree(pb).query(pa, distance_upper_bound=1.0)
        hit = np.isfinite(d)
        out.update(cells=(len(pa), len(pb)), cells_matched=float(hit.mean()),
                   class_agree=float((np.asarray(a["class"])[hit] == np.asarray(b["class"])[j[hit]]).mean()) if hit.any() else 0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stains", default="he,ecad,reticulin")
    ap.add_argument("--size", type=int, default=4096, help="phantom side, px at 0.25 µm/px")
    ap.add_argument("--other", default="cuda", help="device compared with the CPU")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--other-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the other device's runs, e.g. engine.batch_size=8")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    from marrowseg.engine import versions
    from marrowseg.synth import write_phantom

    if args.other.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to compare (use --other cpu for a dry run)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stain in args.stains.split(","):
            path, _ = write_phantom(tmp, stain, name=f"check_{stain}", seed=args.seed,
                                    size_px=(args.size, args.size), mpp=0.25, **_PARAMS[stain])
            ref = run(path, stain, "cpu", [])
            runs = {"default": run(path, stain, args.other, args.other_set)}
            if runs["default"]["device"].get("amp"):
                runs["no amp"] = run(path, stain, args.other, [*args.other_set, "engine.amp=false"])
            for name, r in runs.items():
                row = {"stain": stain, "run": f"{args.other} {name}", "cpu_s": ref["seconds"],
                       "other_s": r["seconds"], "amp": r["device"].get("amp"), **compare(ref, r)}
                rows.append(row)
                print(json.dumps(row, default=str), flush=True)
    print("\n| stain | run | CPU s | other s | max rel. sum (key) | max rel. readout (key) | cells CPU/other | matched | same class | grade |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = r.get("cells", ("-", "-"))
        print(f"| {r['stain']} | {r['run']} | {r['cpu_s']:.1f} | {r['other_s']:.1f} | {r['max_rel_sum']:.1e} ({r['worst_sum']}) "
              f"| {r['max_rel_readout']:.1e} ({r['worst_readout']}) | {cells[0]}/{cells[1]} | "
              f"{r.get('cells_matched', float('nan')):.4f} | {r.get('class_agree', float('nan')):.4f} | {r['mf_grade']} |")
    if args.json:
        args.json.write_text(json.dumps({"versions": versions(), "device": torch.cuda.get_device_name(0)
                                         if torch.cuda.is_available() else None, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
