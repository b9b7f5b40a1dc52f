"""E-cadherin DAB scale: the slide's membrane level read from its closed rings, and a pale run."""

from __future__ import annotations

import numpy as np
import pytest

from marrowseg import stains
from marrowseg.analyzers.ecad import ECadAnalyzer, hdab_matrix
from marrowseg.analyzers.ecad.dab_level import dab_scale, membrane_level
from marrowseg.config import load_config
from marrowseg.engine import analyze_array

MPP = 0.5
STAINS_FROM_RGB = np.linalg.inv(hdab_matrix(stains.RUIFROK_H, stains.RUIFROK_DAB))


def _ring_scene(dab_od: float, n_side: int = 7, spacing_um: float = 22.0, seed: int = 0) -> np.ndarray:
    """Round 8 µm nuclei in a faint counterstain, each in a 1.5 µm DAB membrane of ``dab_od``."""
    rng = np.random.default_rng(seed)
    size = int(round((n_side + 1) * spacing_um / MPP))
    rr, cc = np.mgrid[0:size, 0:size].astype(np.float64)
    h = np.full((size, size), 0.15)
    dab = np.zeros((size, size))
    for i in range(n_side):
        for j in range(n_side):
            d_um = np.hypot(rr - (i + 1) * spacing_um / MPP - rng.uniform(-2, 2),
                            cc - (j + 1) * spacing_um / MPP - rng.uniform(-2, 2)) * MPP
            h[d_um <= 4.0] = 0.7
            dab[(d_um >= 4.5) & (d_um <= 6.0)] = dab_od * rng.uniform(0.8, 1.2)
    m = hdab_matrix(stains.RUIFROK_H, stains.RUIFROK_DAB)[:2]
    od = h[..., None] * m[0] + dab[..., None] * m[1]
    return np.clip(255.0 * 10.0 ** (-od), 0, 255).round().astype(np.uint8)


def _cfg(*overrides: str):
    return load_config("ecad", overrides=["ecad.stain.dab_reference_od=0.4", *overrides]).ecad


def _hazed(rgb: np.ndarray, haze_od: float, seed: int = 1, sigma_px: float = 4.0) -> np.ndarray:
    """``rgb`` with a textured DAB haze (unspecific background) of mean ``haze_od`` (grain ``sigma_px``)."""
    import cv2

    noise = cv2.GaussianBlur(np.random.default_rng(seed).standard_normal(rgb.shape[:2]).astype(np.float32), (0, 0),
                             sigma_px)
    haze = haze_od * np.clip(1 + 0.5 * noise / noise.std(), 0, None)
    od = stains.od_from_rgb(rgb) + haze[..., None] * hdab_matrix(stains.RUIFROK_H, stains.RUIFROK_DAB)[1]
    return stains.rgb_from_od(od)


def test_membrane_level_follows_the_run_and_finds_the_same_rings():
    """Half the DAB, half the level, and the same rings: the ring cut follows the level. With
    the ring test's absolute cut, the pale run's membranes (0.15 OD) would not close at all."""
    cfg = _cfg()
    full, n_full = membrane_level([_ring_scene(0.5)], STAINS_FROM_RGB, MPP, cfg)
    pale, n_pale = membrane_level([_ring_scene(0.15)], STAINS_FROM_RGB, MPP, cfg)
    assert n_full == n_pale == 49
    assert pale / full == pytest.approx(0.3, rel=0.05)
    assert full == pytest.approx(0.5, abs=0.05)  # the 1 µm band lies on the 1.5 µm membrane


def test_dab_scale_brings_the_level_to_the_reference_within_its_limits():
    scale, info = dab_scale([_ring_scene(0.25)], STAINS_FROM_RGB, MPP, _cfg())
    assert scale == pytest.approx(0.4 / info["dab_level_od"]) and scale > 1.3
    assert info["dab_level_rings"] == 49 and not info["dab_scale_clipped"]
    clipped, info = dab_scale([_ring_scene(0.25)], STAINS_FROM_RGB, MPP, _cfg("ecad.stain.dab_scale_max=1.5"))
    assert clipped == 1.5 and info["dab_scale_clipped"]


def test_dab_scale_is_off_without_rings_by_choice_or_for_nuclear_stains():
    no_rings = _ring_scene(0.0)
    scale, info = dab_scale([no_rings], STAINS_FROM_RGB, MPP, _cfg())
    # a normal marrow may hold few E-cad+ cells: noted, not a fallback that the QA page flags
    assert scale == 1.0 and "too few closed membrane rings" in info["dab_scale_note"]
    assert not any("fallback" in k for k in info)
    rings = [_ring_scene(0.25)]
    assert dab_scale(rings, STAINS_FROM_RGB, MPP, _cfg("ecad.stain.dab_reference_od=null"))[0] == 1.0
    scale, info = dab_scale(rings, STAINS_FROM_RGB, MPP, _cfg("ecad.positivity_compartment=nucleus"))
    assert scale == 1.0 and "membrane" in info["dab_scale_reason"]


def test_a_dab_haze_without_membranes_gives_no_level():
    """Unspecific DAB over a field of E-cad- cells breaks into closed "rings" at a low cut; they are
    as dense as the haze and what they enclose, so none counts, and the run is not scaled up."""
    scale, info = dab_scale([_hazed(_ring_scene(0.0), 0.1)], STAINS_FROM_RGB, MPP, _cfg())
    assert scale == 1.0 and info["dab_level_rings"] < 20
    # the same haze over membranes: the rings stand out and read membrane plus haze
    level, n = membrane_level([_hazed(_ring_scene(0.3), 0.1)], STAINS_FROM_RGB, MPP, _cfg())
    assert n >= 30 and level == pytest.approx(0.4, abs=0.06)


def test_analyzer_prepare_records_and_applies_the_dab_scale():
    rgb = _ring_scene(0.25)
    cfg = load_config("ecad", overrides=["ecad.stain.dab_reference_od=0.4", "ecad.stain.vectors=standard"])
    an = ECadAnalyzer(cfg.ecad)
    info = an.prepare(rgb.reshape(-1, 3), patches=[rgb])
    assert an.dab_scale == info["dab_scale"] > 1.3
    dense = an.reference_dense(rgb)
    plain = ECadAnalyzer(load_config("ecad", overrides=["ecad.stain.dab_reference_od=null",
                                                        "ecad.stain.vectors=standard"]).ecad)
    plain.prepare(rgb.reshape(-1, 3), patches=[rgb])
    ratio = dense["dab_od"].max() / plain.reference_dense(rgb)["dab_od"].max()
    assert ratio == pytest.approx(an.dab_scale, rel=1e-4)


def test_a_pale_dab_run_keeps_its_positive_cells():
    """A phantom at half its optical densities (a pale run, or a thin section): with the DAB scale
    the E-cad+ count stays near truth; with the absolute threshold alone most positive cells are lost."""
    from marrowseg.synth import make_phantom

    w = 2048
    ph = make_phantom("ecad", seed=11, size_px=(w, w), mpp=0.25, left_shift_ratio=0.8, stain_jitter=0.3)
    pale = stains.restain(ph.render(0, 0, w, w), 0.5)
    n_pos = int(ph.truth_region(0, 0, w, w)["cells"]["ecad_pos"].sum())

    def positives(*overrides: str) -> int:
        cfg = load_config("ecad", overrides=list(overrides))
        return analyze_array(pale, 0.25, ECadAnalyzer(cfg.ecad), cfg, device="cpu").readouts["ecad_pos_cells"]

    assert abs(positives() - n_pos) <= 0.15 * n_pos
    assert positives("ecad.stain.dab_reference_od=null") < 0.5 * n_pos


def test_qa_flags_a_dab_run_far_from_the_reference(tmp_path):
    from marrowseg.report.qa import slide_flags
    from marrowseg.report.slides import SlideOutput

    def flags(scale: float) -> list[str]:
        metrics = {"stain": "ecad", "readouts": {}, "areas_um2": {"haematopoietic": 2e6},
                   "provenance": {"prepare": {"dab_scale": scale}}}
        return [f for f in slide_flags(SlideOutput("s", tmp_path, metrics)) if f.startswith("DAB run")]

    assert flags(1.9) == ["DAB run pale (membranes scaled x1.90 to the reference level)"]
    assert flags(0.6) == ["DAB run heavy (membranes scaled x0.60 to the reference level)"]
    assert flags(1.2) == [] and flags(0.8) == []


def test_grade_wording_names_a_dab_run_far_from_the_reference():
    from marrowseg.report.wording import slide_report_lines

    def lines(scale: float) -> list[str]:
        metrics = {"stain": "ecad", "readouts": {}, "provenance": {"prepare": {"dab_scale": scale}}}
        return [x for x in slide_report_lines(metrics) if x.startswith("Check the staining run")]

    assert len(lines(2.0)) == 1 and "paler" in lines(2.0)[0] and "x2.00" in lines(2.0)[0]
    assert "heavier" in lines(0.5)[0]
    assert lines(1.3) == []
