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
