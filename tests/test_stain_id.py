"""Automatic stain recognition from colour (marrowseg.stain_id)."""

from __future__ import annotations

import numpy as np
import pytest

from marrowseg.errors import NoTissueError
from marrowseg.stain_id import identify_stain, stain_features
from marrowseg.synth import make_phantom


@pytest.mark.parametrize("stain", ["he", "ecad", "reticulin"])
@pytest.mark.parametrize("seed", [3, 4])
def test_phantoms_are_recognised(stain, seed):
    """Each phantom stain is named correctly with a clear margin."""
    rgb = make_phantom(stain, seed=seed, size_px=(384, 384), mpp=1.0).render(0, 0, 384, 384)
    g = identify_stain(rgb)
    assert g.stain == stain, g
    assert g.confidence >= 0.5


def _beer_lambert(conc: np.ndarray, vectors: list[tuple[float, float, float]]) -> np.ndarray:
    """RGB of stain amounts ``conc`` (H, W, k) through the OD ``vectors`` (k of them)."""
    od = conc @ np.asarray(vectors, np.float64)
    return np.clip(255.0 * 10.0 ** (-od), 0, 255).astype(np.uint8)


def test_pink_of_mixed_haematoxylin_and_dab_is_not_eosin():
    """Haematoxylin + a light DAB wash puts its hue in the eosin sector but not its saturation:
    an IHC field with few positive cells is DAB, while real eosin beside the same nuclei is H&E."""
    h, dab, eosin = (0.65, 0.70, 0.29), (0.27, 0.57, 0.78), (0.07, 0.99, 0.11)  # Ruifrok & Johnston 2001
    rng = np.random.default_rng(1)
    nuclei = rng.random((256, 256)) < 0.15
    counter = np.where(nuclei, 0.9, 0.25) + rng.normal(0, 0.02, (256, 256))
    ihc = _beer_lambert(np.dstack([counter, np.where(nuclei, 0.0, 0.22)]), [h, dab])
    he = _beer_lambert(np.dstack([counter, np.where(nuclei, 0.1, 0.35)]), [h, eosin])
    f = stain_features(ihc)
    assert f["pink_frac"] > 0.3 and f["pink_saturation"] < 0.2  # the hue of eosin, not its saturation
    assert identify_stain(ihc).stain == "ecad"
    assert stain_features(he)["pink_saturation"] > 0.3
    assert identify_stain(he).stain == "he"


def test_blank_slide_raises_no_tissue():
    """A white field has nothing to judge: NoTissueError, not a guess."""
    with pytest.raises(NoTissueError):
        identify_stain(np.full((256, 256, 3), 245, np.uint8))


def test_grey_image_is_not_called_he_or_dab():
    """A colourless (greyscale) field gets no H&E or DAB score."""
    rng = np.random.default_rng(0)
    grey = rng.integers(60, 200, (256, 256), dtype=np.uint8)
    g = identify_stain(np.repeat(grey[..., None], 3, axis=2))
    assert g.scores["he"] == 0 and g.scores["dab"] == 0


def test_features_reject_wrong_shape():
    """Input shape is checked and reported."""
    with pytest.raises(ValueError, match=r"\(64, 64\)"):
        stain_features(np.zeros((64, 64), np.uint8))


@pytest.mark.parametrize(("rel", "stain", "mpp"), [
    ("mbm-dev/BM_GRAZ_HE_0001_01_000.png", "he", 0.25),
    ("ihc-ki67/22_2.png", "ecad", 0.25),
    ("reticulin-bombr/fig0_image.png", "reticulin", 1.0),
    ("wsi/OS-2-ndpi.ome.tif", "ecad", None),
])
def test_real_images(shared_data, rel, stain, mpp):
    """Public images of each stain family (skipped without ../shared/data)."""
    from marrowseg.io import open_slide

    with open_slide(shared_data(rel), mpp=mpp) as reader:
        assert identify_stain(reader.thumbnail(1024)).stain == stain


@pytest.mark.parametrize("stain", ["he", "ecad", "reticulin"])
def test_black_fill_does_not_change_the_recognised_stain(stain):
    """An unscanned black band is neutral and dark like silver; it is left out of the tissue."""
    ph = make_phantom(stain, seed=1090, size_px=(768, 768), mpp=1.0)
    rgb = ph.render(0, 0, 768, 768)
    rgb[:, :240] = 0
    guess = identify_stain(rgb)
    assert guess.stain == stain and guess.confidence >= 0.5


def test_tissue_pixels_is_the_mean_od_and_some_light_rule():
    """The OpenCV path gives exactly the plain definition: mean RGB optical density above the
    cut and a channel above 8 (every value of one channel against the other two's extremes,
    random colours, and shapes a caller may pass)."""
    from marrowseg.stain_id import tissue_pixels
    from marrowseg.stains import OD_OF_UINT8

    def plain(arr, cut):
        od = OD_OF_UINT8[arr[..., :3]].astype(np.float32)
        return ((od[..., 0] + od[..., 1] + od[..., 2]) / 3.0 > cut) & (arr[..., :3].max(axis=-1) > 8)

    v = np.arange(256, dtype=np.uint8)
    grid = np.stack(np.meshgrid(v, v, v[::15], indexing="ij"), axis=-1).reshape(256, -1, 3)
    rng = np.random.default_rng(0)
    for arr in (grid, rng.integers(0, 256, (300, 200, 3), dtype=np.uint8),
                rng.integers(0, 256, (1000, 3), dtype=np.uint8), rng.integers(0, 256, (5, 4, 4), dtype=np.uint8),
                np.zeros((0, 3), np.uint8)):
        for cut in (0.05, 0.12, 0.3):
            got = tissue_pixels(arr, cut)
            assert got.shape == arr.shape[:-1]
            assert np.array_equal(got, plain(arr, cut))
