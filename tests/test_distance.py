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


def test_nearest_label_band_repairs_chamfer_owners(monkeypatch):
    # scattered single-pixel labels: OpenCV's 5x5 chamfer metric names a farther label for a
    # few pixels (3 here), which the exact repair must re-assign
    import marrowseg.analyzers.distance as dist

    repaired = []
    fix = dist._fix_nearest
    monkeypatch.setattr(dist, "_fix_nearest", lambda labels, rr, *a: (repaired.append(len(rr)), fix(labels, rr, *a)))
    labels = np.zeros((40, 40), np.int32)
    rng = np.random.default_rng(11)
    for k, (r, c) in enumerate(rng.integers(0, 40, (30, 2)), start=1):
        labels[r, c] = k
    _, rr, cc, owner = nearest_label_band(labels, 0.0, 12.0)
    er, ec, nearest = _brute_force_band(labels, 0.0, 12.0)
    assert repaired and repaired[0] > 0
    assert np.array_equal(rr, er) and np.array_equal(cc, ec)
    assert all(int(o) in s for o, s in zip(owner, nearest, strict=True))


def test_nearest_label_band_without_labels_or_background():
    for labels in (np.zeros((10, 12), np.int32), np.ones((10, 12), np.int32)):
        _, rr, cc, owner = nearest_label_band(labels, 0.0, 3.0)
        assert len(rr) == len(cc) == len(owner) == 0


def test_distance_to_background_far_from_background_falls_back_exactly():
    # squared distances beyond 2**20 (here up to ~2.4e6) leave OpenCV's float32 path
    mask = np.ones((1100, 1100), bool)
    mask[0, 0] = False
    assert np.array_equal(distance_to_background(mask), ndi.distance_transform_edt(mask).astype(np.float32))
