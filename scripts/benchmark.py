#!/usr/bin/env python
"""Throughput and memory of the marrowseg engine on generated slides.

For each stain, on one phantom slide (default 16,384 x 16,384 px at 0.25 µm/px, analysed at the
analyzer's resolution):

1. ``decode_mp_s``: read + decode only (DataLoader with the engine's default workers), megapixels of
   tile core per second at the analysis resolution: the I/O limit of this machine;
2. ``pipeline_mp_s``: the full engine on the CPU with its default batch size and workers;
3. ``skimage_mp_s``: a straightforward per-tile NumPy/scikit-image implementation of the same
   analysis (the analyzer's ``reference_dense`` instead of its torch module, serial reads, no
   workers, and the post-processing's exact fast paths swapped back for the plain SciPy /
   scikit-image calls they stand for, :func:`scikit_image_only`) on the same tiles, checked to
   give the same totals;
4. ``peak_rss_mb``: peak resident memory of the full run, summed over the process and its
   DataLoader workers (sampled every 0.1 s; pages shared after the fork count once per process, so
   this is an upper bound), for the slide and for one 4x larger (``--rss-scale 2`` doubles each
   side), to show it is flat; ``peak_rss_largest_process_mb`` is the largest single process, and
   ``peak_pss_mb`` the summed proportional set size (shared pages split among the processes that
   map them: what the run really holds, where RSS counts torch's libraries once per worker);
5. ``gpu_mp_s``: the same run on CUDA when a GPU is present.

Prints a table; ``--json FILE`` writes the figures with the machine and versions.
``--quick`` uses 3,072 px slides for a smoke run of the same table (under a minute once the phantoms are made).

Usage::

    python scripts/benchmark.py [--quick] [--stains he,ecad,reticulin] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _plain_edt(mask, dtype=np.float32, reach=None):
    from scipy import ndimage as ndi

    d = ndi.distance_transform_edt(mask).astype(dtype)
    return d if reach is None else np.minimum(d, dtype(reach + 1))  # the depth tests read no further


def _plain_gaussian(img, sigma_px):
    from scipy import ndimage as ndi

    return ndi.gaussian_filter(img, sigma_px, mode="constant", truncate=3.0)


def _whole_tile_band(labels, inner_px, outer_px, wanted=None):
    """The ring band over the whole tile, then the wanted owners' share (no windows)."""
    from marrowseg.analyzers.distance import nearest_label_band

    bg, rr, cc, owner = nearest_label_band(labels, inner_px, outer_px)
    if wanted is None:
        return bg, rr, cc, owner
    ok = np.isin(owner, wanted)
    return bg, rr[ok], cc[ok], owner[ok]


def _plain_nearest_feature(features, query, reach=None, margin=8):
    """SciPy's feature transform of the whole image, read at the query pixels."""
    from scipy import ndimage as ndi

    d, (ir, ic) = ndi.distance_transform_edt(~np.asarray(features, bool), return_indices=True)
    q = np.asarray(query, bool)
    return d[q], ir[q], ic[q]


def _plain_label_sums(values, labels, n):
    from scipy import ndimage as ndi

    return np.asarray(ndi.sum(np.asarray(values, np.float64), labels, np.arange(1, n + 1)), np.float64).reshape(-1)


def _plain_dilation(mask, footprint, iterations=1):
    from scipy import ndimage as ndi

    for _ in range(iterations):  # single steps: SciPy's own iterations > 1 corrupts memory on small images
        mask = ndi.binary_dilation(mask, structure=footprint)
    return mask


def _plain_opening(mask, footprint):
    from scipy import ndimage as ndi

    return ndi.binary_opening(mask, structure=footprint)


def _plain_closing(mask, footprint):
    from scipy import ndimage as ndi

    return ndi.binary_closing(mask, structure=footprint)


def _plain_peaks(image, size, threshold, search):
    from skimage.feature import peak_local_max

    return peak_local_max(image, min_distance=1, footprint=np.ones((size, size), bool), threshold_abs=threshold,
                          labels=np.asarray(search).astype(np.uint8), exclude_border=False)


def _plain_watershed(image, markers, mask):
    from skimage.segmentation import watershed

    return watershed(image, markers, mask=mask)


def _plain_split(labels, boxes, mpp, h_um, open_sides=None):
    from marrowseg.analyzers.nuclei import split

    return [split._split_box(labels[r0:r1, c0:c1] == lab, mpp, h_um) for lab, r0, r1, c0, c1 in boxes]


@contextmanager
def scikit_image_only():
    """The analyzers' post-processing with its exact fast paths swapped for plain SciPy / scikit-image.

    The way a user would write it with those libraries alone: distance transforms by
    ``ndi.distance_transform_edt``, binary morphology by ``ndi.binary_*``, peak candidates by
    ``peak_local_max``, Gaussians by ``ndi.gaussian_filter``, one ``watershed`` call per region,
    nuclear splitting box by box, the
    E-cadherin ring band over the whole tile (not only where the cells it is for are nearest) and
    its distances from OpenCV's precise transform of the whole tile (not the band-limited
    separable one), nearest features by SciPy's whole-image feature transform (not in windows),
    per-label sums by ``ndi.sum``. Each
    fast path is tested equal to the call it replaces (tests/test_distance.py,
    test_morphology.py, test_nuclei.py, test_nuclei_speed.py), and the totals are compared
    below. The rest of the post-processing (labelling, measurements, the ring band's nearest
    labels) is shared with the pipeline.
    """
    from marrowseg.analyzers import distance, fibres, tissue
    from marrowseg.analyzers.ecad import membrane
    from marrowseg.analyzers.fibres import overlap, skeleton, width
    from marrowseg.analyzers.nuclei import detect, faint, lobes, seeds, split
    from marrowseg.analyzers.reticulin import analyzer as reticulin

    # each fast path is swapped in every module that calls it by name
    swaps = [(membrane, "nearest_label_band", _whole_tile_band),
             (distance, "_SEPARABLE_MAX_PX", -1),  # the band's distances by OpenCV's precise whole-tile transform
             (width, "nearest_feature", _plain_nearest_feature), (tissue, "nearest_feature", _plain_nearest_feature),
             (skeleton, "label_sums", _plain_label_sums), (fibres, "label_sums", _plain_label_sums),
             *[(mod, "distance_to_background", _plain_edt) for mod in (detect, lobes, split, faint, tissue, width,
                                                                      reticulin)],
             *[(mod, "gaussian_zero_border", _plain_gaussian) for mod in (overlap, width, fibres)],
             (skeleton, "binary_dilation", _plain_dilation), (width, "binary_dilation", _plain_dilation),
             (tissue, "binary_opening", _plain_opening),
             (tissue, "binary_closing", _plain_closing), (seeds, "_peak_candidates", _plain_peaks),
             (seeds, "_watershed", _plain_watershed), (split, "_watershed", _plain_watershed),
             (split, "_split_boxes_packed", _plain_split)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in swaps]
    try:
        for mod, name, fn in swaps:
            setattr(mod, name, fn)
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


_MOSAIC_BASE = 4096


def _slide(workdir: Path, stain: str, side: int, seed: int = 4242) -> Path:
    """A phantom slide of ``side`` px at 0.25 µm/px.

    The phantom generator renders about 1 Mpx/s on this machine, so sides above 4,096 px
    are a mosaic of one 4,096 px phantom (JPEG tiles and pyramid written here): the content
    repeats, the reading, decoding and analysis work are those of a real slide that size.
    """
    from marrowseg.synth import write_phantom

    name = f"bench_{stain}_{side}"
    path = workdir / f"{name}.tiff"
    if path.exists():
        return path
    t0 = time.perf_counter()
    base = min(side, _MOSAIC_BASE)
    bname = f"bench_{stain}_{base}"
    bpath = workdir / f"{bname}.tiff"
    if not bpath.exists():
        params = {"he": {"cellularity_pct": 50.0}, "ecad": {"left_shift_ratio": 0.2},
                  "reticulin": {"grade": 2}}[stain]
        write_phantom(workdir, stain, name=bname, seed=seed, size_px=(base, base), mpp=0.25, **params)
    if side != base:
        _write_mosaic(bpath, path, side)
    print(f"  made {path.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


def _write_mosaic(src: Path, dst: Path, side: int, mpp: float = 0.25) -> None:
    """Tile the level-0 image of ``src`` over a ``side`` x ``side`` pyramidal JPEG TIFF."""
    import cv2
    import tifffile

    base = tifffile.imread(src, level=0)
    bh, bw = base.shape[:2]
    tile = 256
    tmp = dst.with_suffix(".tmp.tiff")
    levels = [side]
    while levels[-1] >= 2048:
        levels.append(-(-levels[-1] // 4))
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for lv, n in enumerate(levels):
            f = 4**lv
            img = base if f == 1 else cv2.resize(base, (bw // f, bh // f), interpolation=cv2.INTER_AREA)
            ih, iw = img.shape[:2]

            def tiles(img=img, n=n, ih=ih, iw=iw):
                for y in range(0, n, tile):
                    for x in range(0, n, tile):
                        ys = (np.arange(y, y + tile) % ih)[:, None]
                        xs = (np.arange(x, x + tile) % iw)[None, :]
                        yield img[ys, xs]

            desc = (f"Aperio Image Library v12.0.0 \n{side}x{side} [0,0 {side}x{side}] ({tile}x{tile}) "
                    f"JPEG/RGB Q=90|AppMag = 40|MPP = {mpp * f:.6f}")
            tw.write(tiles(), shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 90}, description=desc, subfiletype=0 if lv == 0 else 1,
                     resolution=(1e4 / (mpp * f), 1e4 / (mpp * f)), resolutionunit="CENTIMETER")
    tmp.replace(dst)


def _layout(path: Path, stain: str, config):
    from marrowseg.analyzers import get_analyzer
    from marrowseg.engine import plan_slide
    from marrowseg.io import open_slide

    reader = open_slide(path)
    analyzer = get_analyzer(stain, config)
    return reader, analyzer, plan_slide(reader, analyzer, config)


def _core_mp(layout) -> float:
    return sum((t.core[0].stop - t.core[0].start) * (t.core[1].stop - t.core[1].start)
               for t in layout.tiles) / 1e6


def decode_rate(path: Path, stain: str) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from marrowseg.config import load_config
    from marrowseg.engine import _resolve_workers, _TileDataset, _worker_init

    cfg = load_config(stain)
    reader, analyzer, layout = _layout(path, stain, cfg)
    nw = _resolve_workers(cfg.engine.workers, reader)
    loader = DataLoader(_TileDataset(reader, layout), batch_size=cfg.engine.batch_size, num_workers=nw,
                        worker_init_fn=_worker_init if nw else None,
                        prefetch_factor=cfg.engine.prefetch_batches if nw else None)
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for batch in loader:
            n += len(batch["index"])
    dt = time.perf_counter() - t0
    return {"tiles": n, "core_mp": _core_mp(layout), "decode_s": dt, "decode_mp_s": _core_mp(layout) / dt,
            "workers": nw}


_CHILD = r"""
import json, resource, sys, threading, time
import psutil
peak = [0, 0]
def _watch():  # peaks of the summed RSS (shared pages count once per process) and PSS (shared pages split)
    me = psutil.Process()
    tick = 0
    while True:
        try:
            procs = [p for p in [me] + me.children(recursive=True) if p.is_running()]
            peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs))
            # PSS reads every mapping of every process (~1.5 ms a process): at 10 Hz the watcher
            # itself took CPU from the run it measures, so every fifth tick
            if tick % 5 == 0:
                peak[1] = max(peak[1], sum(getattr(p.memory_full_info(), "pss", 0) for p in procs))
        except psutil.Error:
            pass
        tick += 1
        time.sleep(0.1)
threading.Thread(target=_watch, daemon=True).start()
from marrowseg.config import load_config
from marrowseg.analyzers import get_analyzer
from marrowseg.engine import run_slide
from marrowseg.io import open_slide
path, stain, device = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = load_config(stain, overrides=[f"engine.device={device}"])
t0 = time.perf_counter()
class _Null:
    maps = {}; cells = {}
    def begin(self, layout, analyzer): pass
    def write_maps(self, tile, sl, maps): pass
    def write_cells(self, cells): self.n = getattr(self, "n", 0) + len(cells["x"])
    def end(self): pass
with open_slide(path) as reader:
    res = run_slide(reader, get_analyzer(stain, cfg), cfg, sink=_Null())
dt = time.perf_counter() - t0
core = sum(r["core_rows"] * r["core_cols"] for r in res.tiles) / 1e6
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"seconds": dt, "core_mp": core, "rss_kb": rss, "tree_rss_kb": peak[0] // 1024, "tree_pss_kb": peak[1] // 1024, "totals": res.totals,
                  "readouts": res.readouts, "device": res.provenance["device"], "tiles": res.tiles}, default=str))
"""


def pipeline_run(path: Path, stain: str, device: str = "cpu") -> dict:
    """Full engine in a child process; returns its timing, peak RSS (MB) and totals."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), stain, device], capture_output=True,
                         text=True, check=True)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    doc["mp_s"] = doc["core_mp"] / doc["seconds"]
    doc["peak_rss_mb"] = doc["tree_rss_kb"] / 1024  # all processes together
    doc["peak_rss_largest_process_mb"] = doc["rss_kb"] / 1024
    doc["peak_pss_mb"] = doc["tree_pss_kb"] / 1024  # the memory the run really holds
    return doc


def skimage_rate(path: Path, stain: str, max_tiles: int, engine_tiles: list[dict]) -> dict:
    """Serial per-tile reference implementation on ``max_tiles`` tiles spread evenly over the grid.

    Its per-tile statistics are checked against those the engine wrote for the same tiles
    (``engine_tiles``, the pipeline run's per-tile rows): equal results, not only equal speed.
    """
    from marrowseg.config import load_config

    cfg = load_config(stain)
    reader, analyzer, layout = _layout(path, stain, cfg)
    ref = getattr(analyzer, "reference_dense", None)
    if ref is None:
        return {"skimage_mp_s": None, "note": f"{type(analyzer).__name__} has no reference_dense"}
    # spread over the grid: the first tiles of a row-major grid all lie on the slide's edge,
    # where the halo reads blank glass and the post-processing has less to do per core pixel
    pick = np.unique(np.linspace(0, len(layout.tiles) - 1, min(max_tiles, len(layout.tiles))).round().astype(int))
    tiles = [layout.tiles[i] for i in pick]
    # the same per-slide preparation as the engine (E-cadherin estimates its stain vectors from
    # this sample), so that both sides analyse with the same stain matrix
    from marrowseg.engine import _prepare

    _prepare(analyzer, reader, layout, cfg.engine.seed)
    totals_ref: dict = {}
    with scikit_image_only():
        t0 = time.perf_counter()
        for t in tiles:
            rgb = layout.read_tile(reader, t)
            res = analyzer.post(ref(rgb), rgb, layout.context(t))
            for k, v in res.stats.items():
                totals_ref[k] = totals_ref.get(k, 0) + v
        dt = time.perf_counter() - t0
    core = sum((t.core[0].stop - t.core[0].start) * (t.core[1].stop - t.core[1].start) for t in tiles) / 1e6
    by_index = {int(r["tile"]): r for r in engine_tiles}
    totals_t = {k: sum(float(by_index[t.index].get(k, 0)) for t in tiles) for k in totals_ref}
    worst = max((abs(totals_ref[k] - totals_t[k]) / max(abs(totals_t[k]), 1) for k in totals_t), default=0.0)
    return {"skimage_mp_s": core / dt, "skimage_tiles": len(tiles), "max_rel_diff_vs_torch": worst}


def machine() -> dict:
    import torch

    from marrowseg.engine import versions

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "versions": versions()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3,072 px slides, one baseline tile, no 4x slide")
    ap.add_argument("--side", type=int, default=None, help="slide side in px at 0.25 µm/px")
    ap.add_argument("--stains", default="he,ecad,reticulin")
    ap.add_argument("--rss-scale", type=int, default=2, help="side factor of the larger RSS slide (0 = skip)")
    ap.add_argument("--rss-stains", default="he", help="stains measured on the larger slide too")
    ap.add_argument("--baseline-tiles", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "marrowseg-bench")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    # 16,384 px at 0.25 µm/px (4 x 4 mm) takes well over 20 s per stain on 2 cores; a 40,000 px
    # slide would take the 10-minute budget several times over at today's CPU rates.
    side = args.side or (3072 if args.quick else 16384)
    nbase = args.baseline_tiles or (1 if args.quick else 6)
    if args.quick:
        args.rss_scale = 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    import torch

    from marrowseg.analyzers import available_stains

    stains = [s for s in args.stains.split(",") if s in available_stains()]
    rows = []
    for stain in stains:
        print(f"[{stain}]", file=sys.stderr)
        path = _slide(args.workdir, stain, side)
        row = {"stain": stain, "slide_px": side}
        row.update(decode_rate(path, stain))
        run = pipeline_run(path, stain, "cpu")
        row.update(pipeline_mp_s=run["mp_s"], pipeline_s=run["seconds"], peak_rss_mb=run["peak_rss_mb"],
                   peak_rss_largest_process_mb=run["peak_rss_largest_process_mb"], peak_pss_mb=run["peak_pss_mb"],
                   readouts=run["readouts"])
        row.update(skimage_rate(path, stain, nbase, run["tiles"]))
        if args.rss_scale and stain in args.rss_stains.split(","):
            big = _slide(args.workdir, stain, side * args.rss_scale)
            rb = pipeline_run(big, stain, "cpu")
            row.update(peak_rss_mb_4x=rb["peak_rss_mb"], peak_pss_mb_4x=rb["peak_pss_mb"], pipeline_mp_s_4x=rb["mp_s"])
        if torch.cuda.is_available():
            g = pipeline_run(path, stain, "cuda")
            row.update(gpu_mp_s=g["mp_s"])
        rows.append(row)
    hdr = ("stain", "slide px", "core Mpx", "decode Mpx/s", "pipeline Mpx/s", "skimage Mpx/s", "pipe/decode",
           "pipe/skimage", "ref vs torch", "peak RSS MB", "RSS 4x MB", "peak PSS MB", "PSS 4x MB", "GPU Mpx/s")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        sk = r.get("skimage_mp_s")
        cells = [r["stain"], f"{r['slide_px']}", f"{r['core_mp']:.0f}", f"{r['decode_mp_s']:.1f}",
                 f"{r['pipeline_mp_s']:.2f}", f"{sk:.2f}" if sk else "n/a",
                 f"{r['pipeline_mp_s'] / r['decode_mp_s']:.2f}",
                 f"{r['pipeline_mp_s'] / sk:.1f}" if sk else "n/a",
                 f"{r['max_rel_diff_vs_torch']:.1e}" if sk else "n/a", f"{r['peak_rss_mb']:.0f}",
                 f"{r.get('peak_rss_mb_4x', float('nan')):.0f}", f"{r['peak_pss_mb']:.0f}",
                 f"{r.get('peak_pss_mb_4x', float('nan')):.0f}",
                 f"{r['gpu_mp_s']:.1f}" if "gpu_mp_s" in r else "n/a"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
