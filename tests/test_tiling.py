"""Tile grid geometry and tissue detection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marrowseg.tiling import axis_cores, tile_grid, tiles_over_mask, tissue_mask


@settings(max_examples=150, deadline=None)
@given(h=st.integers(1, 3000), w=st.integers(1, 3000), tile=st.integers(32, 1024), overlap=st.integers(0, 256))
def test_core_regions_cover_every_pixel_exactly_once(h, w, tile, overlap):
    """Summing per-tile core masks gives exactly one hit per slide pixel."""
    overlap = min(overlap, tile - 1)
    # Cap the tile count so one example stays cheap; small tiles are covered on small slides.
    tile = max(tile, int(np.ceil(max(h, w) / 40)) + overlap)
    hits = np.zeros((h, w), np.uint8)
    for t in tile_grid((h, w), tile_px=tile, overlap_px=overlap):
        rs, cs = t.core_slide
        hits[rs, cs] += 1
        # the core lies inside the tile, and the tile starts on the grid
        assert 0 <= t.core[0].start <= t.core[0].stop <= tile
        assert 0 <= t.core[1].start <= t.core[1].stop <= tile
        assert t.core[0].stop > t.core[0].start and t.core[1].stop > t.core[1].start
    assert (hits == 1).all()


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 5000), tile=st.integers(32, 1024), overlap=st.integers(0, 256))
def test_axis_cores_keep_half_the_overlap_as_context(n, tile, overlap):
    """Interior core edges sit overlap//2 px inside the tile, so every core pixel has that context."""
    overlap = min(overlap, tile - 1)
    cores = axis_cores(n, tile, overlap)
    half = overlap // 2
    for k, (start, lo, hi) in enumerate(cores):
        if k > 0:
            assert lo - start == half
        if k < len(cores) - 1:
            assert start + tile - hi >= overlap - half


def test_axis_cores_rejects_overlap_as_large_as_tile():
    with pytest.raises(ValueError, match="overlap"):
        axis_cores(100, 64, 64)


def test_tiles_over_mask_keeps_only_tiles_touching_tissue_and_reindexes():
    mask = np.zeros((10, 10), bool)
    mask[0:2, 0:2] = True  # top-left 20% of each axis
    tiles = tiles_over_mask((1000, 1000), mask, tile_px=200, overlap_px=0)
    assert [t.index for t in tiles] == list(range(len(tiles)))
    assert {t.grid_rc for t in tiles} == {(0, 0)}
    assert len(tiles_over_mask((1000, 1000), None, tile_px=200, overlap_px=0)) == 25


def _core_image(mpp: float) -> np.ndarray:
    """A pink tissue disc of radius 600 µm on glass, with a glass-edge line and a speck."""
    n = int(2000 / mpp)
    yy, xx = np.mgrid[:n, :n] * mpp
    img = np.full((n, n, 3), 242, np.uint8)
    disc = (yy - 1000) ** 2 + (xx - 1000) ** 2 < 600**2
    img[disc] = (200, 120, 170)
    img[:, int(100 / mpp)] = (90, 90, 90)        # glass edge: dark, grey, one pixel wide
    speck = (yy - 150) ** 2 + (xx - 1800) ** 2 < 20**2  # dust: 40 µm
    img[speck] = (150, 100, 140)
    return img, disc


@pytest.mark.parametrize("mpp", [4.0, 8.0])
def test_tissue_mask_finds_core_ignores_glass_edge_and_dust(mpp):
    img, disc = _core_image(mpp)
    mask = tissue_mask(img, mpp, min_object_um2=40_000, margin_um=0)
    assert mask[disc].mean() > 0.97
    outside = ~disc
    assert mask[outside].mean() < 0.01


def test_tissue_mask_of_blank_glass_is_empty():
    img = np.full((200, 200, 3), 245, np.uint8)
    rng = np.random.default_rng(0)
    img = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
    assert not tissue_mask(img, 8.0).any()
