"""The one small interface every stain analyzer implements.

The engine (:mod:`marrowseg.engine`) reads tiles, batches them and calls, per slide::

    analyzer.prepare(sample_rgb)               # once: slide-level estimates (stain vectors)
    dense = analyzer.module(batch)             # per batch, on the device: (B, 3, H, W) float32 0..255
    result = analyzer.post(dense_i, rgb_i, ctx)  # per tile, on the CPU: labelling, skeletons, cells
    ...                                        # engine sums result.stats over tiles, in tile order
    report = analyzer.finalize(totals, windows)  # once: readouts from the sums

Rules that make slide results exact sums of tile results:

* ``post`` counts only the tile's *core* region (``ctx.core``): areas as pixel counts,
  cells whose centroid lies in the core, lengths of skeleton pixels in the core.
* ``stats`` values are additive (int pixel counts preferred; the engine multiplies by
  ``mpp**2`` where the key ends in ``_px`` and says so). Ratios are formed only in
  ``finalize``.
* ``maps`` cover exactly the core region, downsampled by ``map_downsample``.

Analyzers see arrays and tensors only, never paths or readers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = ["Analyzer", "TileContext", "TileResult", "LabelClass"]


@dataclass(frozen=True)
class LabelClass:
    """One value of a label map or one cell class: its name and display colour."""

    value: int
    name: str
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class TileContext:
    """Where a tile sits, in pixels of the analysis resolution.

    Attributes
    ----------
    index : int
        Position of the tile in the slide's grid order (row-major).
    origin_px : (int, int)
        (row, col) of the tile's top-left pixel in slide coordinates at ``mpp``.
    core : (slice, slice)
        The tile's core region, in tile coordinates; cores of all tiles partition the slide.
    valid_px : (int, int)
        (rows, cols) of the tile that lie inside the slide; the rest is white padding.
    mpp : float
        Analysis resolution, µm per pixel.
    """

    index: int
    origin_px: tuple[int, int]
    core: tuple[slice, slice]
    valid_px: tuple[int, int]
    mpp: float

    @property
    def core_origin_px(self) -> tuple[int, int]:
        """(row, col) of the core's top-left pixel in slide coordinates at ``mpp``."""
        return (self.origin_px[0] + self.core[0].start, self.origin_px[1] + self.core[1].start)

    @property
    def core_shape(self) -> tuple[int, int]:
        return (self.core[0].stop - self.core[0].start, self.core[1].stop - self.core[1].start)

    def in_core(self, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        """Boolean mask of tile-coordinate points whose pixel lies in the core.

        Points are assigned to the pixel that contains them (``floor``), so a point on a
        core border belongs to exactly one tile.
        """
        r = np.floor(np.asarray(row, dtype=np.float64))
        c = np.floor(np.asarray(col, dtype=np.float64))
        return (
            (r >= self.core[0].start) & (r < self.core[0].stop)
            & (c >= self.core[1].start) & (c < self.core[1].stop)
        )


@dataclass
class TileResult:
    """What ``post`` returns for one tile (core region only).

    Attributes
    ----------
    stats : dict of str to int or float
        Additive quantities over the core: pixel counts (keys ending in ``_px``),
        counts (``n_...``), lengths (``..._um``). Summed over tiles by the engine.
    maps : dict of str to (h, w) uint8 ndarray
        Per-pixel maps of the core region at ``mpp * map_downsample``.
    cells : dict of str to (N,) ndarray
        One entry per detected cell whose centroid lies in the core; must contain
        ``row`` and ``col`` (float, tile pixels at ``mpp``) and ``class`` (str).
    windows : dict of (int, int) to dict of str to float
        Additive quantities per grid window (slide-aligned, see ``Analyzer.window_um``),
        keyed by window (row, col) index.
    """

    stats: dict[str, float] = field(default_factory=dict)
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    cells: dict[str, np.ndarray] = field(default_factory=dict)
    windows: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)


class Analyzer(ABC):
    """Base class of the per-stain analyzers.

    Subclasses set the class attributes and implement :meth:`build_module`,
    :meth:`post` and :meth:`finalize`; :meth:`prepare` is optional.
    """

    #: stain key, as in the config and the CLI (``he``, ``ecad``, ``reticulin``)
    stain: ClassVar[str]
    #: names of the per-pixel maps ``post`` returns; the first is the tissue label map
    map_names: ClassVar[tuple[str, ...]] = ("labels",)
    #: values and colours of the tissue label map
    label_classes: ClassVar[tuple[LabelClass, ...]] = ()
    #: names and colours of the cell classes (``class`` column of cells.csv)
    cell_classes: ClassVar[tuple[LabelClass, ...]] = ()
    #: whether ``module`` may run under autocast (float16/bfloat16) on CUDA
    allow_amp: ClassVar[bool] = True
    #: whether the stains are told apart by hue: a greyscale image is then refused, not measured
    needs_colour: ClassVar[bool] = False
    #: side of the patches (one window of each sample tile, wider when the slide has fewer than
    #: 8 tiles), analysis pixels, that :meth:`prepare` also receives (``patches=``) for estimates
    #: that need pixels in place (0: none, ``prepare(sample_rgb)``)
    sample_patch_px: ClassVar[int] = 0
    #: coarsest scan, µm/px, at which this analyzer's figures were validated; a coarser slide is
    #: still analysed (it is upsampled to ``mpp``) but flagged (None: no limit)
    max_scan_mpp: ClassVar[float | None] = None
    #: resident memory (PSS) of a CPU run with tile workers, MB: ``(main, main per Mpx of
    #: tile, worker, worker per Mpx of tile)``; a run with ``n`` workers holds about
    #: ``main + n * worker`` plus the per-Mpx terms times ``tile_px ** 2 / 1e6`` (see
    #: :meth:`memory_estimate_mb`). The engine bounds its automatic worker count with it.
    #: Subclasses set figures measured with ``scripts/worker_memory.py``; these are generous.
    memory_model_mb: ClassVar[tuple[float, float, float, float]] = (600.0, 100.0, 150.0, 200.0)

    def __init__(self, config: Any) -> None:
        self.config = config
        self._module: torch.nn.Module | None = None

    # -- geometry -------------------------------------------------------------------
    @property
    def mpp(self) -> float:
        """Analysis resolution, µm per pixel."""
        return float(self.config.mpp)

    @property
    def halo_um(self) -> float:
        """Context each tile needs beyond its core, µm."""
        return float(self.config.halo_um)

    @property
    def map_downsample(self) -> int:
        """Integer factor between the analysis pixels and the map pixels."""
        return 1

    @property
    def window_um(self) -> float | None:
        """Side of the slide-aligned windows of ``TileResult.windows`` (µm), or None."""
        return None

    def memory_estimate_mb(self, tile_px: int, workers: int) -> float:
        """Expected peak resident memory (PSS, all processes) of a CPU run, MB.

        Parameters
        ----------
        tile_px : int
            Side of a tile with its halo, analysis pixels.
        workers : int
            Tile worker processes.

        Returns
        -------
        float
            ``main + workers * worker``, each grown by its per-Mpx term.
        """
        main, main_mpx, worker, worker_mpx = self.memory_model_mb
        mpx = tile_px * tile_px / 1e6
        return main + main_mpx * mpx + workers * (worker + worker_mpx * mpx)

    # -- the three steps ---------------------------------------------------------------
    def prepare(self, sample_rgb: np.ndarray, patches: Sequence[np.ndarray] = ()) -> dict[str, Any]:
        """Estimate slide-level parameters from a sample of tissue pixels.

        Parameters
        ----------
        sample_rgb : (N, 3) uint8 ndarray
            Tissue pixels drawn from the slide at the analysis resolution.
        patches : sequence of (H, W, 3) uint8 ndarray, optional
            One window (the most stained) of each tile the pixels came from, at the analysis resolution. The
            engine passes them (as a keyword) only to analyzers with ``sample_patch_px > 0``,
            so an override without this parameter keeps working.

        Returns
        -------
        dict
            JSON-serialisable description of what was estimated (goes to provenance).
        """
        return {}

    @property
    def needs_sample(self) -> bool:
        """Whether :meth:`prepare` looks at the pixel sample; the engine reads none otherwise.

        True when a subclass overrides :meth:`prepare`; override this where ``prepare``
        uses the sample only under some settings.
        """
        return type(self).prepare is not Analyzer.prepare

    @property
    def module(self) -> torch.nn.Module:
        """The dense per-pixel step: ``(B, 3, H, W)`` float32 RGB 0..255 -> dict of tensors."""
        if self._module is None:
            self._module = self.build_module()
        return self._module

    @abstractmethod
    def build_module(self) -> torch.nn.Module:
        """Create the torch module that runs on a batch (called after :meth:`prepare`)."""

    @abstractmethod
    def post(self, dense: dict[str, np.ndarray], rgb: np.ndarray, ctx: TileContext) -> TileResult:
        """Per-tile CPU step.

        Parameters
        ----------
        dense : dict of str to ndarray
            This tile's slice of the module's outputs, on the CPU, batch axis removed.
        rgb : (H, W, 3) uint8 ndarray
            The tile as read (halo included, white beyond ``ctx.valid_px``).
        ctx : TileContext
            Geometry of the tile.
        """

    def window_outputs(self, windows: dict[tuple[int, int], dict[str, float]]) -> dict[str, Any]:
        """Files derived from the slide's window sums, beside ``windows.csv``; none by default.

        Parameters
        ----------
        windows : dict
            Sum over tiles of every window's stats (as for :meth:`finalize`).

        Returns
        -------
        dict of str to (list of dict or (H, W, 3) uint8 ndarray)
            ``name.csv`` -> table rows, ``name.png`` -> an RGB image.
        """
        return {}

    @abstractmethod
    def finalize(
        self,
        totals: dict[str, float],
        windows: dict[tuple[int, int], dict[str, float]],
        *,
        age: float | None = None,
    ) -> dict[str, Any]:
        """Turn slide-level sums into readouts.

        Parameters
        ----------
        totals : dict
            Sum over tiles of every ``stats`` key (pixel counts still in pixels).
        windows : dict
            Sum over tiles of every window's stats.
        age : float, optional
            Patient age in years, for age-adjusted judgements.

        Returns
        -------
        dict
            ``{"readouts": {...}, "areas_um2": {...}, "counts": {...}}`` and optionally
            ``"measurements"`` / ``"interpretation"``; values JSON-serialisable.
        """
