"""The nuclei as a ruler: a slide given the wrong pixel size is flagged (``measurements.nuclear_scale``)."""

from __future__ import annotations

import numpy as np
import pytest

from marrowseg.analyzers import get_analyzer
from marrowseg.analyzers.marrow import NUCLEAR_SCALE_MIN_CELLS, nuclear_log_area_sum, nuclear_scale
from marrowseg.config import load_config
from marrowseg.engine import analyze_array
from marrowseg.synth import make_phantom


@pytest.mark.parametrize("stain", ["he", "ecad"])
def test_a_phantom_told_the_wrong_pixel_size_is_flagged(stain):
    """The phantoms' nuclei (drawn from published sizes) read inside the marrow range at their own
    0.25 µm/px. Said to be 0.5 µm/px (every area x4) the H&E phantom reads above it, said to be
    0.125 µm/px the E-cadherin phantom below it. The other sides move the mean as far but stay
    inside: the H&E phantom's nuclei read larger than real marrow's (29 against 16.5-21.6 µm²;
    told 0.125: 15.7), and the E-cadherin phantoms told 0.5 read 31-40 µm²."""
    rgb = make_phantom(stain, seed=6, size_px=(1024, 1024), mpp=0.25).render(0, 0, 1024, 1024)[..., :3]
    cfg = load_config(stain)
    scale = {}
    for mpp in (0.125, 0.25, 0.5):
        res = analyze_array(np.ascontiguousarray(rgb), mpp, get_analyzer(stain, cfg), cfg, device="cpu")
        scale[mpp] = res.report["measurements"]["nuclear_scale"]
    low, high = cfg.he.nuclear_area_check_um2 if stain == "he" else cfg.ecad.nuclear_area_check_um2
    assert min(s["cells"] for s in scale.values()) >= NUCLEAR_SCALE_MIN_CELLS
    assert low <= scale[0.25]["geomean_area_um2"] <= high and not scale[0.25]["outside"]
    assert scale[0.125]["geomean_area_um2"] < 0.7 * scale[0.25]["geomean_area_um2"]
    assert scale[0.5]["geomean_area_um2"] > 1.4 * scale[0.25]["geomean_area_um2"]
    if stain == "he":
        assert scale[0.5]["geomean_area_um2"] > high and scale[0.5]["outside"]
    else:
        assert scale[0.125]["geomean_area_um2"] < low and scale[0.125]["outside"]


def test_the_slide_mean_is_the_exact_mean_over_tiles():
    """Per-tile sums of log areas and counts give the geometric mean of all the slide's cells."""
    rng = np.random.default_rng(1)
    tiles = [rng.lognormal(3.0, 0.4, n) for n in (10, 25, 40)]
    totals = {"n_nucleated": sum(len(t) for t in tiles), "nuclear_log_area_sum": sum(nuclear_log_area_sum(t) for t in tiles)}
    got = nuclear_scale(totals, [13.0, 40.0])
    assert got["geomean_area_um2"] == pytest.approx(np.exp(np.log(np.concatenate(tiles)).mean()), rel=1e-12)
    assert got["cells"] == 75 and got["outside"] is False
    few = nuclear_scale({"n_nucleated": NUCLEAR_SCALE_MIN_CELLS - 1, "nuclear_log_area_sum": 0.0}, [13.0, 40.0])
    assert few["geomean_area_um2"] is None and few["outside"] is False
    assert nuclear_scale(totals, None)["outside"] is False
