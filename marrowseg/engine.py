"""The batched inference core shared by every analyzer.

One slide at a time: tissue detection on a coarse view, a tile grid at the analyzer's
resolution over the tissue, tiles read and decoded by a torch ``DataLoader`` (worker
processes overlap decode with compute), batches through the analyzer's torch module on
the chosen device, per-tile post-processing on the CPU, and exact slide-level sums in
tile order. Maps and cells go to a :class:`ResultSink` as tiles finish, so memory is
bounded by the batch, not the slide.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from marrowseg import __version__, stains
from marrowseg import slide_checks as checks
from marrowseg.analyzers.base import Analyzer, TileContext, TileResult
from marrowseg.config import Config, config_hash
from marrowseg.errors import AnalysisError, ConfigError, MarrowsegError, NoTissueError, SlideError
from marrowseg.focus import tile_focus
from marrowseg.io.base import READ_AT_MPP_MAX_PX
from marrowseg.stain_id import tissue_pixels
from marrowseg.tiling import Tile, tiles_over_mask, tissue_mask

__all__ = [
    "SlideLayout",
    "SlideResult",
    "ResultSink",
    "MemorySink",
    "resolve_device",
    "plan_slide",
    "run_slide",
    "analyze_array",
    "planar",
    "versions",
]

log = logging.getLogger(__name__)

#: Number of tissue pixels handed to ``Analyzer.prepare``.
_SAMPLE_PIXELS = 250_000
_SAMPLE_TILES = 8
#: in a crop or field (``output.small_image_px``), tissue objects down to this share of its area count
SMALL_FIELD_MIN_OBJECT_FRAC = 0.02


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class SlideLayout:
    """Where everything of one analysis sits.

    Attributes
    ----------
    shape_px : (int, int)
        Slide size at the analysis resolution, (rows, cols).
    mpp : float
        Analysis resolution, µm/px.
    level0_mpp : float
        Pixel size of the input's level 0, µm/px.
    level0_shape_px : (int, int)
        Input size at level 0, (rows, cols).
    tile_px, overlap_px : int
        Grid geometry at ``mpp``.
    map_downsample : int
        Analysis pixels per map pixel.
    tiles : list of Tile
        Tiles over tissue, in grid order.
    tissue : dict
        How tissue was found (mask resolution, fraction, whether it was skipped), and the white point.
    white : (float, float, float) or None
        Intensity of the slide's glass per channel (:func:`marrowseg.stains.white_point`), which
        every tile is brought to 255 by; None: read as it is.
    """

    shape_px: tuple[int, int]
    mpp: float
    level0_mpp: float
    level0_shape_px: tuple[int, int]
    tile_px: int
    overlap_px: int
    map_downsample: int
    tiles: list[Tile]
    tissue: dict[str, Any]
    tissue_mask: np.ndarray | None = field(default=None, repr=False)
    white: tuple[float, float, float] | None = None

    def read_tile(self, reader: Any, tile: Tile) -> np.ndarray:
        """A tile as every analysis step sees it: read at ``mpp`` and brought to the slide's white
        point (:func:`marrowseg.stains.white_balance`; unchanged when ``white`` is None)."""
        rgb = reader.read_region(tile.origin_px[1], tile.origin_px[0], tile.size_px, tile.size_px, self.mpp)
        return stains.white_balance(rgb, None if self.white is None else np.asarray(self.white))

    @property
    def map_shape_px(self) -> tuple[int, int]:
        k = self.map_downsample
        return (math.ceil(self.shape_px[0] / k), math.ceil(self.shape_px[1] / k))

    @property
    def map_mpp(self) -> float:
        return self.mpp * self.map_downsample

    def map_slice(self, tile: Tile) -> tuple[slice, slice]:
        """The tile's core in map pixels."""
        k = self.map_downsample
        rs, cs = tile.core_slide
        return (
            slice(rs.start // k, math.ceil(rs.stop / k)),
            slice(cs.start // k, math.ceil(cs.stop / k)),
        )

    def context(self, tile: Tile) -> TileContext:
        r0, c0 = tile.origin_px
        valid = (
            max(0, min(tile.size_px, self.shape_px[0] - r0)),
            max(0, min(tile.size_px, self.shape_px[1] - c0)),
        )
        return TileContext(index=tile.index, origin_px=tile.origin_px, core=tile.core,
                           valid_px=valid, mpp=self.mpp)


def _grid_geometry(config: Config, analyzer: Analyzer) -> tuple[int, int]:
    """Tile and overlap in analysis pixels, aligned to the map downsample factor."""
    k = analyzer.map_downsample
    need = 2 * math.ceil(analyzer.halo_um / analyzer.mpp)
    overlap = max(config.tiling.overlap_px, need)
    half = math.ceil(overlap / 2 / k) * k
    overlap = 2 * half
    stride = ((config.tiling.tile_px - overlap) // k) * k
    if stride < max(k, 16):
        raise ConfigError(
            f"tiling.tile_px={config.tiling.tile_px} leaves no core: the {analyzer.stain} analyzer "
            f"needs an overlap of {overlap} px ({analyzer.halo_um} µm halo at {analyzer.mpp} µm/px); "
            f"raise tiling.tile_px"
        )
    return stride + overlap, overlap


def _read_overview(reader: Any, mpp: float) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole slide at ``mpp`` for the tissue mask, and the pixels that could not be read.

    One unreadable chunk of the file (a corrupt JPEG tile in the level the overview comes
    from) must not stop the slide: its blocks stay white and are returned in ``unreadable``,
    so that the caller keeps them as tissue; the analysis tiles over them are tried, fail and
    are reported missing with their area, rather than dropping out of the slide unnoticed.

    Returns
    -------
    view : (H, W, 3) uint8 ndarray
    unreadable : (H, W) bool ndarray or None
        None when the whole overview was read.

    Raises
    ------
    SlideError
        Nothing could be read, or the overview is too large to read.
    """
    scale = mpp / reader.mpp
    w0, h0 = reader.dimensions
    w, h = math.ceil(w0 / scale - 1e-9), math.ceil(h0 / scale - 1e-9)
    if w * h > READ_AT_MPP_MAX_PX:
        return reader.read_at_mpp(mpp), None  # raises with the size
    view, bad, reasons = reader.read_region_or_blank(0, 0, w, h, mpp, block_px=32)
    if bad is not None and bad.all():
        raise SlideError(reasons[0])
    for reason in reasons:
        log.warning("%s; the tiles over it will be reported missing", reason)
    return view, bad


def plan_slide(reader: Any, analyzer: Analyzer, config: Config) -> SlideLayout:
    """Detect tissue and lay the tile grid for one slide.

    Parameters
    ----------
    reader : SlideReader
        Open slide (see :func:`marrowseg.io.open_slide`).
    analyzer : Analyzer
        Sets the analysis resolution, halo and map downsample.
    config : Config
        Tissue and tiling settings.

    Returns
    -------
    SlideLayout

    Raises
    ------
    NoTissueError
        The tissue mask is empty.
    SlideError
        A file that is not a brightfield scan (a label mask, a drawing, a fluorescence image), or
        greyscale for a stain told apart by colour.
    """
    mpp = analyzer.mpp
    h0, w0 = reader.shape
    shape = (max(1, round(h0 * reader.mpp / mpp)), max(1, round(w0 * reader.mpp / mpp)))
    tile_px, overlap_px = _grid_geometry(config, analyzer)
    tcfg = config.tissue
    small = max(h0, w0) <= config.output.small_image_px
    # A field of view or crop may be only a few hundred µm: look at it finely enough.
    side_um = max(h0, w0) * reader.mpp
    mask_mpp = max(reader.mpp, min(tcfg.mpp, side_um / 256))
    view, unreadable = _read_overview(reader, mask_mpp)
    min_object_um2 = tcfg.min_object_um2
    if small:
        # a crop or photographed field is analysed whole; its mask only says whether there is tissue,
        # and a fragment smaller than a slide's speck limit (a 150 µm clot fragment on white, a
        # region exported with a transparent surround) is what the field was taken of
        min_object_um2 = min(min_object_um2, SMALL_FIELD_MIN_OBJECT_FRAC * h0 * w0 * reader.mpp**2)
    mask = tissue_mask(
        view, mask_mpp, min_od=tcfg.min_od, max_od=tcfg.max_od, min_saturation=tcfg.min_saturation,
        max_saturation=tcfg.max_saturation,
        min_object_um2=min_object_um2, max_hole_um2=tcfg.max_hole_um2,
        margin_um=tcfg.margin_um, keep_border_objects=small,
    )
    readable = mask.copy()
    if unreadable is not None:
        readable &= ~unreadable
        mask |= unreadable
    frac = float(mask.mean()) if mask.size else 0.0
    if not readable.any():
        raise NoTissueError(f"{reader.name}: no tissue found (tissue mask empty at {mask_mpp:.3g} µm/px)")
    if reader.path is not None:  # a file; an array handed in by code may be a drawn test scene
        checks.brightfield_check(reader.name, view, readable)
    if analyzer.needs_colour:
        checks.colour_check(reader.name, view[readable], analyzer.stain)
    # Crops and photographed fields are tissue by intent: analyse all of them and let the
    # analyzer's own classes exclude glass.
    tiles = tiles_over_mask(shape, None if small else mask, tile_px=tile_px, overlap_px=overlap_px)
    white = white_found = None
    if tcfg.white_balance:
        # the glass round the tissue where there is some; a crop's clear fat spaces otherwise
        w = stains.white_point(view, min_level=tcfg.white_min_level, where=~mask if (~mask).sum() >= 50 else None)
        white_found = None if w is None else [round(float(v), 1) for v in w]
        if w is not None and float(np.min(w)) < tcfg.white_calibrated:
            white = tuple(float(v) for v in w)
    tissue = {"mask_mpp": mask_mpp, "tissue_frac": frac, "all_tiles": bool(small),
              "white_point": {"rgb": white_found, "applied": white is not None},
              "stain_check": checks.stain_check(reader.name, view, analyzer.stain),
              "resolution_check": checks.resolution_check(reader.name, float(reader.mpp), analyzer,
                                                          reader.mpp_source)}
    return SlideLayout(shape_px=shape, mpp=mpp, level0_mpp=float(reader.mpp),
                       level0_shape_px=(int(h0), int(w0)), tile_px=tile_px, overlap_px=overlap_px,
                       map_downsample=analyzer.map_downsample, tiles=tiles, tissue=tissue,
                       tissue_mask=mask, white=white)


# ----------------------------------------------------------------------------- sinks
class ResultSink(Protocol):
    """Receives per-tile outputs as they finish (maps, cells)."""

    def begin(self, layout: SlideLayout, analyzer: Analyzer) -> None: ...

    def write_maps(self, tile: Tile, map_slice: tuple[slice, slice], maps: dict[str, np.ndarray]) -> None: ...

    def write_cells(self, cells: dict[str, np.ndarray]) -> None: ...

    def end(self) -> None: ...


class MemorySink:
    """Keeps whole maps and all cells in memory: for crops, tests and notebooks."""

    def __init__(self) -> None:
        self.maps: dict[str, np.ndarray] = {}
        self._cells: list[dict[str, np.ndarray]] = []
        self.cells: dict[str, np.ndarray] = {}

    def begin(self, layout: SlideLayout, analyzer: Analyzer) -> None:
        self._shape = layout.map_shape_px

    def write_maps(self, tile: Tile, map_slice: tuple[slice, slice], maps: dict[str, np.ndarray]) -> None:
        for name, arr in maps.items():
            if name not in self.maps:
                self.maps[name] = np.zeros(self._shape, dtype=arr.dtype)
            self.maps[name][map_slice] = arr

    def write_cells(self, cells: dict[str, np.ndarray]) -> None:
        self._cells.append(cells)

    def end(self) -> None:
        self.cells = concat_columns(self._cells)
        self._cells = []


def concat_columns(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate column dicts that share their keys (the first part's keys win)."""
    parts = [p for p in parts if p and len(next(iter(p.values()))) > 0] or parts[:1]
    if not parts:
        return {}
    keys = list(parts[0].keys())
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in keys}


# ----------------------------------------------------------------------------- loading
class _TileDataset(Dataset):
    def __init__(self, reader: Any, layout: SlideLayout) -> None:
        self.reader = reader
        self.tiles = layout.tiles
        self.mpp = layout.mpp
        self.read_tile = layout.read_tile

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> dict[str, Any]:
        tile = self.tiles[i]
        r0, c0 = tile.origin_px
        n = tile.size_px
        try:
            rgb = self.read_tile(self.reader, tile)
            err = ""
        except MarrowsegError as exc:
            rgb = np.full((n, n, 3), 255, np.uint8)
            err = str(exc)
        return {"index": i, "rgb": torch.from_numpy(np.ascontiguousarray(rgb)), "error": err}


class _TileWorkDataset(_TileDataset):
    """Decode, module and post of one tile in a DataLoader worker (CPU only).

    On the CPU the module runs one tile at a time anyway; doing the whole tile in a worker
    process gives every core a tile of its own and keeps the GIL out of the way: with the
    module in the main process and ``post`` in a thread beside it, each of the module's few
    hundred torch calls waited for the post thread's Python (the GIL switch interval), and
    the two shared the cores with the module's own OpenMP threads. Per-tile results do not
    depend on which process made them; the main process sums them in tile order.
    """

    def __init__(self, reader: Any, layout: SlideLayout, analyzer: Analyzer, module: torch.nn.Module,
                 focus_min_um2: float | None = None) -> None:
        super().__init__(reader, layout)
        self.layout = layout
        self.analyzer = analyzer
        self.module = module
        self.focus_min_um2 = focus_min_um2

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = super().__getitem__(i)
        t0 = time.perf_counter()
        item["result"] = None
        if not item["error"]:
            with torch.inference_mode():
                dense, rgb = _forward_cpu(self.module, item["rgb"][None])[0], item["rgb"].numpy()
                t1 = time.perf_counter()
                ctx = self.layout.context(self.tiles[i])
                item["result"] = self.analyzer.post(dense, rgb, ctx)
                item["focus"] = _focus(rgb, ctx, self.focus_min_um2)
        else:
            t1 = t0
        item["rgb"] = None  # the tile stays in the worker
        info = torch.utils.data.get_worker_info()
        item["worker"] = info.id if info is not None else 0
        item["t_forward"], item["t_post"] = t1 - t0, time.perf_counter() - t1
        return item


def planar(rgb: torch.Tensor) -> torch.Tensor:
    """A ``(B, H, W, 3)`` uint8 batch as the ``(B, 3, H, W)`` float32 planes the modules take.

    Contiguous planes, not the channels-last view a bare ``permute`` gives: every op of the
    modules works per channel, and on the CPU they run 1.2-1.5x faster on planes (their maps do
    not depend on threads or batch: ``test_module_maps_do_not_depend_on_threads_or_batch``).
    """
    return rgb.permute(0, 3, 1, 2).contiguous().float()


def _forward_cpu(module: torch.nn.Module, rgb: torch.Tensor) -> list[dict[str, np.ndarray]]:
    """The module on a ``(B, H, W, 3)`` uint8 batch, one tile at a time.

    One tile at a time on the CPU: results then cannot depend on the batch size (oneDNN
    picks kernels by batch shape), and nothing is lost in speed there.
    """
    x = planar(rgb)
    outs = [module(x[i : i + 1]) for i in range(x.shape[0])]
    return [{k: v[0].float().numpy() for k, v in o.items()} for o in outs]


def _unbatched(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def resolve_device(spec: str) -> torch.device:
    """Turn ``auto|cpu|cuda[:i]|mps`` into a torch device (auto prefers CUDA, then MPS)."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"engine.device={spec}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"engine.device={spec}: MPS is not available on this machine")
    return dev


def _resolve_threads(threads: int | str) -> int:
    """CPU threads for torch: the cores this process may use, unless told otherwise.

    ``auto`` honours ``OMP_NUM_THREADS`` (Dask's nanny sets it to 1 in each worker, so
    parallel slides don't oversubscribe the cores), else takes every core it is given.
    """
    if threads != "auto":
        return int(threads)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, _available_cores())


class _Done:
    """A finished result with the ``Future.result()`` interface."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def result(self) -> Any:
        return self._value


def _resolve_post_threads(post_threads: int | str, device_type: str = "cpu", workers: int = 0) -> int:
    """Threads running ``post`` beside the module in an in-process run.

    ``auto``: on the CPU one (the module's own threads take the other cores); on an accelerator
    every core the decode workers and the feeding thread leave, since ``post`` then carries
    all the CPU work.
    """
    if post_threads == "auto":
        cores = _available_cores()
        if device_type != "cpu":
            return max(1, cores - workers - 1)
        return 1 if cores > 1 else 0
    return int(post_threads)


def _resolve_workers(workers: int | str, reader: Any, device_type: str = "cpu", *,
                     analyzer: Any = None, tile_px: int | None = None,
                     memory_mb: float | None = None) -> int:
    """DataLoader worker processes.

    ``auto``: on the CPU one per core (up to 8), each running whole tiles (decode, module,
    post), but no more than keep the analyzer's memory estimate
    (:meth:`~marrowseg.analyzers.base.Analyzer.memory_estimate_mb`) within ``memory_mb`` and
    within the memory the system reports available; on an accelerator ``min(cores - 1, 4)``
    decode-only workers feed it.
    """
    if getattr(reader, "path", None) is None:
        return 0  # an in-memory array would be copied into every worker
    if workers != "auto":
        return int(workers)
    cores = _available_cores()
    if device_type != "cpu":
        return max(0, min(cores - 1, 4))
    n = min(cores, 8)
    budget = _memory_budget_mb(memory_mb)
    if budget is not None and analyzer is not None and tile_px:
        while n > 1 and analyzer.memory_estimate_mb(tile_px, n) > budget:
            n -= 1
    return n


def _memory_budget_mb(memory_mb: float | None) -> float | None:
    """The smaller of ``memory_mb`` and the memory the system reports available (MB), or None."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) / 1024
                    break
    except OSError:  # not Linux: the configured budget alone
        pass
    found = [v for v in (memory_mb, avail) if v is not None]
    return min(found) if found else None


# ----------------------------------------------------------------------------- results
@dataclass
class SlideResult:
    """Everything one analysis produced (maps and cells live in the sink)."""

    stain: str
    layout: SlideLayout
    totals: dict[str, float]
    windows: dict[tuple[int, int], dict[str, float]]
    report: dict[str, Any]
    tiles: list[dict[str, Any]]
    provenance: dict[str, Any]
    sink: Any = None

    @property
    def readouts(self) -> dict[str, Any]:
        return self.report.get("readouts", {})

    @property
    def maps(self) -> dict[str, np.ndarray]:
        return getattr(self.sink, "maps", {})

    @property
    def cells(self) -> dict[str, np.ndarray]:
        return getattr(self.sink, "cells", {})


def versions() -> dict[str, str]:
    """Versions of marrowseg, Python and the libraries that shape its numbers."""
    import importlib.metadata as md

    out = {"marrowseg": __version__, "python": platform.python_version()}
    for name in ("torch", "numpy", "scipy", "scikit-image", "opencv-python-headless", "tifffile",
                 "zarr", "tiffslide", "imagecodecs", "pydantic"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def _add(acc: dict[str, float], stats: dict[str, float]) -> None:
    for k, v in stats.items():
        acc[k] = acc.get(k, 0) + v


def _cells_to_slide(cells: dict[str, np.ndarray], tile: Tile, layout: SlideLayout,
                    ctx: TileContext) -> dict[str, np.ndarray]:
    if not cells or "row" not in cells:
        return {}
    row = np.asarray(cells["row"], dtype=np.float64)
    col = np.asarray(cells["col"], dtype=np.float64)
    keep = ctx.in_core(row, col)
    out = {k: np.asarray(v)[keep] for k, v in cells.items() if k not in ("row", "col")}
    # Pixel (i, j) at the analysis resolution is centred at ((i + .5) mpp, (j + .5) mpp) µm.
    y_um = (row[keep] + tile.origin_px[0] + 0.5) * layout.mpp
    x_um = (col[keep] + tile.origin_px[1] + 0.5) * layout.mpp
    head = {
        "x": x_um / layout.level0_mpp - 0.5,
        "y": y_um / layout.level0_mpp - 0.5,
        "x_um": x_um,
        "y_um": y_um,
        "tile": np.full(len(x_um), tile.index, dtype=np.int64),
    }
    head.update(out)
    return head


def _tissue_patch(rgb: np.ndarray, tile: Tile, shape_px: tuple[int, int], patch_px: int) -> np.ndarray:
    """A window of at most ``patch_px`` a side of the part of ``rgb`` (tile ``tile``) inside the
    slide: of 3 x 3 evenly placed windows, the one with the most tissue pixels
    (:func:`marrowseg.stain_id.tissue_pixels`, the stain recogniser's: not glass, not black).

    A small input sits in a corner of its padded tile, whose centre is blank, and a tile at the
    edge of a trephine core is half glass."""
    bounds = []
    for o, n, full in zip(tile.origin_px, rgb.shape[:2], shape_px, strict=True):
        lo = max(0, -o)
        hi = max(lo, min(n, full - o))
        side = min(hi - lo, patch_px)
        # the centre first: it is kept on a tie (a tile all tissue)
        starts = dict.fromkeys(lo + k * (hi - lo - side) // 2 for k in (1, 0, 2))
        bounds.append([(a, a + side) for a in starts])
    stained = tissue_pixels(rgb)  # glass and black fill hold no nucleus
    best = max(((r, c) for r in bounds[0] for c in bounds[1]),
               key=lambda rc: int(stained[rc[0][0]:rc[0][1], rc[1][0]:rc[1][1]].sum()))
    (r0, r1), (c0, c1) = best
    return np.ascontiguousarray(rgb[r0:r1, c0:c1])


def _prepare_sample(reader: Any, layout: SlideLayout, seed: int, patch_px: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random pixels of up to ``_SAMPLE_TILES`` tiles spread over the slide and, with
    ``patch_px``, the most stained window of each of those tiles' part inside the slide
    (``patch_px`` a side with ``_SAMPLE_TILES`` tiles, wider with fewer, up to the tile)."""
    tiles = layout.tiles
    patches: list[np.ndarray] = []
    if not tiles:
        return np.zeros((0, 3), np.uint8), patches
    picks = np.unique(np.linspace(0, len(tiles) - 1, min(_SAMPLE_TILES, len(tiles))).round().astype(int))
    per_tile = _SAMPLE_PIXELS // len(picks)
    # the same patch area however many tiles there are: a slide of one or two tiles is sampled
    # wider, not more thinly (one 384 µm window's level varies by 3-6 % across a phantom)
    patch_px = int(patch_px * math.sqrt(_SAMPLE_TILES / len(picks)))
    rng = np.random.default_rng(seed)
    parts = []
    for i in picks:
        t = tiles[i]
        try:
            rgb = layout.read_tile(reader, t)
        except MarrowsegError:
            continue
        px = rgb.reshape(-1, 3)
        take = rng.choice(len(px), size=min(per_tile, len(px)), replace=False)
        parts.append(px[np.sort(take)])
        if patch_px:
            patches.append(_tissue_patch(rgb, t, layout.shape_px, patch_px))
    return (np.concatenate(parts) if parts else np.zeros((0, 3), np.uint8)), patches


def _prepare(analyzer: Analyzer, reader: Any, layout: SlideLayout, seed: int) -> dict[str, Any]:
    """Run ``analyzer.prepare`` on the slide's sample (none read when it needs none)."""
    if not analyzer.needs_sample:
        return analyzer.prepare(np.zeros((0, 3), np.uint8))
    sample, patches = _prepare_sample(reader, layout, seed, analyzer.sample_patch_px)
    return analyzer.prepare(sample, patches=patches) if analyzer.sample_patch_px else analyzer.prepare(sample)


def _focus(rgb: np.ndarray, ctx: TileContext, min_tissue_um2: float | None) -> tuple[float | None, int]:
    """:func:`marrowseg.focus.tile_focus` of a tile's core (None, 0 when the check is off)."""
    if min_tissue_um2 is None:
        return None, 0
    return tile_focus(np.asarray(rgb), ctx.core, float(ctx.mpp), min_tissue_um2=min_tissue_um2)


def _focus_summary(rows: list[dict[str, Any]], mpp: float, focus_min: float) -> dict[str, Any]:
    """The slide's out-of-focus share: the judged tiles' tissue (in their measured windows)
    that lies in tiles below ``focus_min``; sums over tiles, so it does not depend on order."""
    judged = [r for r in rows if r.get("focus") is not None]
    px = sum(int(r["focus_tissue_px"]) for r in judged)
    blurred = [r for r in judged if r["out_of_focus"]]
    blurred_px = sum(int(r["focus_tissue_px"]) for r in blurred)
    return {"focus_min": focus_min, "focus_judged_tiles": len(judged), "out_of_focus_tiles": len(blurred),
            "out_of_focus_frac": blurred_px / px if px else None,
            "out_of_focus_area_um2": float(sum(r["core_rows"] * r["core_cols"] for r in blurred) * mpp**2)}


@dataclass(frozen=True)
class _Execution:
    """How a slide runs: device, loader batch and workers, where post-processing happens."""

    device: torch.device
    batch_size: int
    workers: int
    # on the CPU with worker processes, each worker runs whole tiles (see _TileWorkDataset);
    # otherwise the module runs here and post in threads beside it
    tile_workers: bool
    post_threads: int
    amp: bool


def _execution(config: Config, analyzer: Analyzer, reader: Any, device: str | None, batch_size: int | None,
               workers: int | str | None) -> _Execution:
    """Resolve the engine settings (and the overrides of :func:`run_slide`) for this slide and machine.

    Sets torch's CPU thread count as a side effect.
    """
    ecfg = config.engine
    dev = resolve_device(device or ecfg.device)
    nw = _resolve_workers(ecfg.workers if workers is None else workers, reader, dev.type, analyzer=analyzer,
                          tile_px=config.tiling.tile_px, memory_mb=ecfg.memory_mb)
    tile_workers = dev.type == "cpu" and nw > 0
    n_post = 0 if tile_workers else _resolve_post_threads(ecfg.post_threads, dev.type, nw)
    if dev.type == "cpu":
        threads = _resolve_threads(ecfg.threads)
        if ecfg.threads == "auto" and n_post:
            # the post threads take cores too: OpenMP threads of the module that find their
            # core busy make every torch call wait for the slowest of them
            threads = max(1, threads - n_post)
        torch.set_num_threads(threads)
    return _Execution(device=dev, batch_size=int(batch_size or ecfg.batch_size), workers=nw,
                      tile_workers=tile_workers, post_threads=n_post,
                      amp=dev.type == "cuda" and ecfg.amp and analyzer.allow_amp)


def _loader(exe: _Execution, reader: Any, layout: SlideLayout, analyzer: Analyzer, module: torch.nn.Module,
            config: Config, focus_min_um2: float | None) -> DataLoader:
    prefetch = config.engine.prefetch_batches
    if exe.tile_workers:
        dataset: Dataset = _TileWorkDataset(reader, layout, analyzer, module, focus_min_um2)
        # One tile per loader batch: the DataLoader hands whole batches to workers, so with
        # batches of bs tiles a slide of bs tiles ran on one worker, and the last batches of any
        # slide left the other workers idle. Out of order: a worker takes the next tile as soon
        # as it has room, instead of in turn behind a worker still on a slow tile (in order, the
        # loader held every worker to the pace of the slowest: 2 workers did 1.68x one worker's
        # work on the E-cadherin benchmark slide); the accumulator puts results back in tile order.
        return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=exe.workers, collate_fn=_unbatched,
                          worker_init_fn=_worker_init, prefetch_factor=prefetch, persistent_workers=False,
                          in_order=False)
    nw = exe.workers
    return DataLoader(
        _TileDataset(reader, layout), batch_size=exe.batch_size, shuffle=False, num_workers=nw,
        pin_memory=exe.device.type == "cuda", worker_init_fn=_worker_init if nw else None,
        prefetch_factor=prefetch if nw else None, persistent_workers=False,
    )


class _Accumulator:
    """Per-tile results taken in tile order: sums, windows and ``tiles.csv`` rows; maps and cells to the sink.

    Results are added in tile order whatever order they were computed in, so the sums cannot
    depend on thread or worker timing.
    """

    def __init__(self, reader_name: str, layout: SlideLayout, sink: ResultSink, focus_min: float | None) -> None:
        self.reader_name = reader_name
        self.layout = layout
        self.sink = sink
        self.focus_min = focus_min
        self.totals: dict[str, float] = {}
        self.windows: dict[tuple[int, int], dict[str, float]] = {}
        self.tile_rows: list[dict[str, Any]] = []
        self.missing = 0

    def add(self, tile: Tile, ctx: TileContext, err: str, fut: Any, focus: tuple[float | None, int] = (None, 0)) -> None:
        """One tile: ``err`` (unreadable: excluded) or ``fut.result()``, a :class:`TileResult`."""
        row = {"tile": tile.index, "grid_row": tile.grid_rc[0], "grid_col": tile.grid_rc[1],
               "row_px": tile.core_slide[0].start, "col_px": tile.core_slide[1].start,
               "core_rows": ctx.core_shape[0], "core_cols": ctx.core_shape[1]}
        if err:
            self.missing += 1
            log.warning("%s: tile %d at (row %d, col %d) px unreadable, excluded: %s",
                        self.reader_name, tile.index, *tile.origin_px, err)
            row.update(status="missing", error=err)
            self.tile_rows.append(row)
            return
        res: TileResult = fut.result()
        _add(self.totals, res.stats)
        for key, st in res.windows.items():
            _add(self.windows.setdefault(tuple(key), {}), st)
        if res.maps:
            self.sink.write_maps(tile, self.layout.map_slice(tile), res.maps)
        cells = _cells_to_slide(res.cells, tile, self.layout, ctx)
        if cells:
            self.sink.write_cells(cells)
        row.update(status="ok", error="", n_cells=len(cells.get("x", ())), **res.stats)
        if self.focus_min is not None:
            value, px = focus
            # numeric columns only in tiles.csv: 1 = out of focus; focus empty where not judged
            row.update(focus=value, focus_tissue_px=px, out_of_focus=int(value is not None and value < self.focus_min))
        self.tile_rows.append(row)

    def tiles_summary(self) -> dict[str, Any]:
        """The ``tiles`` section of the report: tiles read and missing, and the areas they cover."""
        layout = self.layout
        core_px = sum(r["core_rows"] * r["core_cols"] for r in self.tile_rows)
        missing_px = sum(r["core_rows"] * r["core_cols"] for r in self.tile_rows if r["status"] == "missing")
        out = {
            "n": len(layout.tiles), "missing": self.missing,
            "analysed_area_um2": float((core_px - missing_px) * layout.mpp**2),
            "missing_area_um2": float(missing_px * layout.mpp**2),
            "tile_px": layout.tile_px, "overlap_px": layout.overlap_px, "analysis_mpp": layout.mpp,
            "map_mpp": layout.map_mpp,
        }
        if self.focus_min is not None:
            out.update(_focus_summary(self.tile_rows, layout.mpp, self.focus_min))
        return out


def _run_tile_workers(loader: DataLoader, acc: _Accumulator,
                      progress: Callable[[int, int, float], None] | None) -> tuple[float, float, dict[int, int]]:
    """Tiles run whole in the loader's worker processes; returns forward and post seconds and tiles per worker."""
    layout = acc.layout
    mp_per_tile = layout.tile_px**2 / 1e6
    t_forward = t_post = 0.0
    per_worker: dict[int, int] = {}
    done = 0
    # what waits here is per-tile results (counts, cells, map tiles), not pixels
    arrived: dict[int, dict[str, Any]] = {}
    for batch in loader:
        for item in batch:
            arrived[item["index"]] = item
        while done in arrived:
            item = arrived.pop(done)
            tile = layout.tiles[item["index"]]
            t_forward += item["t_forward"]
            t_post += item["t_post"]
            per_worker[item["worker"]] = per_worker.get(item["worker"], 0) + 1
            acc.add(tile, layout.context(tile), item["error"], _Done(item["result"]), item.get("focus", (None, 0)))
            done += 1
            if progress is not None:
                progress(done, len(layout.tiles), done * mp_per_tile)
    return t_forward, t_post, per_worker


def _run_here(loader: DataLoader, exe: _Execution, module: torch.nn.Module, analyzer: Analyzer, acc: _Accumulator,
              focus_min_um2: float | None, progress: Callable[[int, int, float], None] | None) -> tuple[float, float]:
    """The module runs here on the loader's batches, post-processing in threads beside it; forward and post seconds."""
    layout = acc.layout
    dev = exe.device
    mp_per_tile = layout.tile_px**2 / 1e6
    t_forward = t_post = 0.0
    done = 0
    # Post-processing (labelling, skeletons: NumPy/SciPy/OpenCV, which release the GIL) runs
    # in threads while the next batch goes through the module. (Processes instead of threads
    # beside a GPU were measured no faster: H&E 16,384 px on 16 cores, 10.2 s against 10.5 s.)
    n_post = exe.post_threads
    pool = ThreadPoolExecutor(max_workers=n_post, thread_name_prefix="post") if n_post else None
    pending: deque = deque()
    max_pending = max(2 * exe.batch_size, 2 * n_post)
    try:
        for batch in loader:
            t0 = time.perf_counter()
            if dev.type == "cpu":
                dense_list = _forward_cpu(module, batch["rgb"])
            else:
                x = planar(batch["rgb"].to(dev, non_blocking=True))
                with torch.autocast(dev.type, enabled=exe.amp):
                    out = module(x)
                out = {k: v.float().cpu().numpy() for k, v in out.items()}
                dense_list = [{k: v[i] for k, v in out.items()} for i in range(x.shape[0])]
            rgbs = batch["rgb"].numpy()
            t1 = time.perf_counter()
            t_forward += t1 - t0
            for j, idx in enumerate(batch["index"].tolist()):
                tile = layout.tiles[idx]
                ctx = layout.context(tile)
                err = batch["error"][j]
                if err:
                    fut = None
                elif pool is None:
                    fut = _Done(analyzer.post(dense_list[j], rgbs[j], ctx))
                else:
                    fut = pool.submit(analyzer.post, dense_list[j], rgbs[j], ctx)
                focus = (None, 0) if err else _focus(rgbs[j], ctx, focus_min_um2)
                pending.append((tile, ctx, err, fut, focus))
            # Results are taken in tile order, so sums cannot depend on thread timing; the
            # queue depth bounds memory to a couple of batches.
            while len(pending) > max_pending:
                acc.add(*pending.popleft())
            t_post += time.perf_counter() - t1
            done += len(batch["index"])
            if progress is not None:
                progress(done, len(layout.tiles), done * mp_per_tile)
        t1 = time.perf_counter()
        while pending:
            acc.add(*pending.popleft())
        t_post += time.perf_counter() - t1
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return t_forward, t_post


def run_slide(
    reader: Any,
    analyzer: Analyzer,
    config: Config,
    *,
    sink: ResultSink | None = None,
    age: float | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    workers: int | str | None = None,
) -> SlideResult:
    """Analyse one slide with one analyzer.

    Parameters
    ----------
    reader : SlideReader
        Open slide.
    analyzer : Analyzer
        The stain's analyzer.
    config : Config
        Resolved configuration (engine, tiling, tissue sections are used here).
    sink : ResultSink, optional
        Receives maps and cells as tiles finish; default keeps them in memory.
    age : float, optional
        Patient age, years (passed to ``finalize``).
    progress : callable, optional
        ``progress(tiles_done, tiles_total, megapixels_done)`` after every batch.
    device, batch_size, workers : optional
        Override ``config.engine``.

    Returns
    -------
    SlideResult

    Raises
    ------
    NoTissueError
        Nothing to analyse.
    AnalysisError
        Every tile failed to read.
    """
    t_start = time.perf_counter()
    exe = _execution(config, analyzer, reader, device, batch_size, workers)
    layout = plan_slide(reader, analyzer, config)
    t_plan = time.perf_counter()
    prep = _prepare(analyzer, reader, layout, config.engine.seed)
    module = analyzer.module.to(exe.device).eval()
    sink = sink if sink is not None else MemorySink()
    sink.begin(layout, analyzer)
    focus_min_um2 = None if config.tissue.focus_min is None else float(config.tissue.focus_min_tissue_um2)
    loader = _loader(exe, reader, layout, analyzer, module, config, focus_min_um2)
    acc = _Accumulator(reader.name, layout, sink, config.tissue.focus_min)
    per_worker: dict[int, int] = {}
    with torch.inference_mode():
        if exe.tile_workers:
            t_forward, t_post, per_worker = _run_tile_workers(loader, acc, progress)
        else:
            t_forward, t_post = _run_here(loader, exe, module, analyzer, acc, focus_min_um2, progress)
    if layout.tiles and acc.missing == len(layout.tiles):
        first = next((r["error"] for r in acc.tile_rows if r.get("error")), "")
        head, _, rest = first.partition(": ")
        reason = rest if rest and head.endswith(reader.name) else first  # the file is named once
        raise AnalysisError(f"{reader.name}: every tile failed to read ({acc.missing} tiles; the first: {reason})")
    sink.end()
    report = analyzer.finalize(acc.totals, acc.windows, age=age)
    report["tiles"] = acc.tiles_summary()
    t_end = time.perf_counter()
    dev, nw = exe.device, exe.workers
    provenance = {
        "config": config.model_dump(mode="json"),
        "config_hash": config_hash(config),
        "versions": versions(),
        "device": {"type": dev.type, "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
                   "threads": 1 if exe.tile_workers else torch.get_num_threads(), "workers": nw,
                   "tile_workers": exe.tile_workers, "post_threads": exe.post_threads,
                   "tiles_per_worker": [per_worker.get(i, 0) for i in range(nw)] if exe.tile_workers else None,
                   "memory_estimate_mb": (round(analyzer.memory_estimate_mb(config.tiling.tile_px, nw))
                                          if exe.tile_workers else None),
                   "batch_size": exe.batch_size, "amp": exe.amp},
        "prepare": prep,
        "tissue": layout.tissue,
        "timings_s": {"plan": t_plan - t_start, "forward": t_forward, "post": t_post,
                      "total": t_end - t_start},
    }
    return SlideResult(stain=analyzer.stain, layout=layout, totals=acc.totals, windows=acc.windows,
                       report=report, tiles=acc.tile_rows, provenance=provenance, sink=sink)


def analyze_array(
    rgb: np.ndarray,
    mpp: float,
    analyzer: Analyzer,
    config: Config | None = None,
    **kwargs: Any,
) -> SlideResult:
    """Run an in-memory RGB image through the same path as a slide file.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        Image, bright background.
    mpp : float
        Its pixel size, µm/px.
    analyzer : Analyzer
    config : Config, optional
        Defaults to the packaged config of the analyzer's stain.
    **kwargs
        Passed to :func:`run_slide`.
    """
    from marrowseg.config import load_config
    from marrowseg.io import open_slide

    config = config or load_config(analyzer.stain)
    with open_slide(rgb, mpp=mpp) as reader:
        return run_slide(reader, analyzer, config, **kwargs)
