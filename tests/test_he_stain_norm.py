"""H&E haematoxylin normalisation (``he.stain.h_reference_od``): a paler slide reads like the original."""

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


def _config(ref: float | None):
    cfg = load_config("he")
    stain = cfg.he.stain.model_copy(update={"h_reference_od": ref})
    return cfg.model_copy(update={"he": cfg.he.model_copy(update={"stain": stain})})


@pytest.fixture(scope="module")
def phantom_rgb() -> np.ndarray:
    ph = synth.make_phantom("he", seed=7, size_px=(768, 768), mpp=MPP, cellularity_pct=70)
    return ph.render(0, 0, 768, 768)


def test_scale_follows_the_stain_and_does_not_compound(phantom_rgb):
    cfg = _config(1.05)
    an = HEAnalyzer(cfg.he)
    sample = phantom_rgb.reshape(-1, 3)
    s1 = an.prepare(sample)["h_scale"]
    assert an.prepare(sample)["h_scale"] == pytest.approx(s1)  # a second slide starts afresh
    pale = an.prepare(_fade(phantom_rgb, 0.8).reshape(-1, 3))
    # 20 % less haematoxylin needs a 25 % larger scale (uint8 rounding aside)
    assert pale["h_scale"] == pytest.approx(s1 / 0.8, rel=0.03)
    assert an.prepare(np.full((5000, 3), 250, np.uint8))["h_scale"] == 1.0  # glass only: no scaling


def test_pale_slide_counts_like_the_original_only_with_normalisation(phantom_rgb):
    def count(rgb, ref):
        cfg = _config(ref)
        return analyze_array(rgb, MPP, HEAnalyzer(cfg.he), cfg, device="cpu").report["readouts"]["nucleated_cells"]

    pale = _fade(phantom_rgb, 0.75)
    raw, raw_pale = count(phantom_rgb, None), count(pale, None)
    norm, norm_pale = count(phantom_rgb, 1.05), count(pale, 1.05)
    assert raw_pale < 0.9 * raw  # fixed OD thresholds lose pale nuclei
    assert abs(norm_pale - norm) <= 0.05 * norm
