"""Exact distance transforms: OpenCV's figures must be SciPy's, nearest labels must be nearest."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from marrowseg.analyzers.distance import distance_to_background, nearest_label_band


@pytest.mark.parametrize("seed", range(6))
def test_distance_to_background_equals_scipy(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 160, 2))
    mask = ndi.gaussian_filter(rng.random(shape), 2.0) > rng.uniform(0.3, 0.7)
    got = distance_to_background(mask)
    assert got.dtype == np.float32
    assert np.array_equal(got, ndi.distance_transform_edt(mask).astype(np.float32))


@pytest.mark.parametrize("mask", [np.ones((7, 9), bool), np.zeros((7, 9), bool), np.ones((1, 1), bool)])
def test_distance_to_background_degenerate_masks_follow_scipy(mask):
    # OpenCV returns a sentinel where there is no background: SciPy's answer is kept
    assert np.array_equal(distance_to_background(mask), ndi.distance_transform_edt(mask).astype(np.float32))


def _brute_force_band(labels, inner, outer):
    lr, lc = np.nonzero(labels)
    rows, cols, nearest = [], [], []
    for r, c in zip(*np.nonzero(labels == 0), strict=True):
        d2 = (lr - r) ** 2 + (lc - c) ** 2
        d = np.sqrt(d2.min())
        if inner < d <= outer:
            rows.append(r)
            cols.append(c)
            nearest.append(set(labels[lr[d2 == d2.min()], lc[d2 == d2.min()]].tolist()))
    return np.array(rows, np.intp), np.array(cols, np.intp), nearest


@pytest.mark.parametrize("seed", range(5))
def test_nearest_label_band_is_the_exact_band_and_owners_are_nearest(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(20, 60, 2))
    labels = ndi.label(ndi.gaussian_filter(rng.random(shape), 1.2) > 0.6)[0].astype(np.int32)
    for inner, outer in ((0.0, 4.0), (1.0, 2.5), (0.5, 6.3)):
        bg, rr, cc, owner = nearest_label_band(labels, inner, outer)
        er, ec, nearest = _brute_force_band(labels, inner, outer)
        assert np.array_equal(bg, labels == 0)
        assert np.array_equal(rr, er) and np.array_equal(cc, ec)
        assert all(int(o) in s for o, s in zip(owner, nearest, strict=True))


def test_nearest_label_band_owner_is_the_first_nearest_in_raster_order():
    # scattered single-pixel labels, many ties: OpenCV's 5x5 chamfer metric named a farther
    # label for some pixels; the owner is now exactly the nearest, the first in raster order
    labels = np.zeros((40, 40), np.int32)
    rng = np.random.default_rng(11)
    for k, (r, c) in enumerate(rng.integers(0, 40, (30, 2)), start=1):
        labels[r, c] = k
    for outer in (12.0, 30.5):  # the separable transform, and OpenCV's precise one
        _, rr, cc, owner = nearest_label_band(labels, 0.0, outer)
        er, ec, _ = _brute_force_band(labels, 0.0, outer)
        assert np.array_equal(rr, er) and np.array_equal(cc, ec)
        lr, lc = np.nonzero(labels)  # raster order
        for r, c, o in zip(rr, cc, owner, strict=True):
            d2 = (lr - r) ** 2 + (lc - c) ** 2
            assert o == labels[lr[np.argmin(d2)], lc[np.argmin(d2)]]


def test_nearest_label_band_without_labels_or_background():
    for labels in (np.zeros((10, 12), np.int32), np.ones((10, 12), np.int32)):
        _, rr, cc, owner = nearest_label_band(labels, 0.0, 3.0)
        assert len(rr) == len(cc) == len(owner) == 0


def test_distance_to_background_far_from_background_falls_back_exactly():
    # squared distances beyond 2**20 (here up to ~2.4e6) leave OpenCV's float32 path
    mask = np.ones((1100, 1100), bool)
    mask[0, 0] = False
    assert np.array_equal(distance_to_background(mask), ndi.distance_transform_edt(mask).astype(np.float32))


@pytest.mark.parametrize("seed", range(4))
def test_nearest_label_band_of_wanted_labels_is_their_part_of_the_band(seed, monkeypatch):
    # a few wanted labels among many: exactly the wanted owners' share of the whole band, ties
    # included, and the owners looked for at a part of the band only (what makes it cheaper)
    import marrowseg.analyzers.distance as dist

    rng = np.random.default_rng(100 + seed)
    labels = np.zeros((160, 170), np.int32)
    centres = rng.integers(0, (160, 170), (90, 2))
    for k, (r, c) in enumerate(centres, start=1):
        rad = int(rng.integers(1, 4))
        labels[max(r - rad, 0) : r + rad + 1, max(c - rad, 0) : c + rad + 1] = k
    present = np.unique(labels[labels > 0])
    wanted = rng.choice(present, 4, replace=False)
    looked = []
    owners = dist._owners
    monkeypatch.setattr(dist, "_owners", lambda lab, rr, *a: (looked.append(len(rr)), owners(lab, rr, *a))[1])
    _, rr, cc, owner = nearest_label_band(labels, 0.5, 6.2, wanted=wanted)
    er, ec, nearest = _brute_force_band(labels, 0.5, 6.2)
    lookup = {p: s for p, s in zip(zip(er.tolist(), ec.tolist(), strict=True), nearest, strict=True)}
    assert all(int(o) in lookup[p] for p, o in zip(zip(rr.tolist(), cc.tolist(), strict=True), owner, strict=True))
    assert np.all(np.diff(rr * labels.shape[1] + cc) > 0)  # raster order
    _, fr, fc, fo = nearest_label_band(labels, 0.5, 6.2)
    share = np.isin(fo, wanted)
    assert np.array_equal(rr, fr[share]) and np.array_equal(cc, fc[share]) and np.array_equal(owner, fo[share])
    assert len(rr) <= looked[0] < len(fr) / 4  # candidates: the wanted share and its ties, not the band


def test_nearest_label_band_of_wanted_labels_with_the_precise_transform(monkeypatch):
    # radii past the separable transform's reach: the same share of the band
    import marrowseg.analyzers.distance as dist

    rng = np.random.default_rng(5)
    labels = ndi.label(ndi.gaussian_filter(rng.random((150, 160)), 2.0) > 0.58)[0].astype(np.int32)
    wanted = rng.choice(np.unique(labels[labels > 0]), 3, replace=False)
    fast = nearest_label_band(labels, 1.0, 7.0, wanted=wanted)
    monkeypatch.setattr(dist, "_SEPARABLE_MAX_PX", -1)
    slow = nearest_label_band(labels, 1.0, 7.0, wanted=wanted)
    _, fr, fc, fo = nearest_label_band(labels, 1.0, 7.0)
    share = np.isin(fo, wanted)
    assert share.any() and not share.all()
    for a, b, c in zip(fast[1:], slow[1:], (fr[share], fc[share], fo[share]), strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_nearest_label_band_of_many_wanted_labels_is_the_whole_tile_band():
    rng = np.random.default_rng(7)
    labels = ndi.label(ndi.gaussian_filter(rng.random((80, 90)), 1.2) > 0.6)[0].astype(np.int32)
    everyone = np.unique(labels[labels > 0])
    full = nearest_label_band(labels, 0.0, 4.0)
    some = nearest_label_band(labels, 0.0, 4.0, wanted=everyone)
    for a, b in zip(full[1:], some[1:], strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize(("inner", "outer"), [(0.0, 6.0), (1.0, 3.0), (0.0, 6.5), (2.5, 12.0), (0.0, 1.0)])
def test_separable_band_equals_the_precise_transform_band(monkeypatch, inner, outer):
    """The band-limited separable transform gives the band, distances and owners of OpenCV's precise one."""
    from marrowseg.analyzers import distance as dist_mod

    rng = np.random.default_rng(11)
    labels = ndi.label(ndi.gaussian_filter(rng.random((150, 170)), 2.0) > 0.56)[0].astype(np.int32)
    labels[0, :5] = labels.max() + 1  # a label on the image edge
    fast = nearest_label_band(labels, inner, outer)
    d2 = dist_mod._squared_distance_within(labels == 0, int(outer))
    exact = np.rint(ndi.distance_transform_edt(labels == 0) ** 2)
    reach = int(outer)
    sure = exact < (reach + 1) ** 2
    assert np.array_equal(d2[sure], exact[sure]) and (d2[~sure] >= (reach + 1) ** 2).all()
    monkeypatch.setattr(dist_mod, "_SEPARABLE_MAX_PX", -1)
    slow = nearest_label_band(labels, inner, outer)
    for a, b in zip(fast, slow, strict=True):
        assert np.array_equal(a, b)
    assert len(fast[1]) > 100


@pytest.mark.parametrize("seed", range(12))
def test_nearest_feature_in_windows_equals_the_whole_image_feature_transform(seed):
    """Windows around the query pixels name the very feature SciPy's whole-image transform names, ties included."""
    from marrowseg.analyzers.distance import nearest_feature

    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(40, 200, 2))
    if seed % 2:  # sparse single pixels: many equidistant features
        features = rng.random((h, w)) < rng.uniform(0.002, 0.05)
    else:
        features = ndi.gaussian_filter(rng.random((h, w)), 2.0) > rng.uniform(0.5, 0.6)
    features[0, 0] = True
    query = (rng.random((h, w)) < 0.02) & ~features
    d, (ir, ic) = ndi.distance_transform_edt(~features, return_indices=True)
    qr, qc = np.nonzero(query)
    dist, fr, fc = nearest_feature(features, query, margin=int(rng.integers(1, 6)))
    assert np.array_equal(dist, d[qr, qc])
    assert np.array_equal(fr, ir[qr, qc]) and np.array_equal(fc, ic[qr, qc])
    # with a reach, pixels farther than it may be left unnamed; the rest are exact
    dist, fr, fc = nearest_feature(features, query, reach=3.0, margin=1)
    near = d[qr, qc] <= 3.0
    assert np.array_equal(dist[near], d[qr, qc][near])
    assert np.array_equal(fr[near], ir[qr, qc][near]) and np.array_equal(fc[near], ic[qr, qc][near])
    assert np.all((dist[~near] > 3.0) & ((fr[~near] == -1) | (fr[~near] == ir[qr, qc][~near])))


@pytest.mark.parametrize("reach", [0, 1, 3, 7, 12, 30])
def test_distance_to_background_within_a_reach_is_exact_below_it(reach):
    # depth tests need the distance only up to a radius: exact there, reach + 1 beyond
    rng = np.random.default_rng(reach)
    smooth = ndi.gaussian_filter(rng.random((160, 170)), 6.0)
    mask = smooth > np.quantile(smooth, 0.3)
    mask[40:120, 40:120] = True  # depths up to 40, past the separable transform's reach at 30
    full = distance_to_background(mask)
    near = distance_to_background(mask, reach=reach)
    below = full < reach + 1
    assert (~below).any() and below.any()
    assert np.array_equal(near[below], full[below])
    assert np.all(near[~below] == np.float32(reach + 1))
    assert near.dtype == np.float32
    whole = np.ones((5, 6), bool)  # no background: SciPy's convention, capped as well
    assert np.array_equal(distance_to_background(whole, reach=2), np.minimum(distance_to_background(whole), 3))
