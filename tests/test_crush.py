"""Crush artefact: marrow whose nuclei are drawn out into parallel strands is left out (H&E).

No real crushed trephine is at hand; crush is drawn by :func:`marrowseg.synth.crush_field`, which
knows nothing of how it is detected (docs/validation.md, Crush artefact).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from marrowseg import synth
from marrowseg.analyzers.crush import coherence, fat_in_crush
from marrowseg.analyzers.he import HEAnalyzer
from marrowseg.config import load_config
from marrowseg.engine import analyze_array

MBM = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbm-dev"


def _analyse(rgb: np.ndarray, mpp: float, *overrides: str):
    cfg = load_config("he", overrides=list(overrides))
    return analyze_array(rgb, mpp, HEAnalyzer(cfg.he), cfg, device="cpu", workers=0)


def _labels(res, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(np.asarray(res.maps["labels"], np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def test_coherence_is_low_for_round_nuclei_and_high_for_strands():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    round_ = np.zeros((256, 256), np.float32)
    for r, c in rng.uniform(0, 256, (400, 2)):
        round_[(yy - r) ** 2 + (xx - c) ** 2 <= 9] = 0.8
    strands = (0.4 + 0.4 * np.sin(yy / 2.0)).astype(np.float32) + rng.normal(0, 0.05, (256, 256)).astype(np.float32)
    everywhere = np.ones((256, 256), bool)
    coh_round, support = coherence(round_, everywhere, 8.0)
    coh_strands, _ = coherence(strands, everywhere, 8.0)
    assert np.percentile(coh_round[32:-32, 32:-32], 99) < 0.2
    assert np.percentile(coh_strands[32:-32, 32:-32], 1) > 0.8
    assert support.min() == pytest.approx(1.0, abs=1e-5)
    # the edge of a region outside the weight adds no direction: a straight glass edge beside round nuclei
    half = everywhere.copy()
    half[:, 128:] = False
    edged = round_.copy()
    edged[:, 128:] = 0.0
    coh_edge, support = coherence(edged, half, 8.0)
    assert np.percentile(coh_edge[32:-32, 100:118], 99) < 0.3
    assert support[128, 0] == pytest.approx(1.0, abs=1e-3) and support[128, 127] < 0.6


def test_a_fat_space_goes_with_the_crush_round_it():
    fat = np.zeros((100, 200), bool)
    fat[40:60, 20:60] = True      # in the crushed part
    fat[40:60, 140:180] = True    # in the intact part
    marrow = ~fat
    crush = np.zeros_like(fat)
    crush[:, :100] = True
    crush &= marrow
    out = fat_in_crush(fat, marrow, crush, 1.0, band_um=10)
    assert out[50, 40] and not out[50, 160]
    assert out.sum() == 20 * 40


def test_crush_field_keeps_the_stain_and_squeezes_the_field():
    od = 0.2
    rgb = np.full((100, 120, 3), round(255 * 10 ** -od), np.uint8)
    out = synth.crush_field(rgb, 0.5, stretch=1.5, squeeze=0.5, smear_um=4)
    assert out.shape == (50, 120, 3)
    # the same material on three quarters of the area: a third more absorbance
    measured = -np.log10(out.astype(float) / 255).mean()
    expect = -np.log10(rgb.astype(float) / 255).mean() / (1.5 * 0.5)
    assert measured == pytest.approx(expect, rel=0.03)
    with pytest.raises(ValueError):
        synth.crush_field(rgb, 0.5, stretch=0.5)


@pytest.fixture(scope="module")
def crushed_core():
    """A cellular phantom field with a crushed copy of it joined below (a core crushed along one side)."""
    ph = synth.make_phantom("he", seed=1003, size_px=(768, 768), mpp=0.5, cellularity_pct=90)
    rgb = ph.render(0, 0, 768, 768)
    band = synth.crush_field(rgb, 0.5, stretch=1.6, squeeze=0.45, smear_um=8, wave_um=2, seed=3)
    return rgb, np.vstack([rgb, band])


def test_a_crushed_band_is_left_out_and_the_intact_marrow_beside_it_is_not(crushed_core):
    rgb, both = crushed_core
    intact = _analyse(rgb, 0.5)
    on, off = _analyse(both, 0.5), _analyse(both, 0.5, "he.tissue.crush=null")
    assert intact.report["measurements"]["crush"]["area_um2"] == 0
    crush = on.report["measurements"]["crush"]
    assert crush["area_um2"] > 0.5 * (both.shape[0] - rgb.shape[0]) * both.shape[1] * 0.25 * 0.5
    assert "crush" not in off.report["measurements"]
    lab_on, lab_off = _labels(on, both.shape[:2]), _labels(off, both.shape[:2])
    h = rgb.shape[0]
    marrow_intact = np.isin(lab_off[:h], (1, 2))
    assert (lab_on[:h][marrow_intact] == 0).mean() < 0.01
    # the crushed strands are no round late erythroid nuclei: left in, they pull the share down
    late = lambda r: r.readouts["late_erythroid_per_100"]  # noqa: E731
    assert abs(late(on) - late(intact)) < abs(late(off) - late(intact))
    assert on.readouts["nucleated_cells"] < off.readouts["nucleated_cells"]


@pytest.mark.parametrize("cellularity", [10, 95])
def test_intact_phantoms_lose_nothing_to_crush(cellularity):
    ph = synth.make_phantom("he", seed=1004, size_px=(768, 768), mpp=0.5, cellularity_pct=cellularity)
    res = _analyse(ph.render(0, 0, 768, 768), 0.5)
    assert res.report["measurements"]["crush"] == {"area_um2": 0.0, "share_of_marrow": 0.0}


@pytest.mark.skipif(not MBM.is_dir(), reason="../shared/data/mbm-dev not present")
def test_real_marrow_keeps_its_marrow_and_loses_a_crushed_band():
    """The four quadrant crops of one real source image, intact and with a crushed copy below."""
    from marrowseg.io import open_slide

    quads = []
    for i in range(4):
        with open_slide(MBM / f"BM_GRAZ_HE_0002_02_00{i}.png", mpp=0.25) as reader:
            quads.append(np.asarray(reader.read_region(0, 0, 600, 600, 0.25)))
    rgb = np.vstack([np.hstack(quads[:2]), np.hstack(quads[2:])])
    assert _analyse(rgb, 0.25).report["measurements"]["crush"]["area_um2"] == 0
    both = np.vstack([rgb, synth.crush_field(rgb, 0.25, stretch=1.6, squeeze=0.45, smear_um=8, wave_um=2, seed=7)])
    on, off = _analyse(both, 0.25), _analyse(both, 0.25, "he.tissue.crush=null")
    lab_on, lab_off = _labels(on, both.shape[:2]), _labels(off, both.shape[:2])
    band_tissue = lab_off[rgb.shape[0]:] != 0
    assert (lab_on[rgb.shape[0]:][band_tissue] == 0).mean() > 0.6
    assert on.report["measurements"]["crush"]["share_of_marrow"] > 0.1


def test_ecadherin_leaves_a_crushed_band_out_and_its_false_left_shift_with_it():
    """Crushed nuclei fail the late-erythroid rules while E-cad+ membranes still count: left in, a
    crushed band raises the left-shift ratio."""
    from marrowseg.analyzers.ecad import ECadAnalyzer

    ph = synth.make_phantom("ecad", seed=1003, size_px=(1536, 1536), mpp=0.25, left_shift_ratio=0.3)
    rgb = ph.render(0, 0, 1536, 1536)
    both = np.vstack([rgb, synth.crush_field(rgb, 0.25, stretch=1.6, squeeze=0.45, smear_um=8, wave_um=2, seed=3)])

    def run(img, *overrides):
        cfg = load_config("ecad", overrides=list(overrides))
        return analyze_array(img, 0.25, ECadAnalyzer(cfg.ecad), cfg, device="cpu", workers=0)

    intact, on, off = run(rgb), run(both), run(both, "ecad.tissue.classes.crush=null")
    assert intact.report["measurements"]["crush"]["area_um2"] == 0
    assert on.report["measurements"]["crush"]["area_um2"] > 0
    ratio = lambda r: r.readouts["left_shift_ratio"]  # noqa: E731
    assert ratio(off) - ratio(intact) > 0.015  # 0.025 as drawn
    assert abs(ratio(on) - ratio(intact)) < 0.5 * (ratio(off) - ratio(intact))
