"""A minimal analyzer for engine tests: dark discs on a bright field.

It exercises every part of the interface (module, post with maps, cells and windows,
finalize) with rules simple enough that the truth is known by construction.
"""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import torch

from marrowseg.analyzers.base import Analyzer, LabelClass, TileResult


class _Smooth(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        od = -torch.log10(torch.clamp(x, min=1.0) / 255.0).mean(dim=1, keepdim=True)
        k = torch.ones(1, 1, 3, 3, dtype=od.dtype, device=od.device) / 9
        return {"od": torch.nn.functional.conv2d(od, k, padding=1)[:, 0]}


class DiscAnalyzer(Analyzer):
    stain = "toy"
    map_names = ("labels",)
    label_classes = (LabelClass(0, "background", (0, 0, 0)), LabelClass(1, "dark", (200, 0, 0)))
    cell_classes = (LabelClass(1, "disc", (255, 0, 0)),)

    def __init__(self, mpp: float = 1.0, halo_um: float = 16.0, downsample: int = 1) -> None:
        super().__init__(SimpleNamespace(mpp=mpp, halo_um=halo_um))
        self._k = downsample
        self.prepared = None

    @property
    def map_downsample(self) -> int:
        return self._k

    @property
    def window_um(self) -> float:
        return 40.0

    def prepare(self, sample_rgb: np.ndarray) -> dict:
        self.prepared = sample_rgb.shape
        return {"n_sample": int(len(sample_rgb))}

    def build_module(self) -> torch.nn.Module:
        return _Smooth()

    def post(self, dense, rgb, ctx) -> TileResult:
        dark = (dense["od"] > 0.3).astype(np.uint8)
        core = dark[ctx.core]
        n, lab, st, cen = cv2.connectedComponentsWithStats(dark, connectivity=8)
        rows, cols = cen[1:, 1], cen[1:, 0]
        area = st[1:, cv2.CC_STAT_AREA].astype(np.float64) * ctx.mpp**2
        keep = ctx.in_core(rows, cols)
        win = {}
        r0, c0 = ctx.core_origin_px
        rr, cc = np.nonzero(core)
        wr = ((rr + r0) * ctx.mpp // self.window_um).astype(int)
        wc = ((cc + c0) * ctx.mpp // self.window_um).astype(int)
        for key in set(zip(wr.tolist(), wc.tolist(), strict=True)):
            sel = (wr == key[0]) & (wc == key[1])
            win[key] = {"dark_px": int(sel.sum())}
        k = self._k
        return TileResult(
            stats={"dark_px": int(core.sum()), "core_px": int(core.size), "n_discs": int(keep.sum())},
            maps={"labels": core[::k, ::k]},
            cells={"row": rows[keep], "col": cols[keep], "class": np.full(int(keep.sum()), "disc"),
                   "area_um2": area[keep]},
            windows=win,
        )

    def finalize(self, totals, windows, *, age=None):
        return {"readouts": {"dark_frac": totals.get("dark_px", 0) / max(totals.get("core_px", 1), 1),
                             "n_discs": totals.get("n_discs", 0)},
                "areas_um2": {"dark": totals.get("dark_px", 0) * self.mpp**2}, "counts": {}}


def disc_image(shape=(700, 900), n=40, radius_px=5, seed=0):
    """Bright field with ``n`` dark discs that do not touch; returns the image and centres."""
    rng = np.random.default_rng(seed)
    img = np.empty((*shape, 3), np.uint8)
    img[:] = (225, 190, 215)  # a pale pink tissue wash, so the tissue mask keeps the field
    centres = []
    while len(centres) < n:
        c = rng.uniform(radius_px + 2, np.array(shape) - radius_px - 2)
        if all(np.hypot(*(c - d)) > 2 * radius_px + 4 for d in centres):
            centres.append(c)
    for r, c in centres:
        cv2.circle(img, (int(round(c)), int(round(r))), radius_px, (60, 40, 90), -1)
    return img, np.array(centres)
