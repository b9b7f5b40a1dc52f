"""H&E haematoxylin floor (``he.stain.h_reference_od``): a paler slide reads like the original."""

from __future__ import annotations

import numpy as np
import pytest

from marrowseg import synth
from marrowseg.analyzers.he import HEAnalyzer
from marrowseg.config import load_config
from marrowseg.engine import analyze_array

MPP = 0.5


def _fade(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Multiply every optical density by ``factor`` (a paler or darker stain run)."""
    od = -np.log10(np.clip(rgb.astype(np.float64), 1, 255) / 255.0)
    return np.clip(np.round(255.0 * 10.0 ** (-factor * od)), 0, 255).astype(np.uint8)


def _config(ref: float | None, limits: tuple[float, float] | None = None):
    cfg = load_config("he")
    update: dict = {"h_reference_od": ref}
    if limits is not None:
        update["h_scale_limits"] = limits
    stain = cfg.he.stain.model_copy(update=update)
    return cfg.model_copy(update={"he": cfg.he.model_copy(update={"stain": stain})})


def _phantom(cellularity: float, seed: int = 7) -> np.ndarray:
    ph = synth.make_phantom("he", seed=seed, size_px=(768, 768), mpp=MPP, cellularity_pct=cellularity)
    return ph.render(0, 0, 768, 768)


@pytest.fixture(scope="module")
def phantom_rgb() -> np.ndarray:
    return _phantom(70)


def test_scale_follows_the_stain_and_does_not_compound(phantom_rgb):
    cfg = _config(1.05, limits=(0.5, 2.0))
    an = HEAnalyzer(cfg.he)
    sample = phantom_rgb.reshape(-1, 3)
    s1 = an.prepare(sample)["h_scale"]
    assert an.prepare(sample)["h_scale"] == pytest.approx(s1)  # a second slide starts afresh
    pale = an.prepare(_fade(phantom_rgb, 0.8).reshape(-1, 3))
    # 20 % less haematoxylin needs a 25 % larger scale (uint8 rounding and the 0.15 OD cut aside)
    assert pale["h_scale"] == pytest.approx(s1 / 0.8, rel=0.05)
    assert an.prepare(np.full((5000, 3), 250, np.uint8))["h_scale"] == 1.0  # glass only: no scaling


def test_the_shipped_reference_is_a_floor(phantom_rgb):
    """Pale slides are brought up to the reference; slides above it are left exactly as they are."""
    an = HEAnalyzer(load_config("he").he)
    as_is = an.prepare(phantom_rgb.reshape(-1, 3))
    assert as_is["h_level_od"] > an.config.stain.h_reference_od and as_is["h_scale"] == 1.0
    dark = an.prepare(_fade(phantom_rgb, 1.3).reshape(-1, 3))
    assert dark["h_scale"] == 1.0
    pale = an.prepare(_fade(phantom_rgb, 0.6).reshape(-1, 3))
    assert pale["h_scale"] == pytest.approx(an.config.stain.h_reference_od / pale["h_level_od"])
    assert pale["h_scale"] > 1.1


@pytest.mark.parametrize("seed", [1056, 1061])
def test_a_fatty_marrow_is_not_taken_for_a_pale_stain(seed):
    """The level comes from nuclear pixels: a 3 %-cellular field, whose tissue is mostly fat
    membranes and bone, keeps its stain (its 99th percentile of all tissue reads 0.7-0.9 OD)."""
    an = HEAnalyzer(load_config("he").he)
    info = an.prepare(_phantom(3, seed=seed).reshape(-1, 3))
    assert info["h_scale"] == 1.0, info


def test_pale_slide_counts_like_the_original_only_with_normalisation(phantom_rgb):
    def count(rgb, ref):
        cfg = _config(ref)
        return analyze_array(rgb, MPP, HEAnalyzer(cfg.he), cfg, device="cpu").report["readouts"]["nucleated_cells"]

    pale = _fade(phantom_rgb, 0.65)
    raw, raw_pale = count(phantom_rgb, None), count(pale, None)
    ref = load_config("he").he.stain.h_reference_od
    norm, norm_pale = count(phantom_rgb, ref), count(pale, ref)
    assert norm == raw  # above the floor: untouched
    assert raw_pale < 0.9 * raw  # fixed OD thresholds lose pale nuclei
    assert abs(norm_pale - norm) <= 0.06 * norm
