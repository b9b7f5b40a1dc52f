"""H&E analyzer: the pale-nucleus pass (he.faint_nuclei) adds nuclei below the nuclear mask."""

from __future__ import annotations

import numpy as np

from marrowseg import stains
from marrowseg.analyzers.he import HEAnalyzer
from marrowseg.config import load_config
from marrowseg.engine import analyze_array

MPP = 0.5
# the scene's eosin is one constant under every pixel, which leaves a per-slide stain estimate undefined
# (it reads the haematoxylin 8 degrees off): deconvolve it with the vectors it was drawn with
RUIFROK = "he.stain.vectors=ruifrok"
FAINT = ("he.faint_nuclei={background_um: 6, contrast_od: 0.2, gap_um: 1.0, min_radius_um: 1.75, "
         "min_distance_um: 4.0, min_area_um2: 8, max_area_um2: 80, max_background_od: 0.03, max_eccentricity: 0.7}")


def _scene() -> tuple[np.ndarray, int, np.ndarray]:
    """Marrow of dense nuclei 13 µm apart on pale cytoplasm; every fourth one pale (0.28 OD, below he's 0.3 mask)."""
    n = 320
    rr, cc = (np.mgrid[0:n, 0:n] + 0.5) * MPP
    h = np.full(rr.shape, 0.01, np.float32)
    e = np.full(rr.shape, 0.35, np.float32)
    pale = []
    n_dense = 0
    for i, r in enumerate(np.arange(8.0, n * MPP - 5, 13.0)):
        for j, c in enumerate(np.arange(8.0, n * MPP - 5, 13.0)):
            disc = (rr - r) ** 2 + (cc - c) ** 2 <= 3.25**2
            if (i + j) % 4 == 1 and 2 <= i <= 9 and 2 <= j <= 9:
                h[disc] = 0.28
                pale.append((r / MPP - 0.5, c / MPP - 0.5))
            else:
                h[disc] = 0.9
                n_dense += 1
    od = h[..., None] * stains.normalize_rows(np.array(stains.RUIFROK_H)) + e[..., None] * stains.normalize_rows(
        np.array(stains.RUIFROK_E))
    return np.clip(255.0 * 10.0 ** (-od), 0, 255).round().astype(np.uint8), n_dense, np.array(pale)


def test_pale_nuclei_are_counted_only_with_the_faint_pass():
    rgb, n_dense, pale = _scene()
    assert len(pale) >= 10
    off = load_config("he", overrides=["he.faint_nuclei=null", RUIFROK])
    res_off = analyze_array(rgb, MPP, HEAnalyzer(off.he), off, device="cpu")
    on = load_config("he", overrides=[FAINT, RUIFROK])
    res_on = analyze_array(rgb, MPP, HEAnalyzer(on.he), on, device="cpu")
    assert res_off.report["readouts"]["nucleated_cells"] == n_dense  # below the mask: missed
    assert res_on.report["readouts"]["nucleated_cells"] == n_dense + len(pale)
    det = np.column_stack([res_on.cells["y"], res_on.cells["x"]])
    d = np.hypot(pale[:, None, 0] - det[None, :, 0], pale[:, None, 1] - det[None, :, 1])
    assert (d.min(axis=1) <= 1.0 / MPP).all()              # one detection on each pale nucleus
    # the contrast threshold binds: pale nuclei standing 0.27 OD out of the ground, not 0.3
    hi = load_config("he", overrides=[FAINT, RUIFROK, "he.faint_nuclei.contrast_od=0.3"])
    res_hi = analyze_array(rgb, MPP, HEAnalyzer(hi.he), hi, device="cpu")
    assert res_hi.report["readouts"]["nucleated_cells"] == n_dense
