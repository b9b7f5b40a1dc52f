"""Nuclear detection and classes on drawn haematoxylin images of known truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from marrowseg.analyzers import nuclei as nuc
from marrowseg.analyzers.nuclei import table as ntable
from marrowseg.config import load_config


@pytest.fixture(scope="module")
def cfg():
    return load_config("he").he


def _disks(mpp: float, diameter_um: float, od: float, centres_um, size_um: float = 120.0) -> np.ndarray:
    """Haematoxylin OD image with flat disks of ``diameter_um`` at ``centres_um`` (row, col µm)."""
    n = int(round(size_um / mpp))
    rr, cc = np.mgrid[0:n, 0:n]
    img = np.zeros((n, n), np.float32)
    for r_um, c_um in centres_um:
        r, c = r_um / mpp - 0.5, c_um / mpp - 0.5
        img[(rr - r) ** 2 + (cc - c) ** 2 <= (diameter_um / 2 / mpp) ** 2] = od
    return img


_CENTRES_UM = [(20.0, 20.0), (20.0, 60.0), (60.0, 35.0), (90.0, 90.0), (95.0, 25.0)]


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_detect_nuclei_counts_and_sizes_drawn_disks_at_two_mpp(cfg, mpp):
    """Disks 7 µm across give one nucleus each, area within 15 % of 38.5 µm², centre within 1 µm."""
    img = _disks(mpp, 7.0, 0.8, _CENTRES_UM)
    labels, table = nuc.detect_nuclei(img, mpp, cfg.nuclei)
    assert len(table["row"]) == len(_CENTRES_UM)
    np.testing.assert_allclose(table["area_um2"], np.pi * 3.5**2, rtol=0.15)
    got_um = np.column_stack([table["row"], table["col"]]) * mpp + 0.5 * mpp
    for r, c in _CENTRES_UM:
        assert np.min(np.hypot(got_um[:, 0] - r, got_um[:, 1] - c)) < 1.0
    assert labels.dtype == np.int32 and labels.max() == table["label"].max()


def test_detect_nuclei_returns_empty_table_for_blank_tile(cfg):
    """A blank image gives zero rows and every column."""
    labels, table = nuc.detect_nuclei(np.zeros((64, 80), np.float32), 0.5, cfg.nuclei)
    assert set(table) == set(nuc.NUCLEUS_COLUMNS)
    assert all(len(v) == 0 for v in table.values())
    assert labels.shape == (64, 80) and not labels.any()
    assert len(nuc.classify_nuclei(table, cfg.classes)) == 0


def test_detect_nuclei_rejects_wrong_shape(cfg):
    """A colour image is refused with its shape in the message."""
    with pytest.raises(ValueError, match=r"\(4, 4, 3\)"):
        nuc.detect_nuclei(np.zeros((4, 4, 3), np.float32), 0.5, cfg.nuclei)


def test_detect_nuclei_splits_touching_disks(cfg):
    """Two touching 6 µm disks are two nuclei, not one."""
    img = _disks(0.5, 6.0, 0.9, [(30.0, 30.0), (30.0, 36.0)], size_um=60.0)
    _, table = nuc.detect_nuclei(img, 0.5, cfg.nuclei)
    assert len(table["row"]) == 2


def test_allowed_mask_limits_centres(cfg):
    """Centres outside ``allowed`` are not reported."""
    img = _disks(0.5, 7.0, 0.8, _CENTRES_UM)
    allowed = np.zeros(img.shape, bool)
    allowed[: img.shape[0] // 2] = True
    _, table = nuc.detect_nuclei(img, 0.5, cfg.nuclei, allowed=allowed)
    assert len(table["row"]) == 3


def test_classify_nuclei_by_size_density_and_shape(cfg):
    """Small dense round -> late_erythroid; very large -> megakaryocyte; pale medium -> other."""
    table = {
        "area_um2": np.array([18.0, 400.0, 45.0, 18.0]),
        "eccentricity": np.array([0.3, 0.6, 0.4, 0.95]),
        "h_od_mean": np.array([0.9, 0.7, 0.45, 0.9]),
        "h_od_cv": np.array([0.1, 0.15, 0.2, 0.1]),  # the megakaryocyte is one even nucleus
    }
    assert list(nuc.classify_nuclei(table, cfg.classes)) == ["late_erythroid", "megakaryocyte", "other", "other"]


def test_torch_maps_match_scipy_smoothing(cfg):
    """The dense torch maps equal the scipy path that detect_nuclei uses without them."""
    rng = np.random.default_rng(0)
    img = ndi.gaussian_filter(rng.random((96, 96)).astype(np.float32), 2)
    out = nuc.NucleusMaps(0.5, cfg.nuclei)(torch.from_numpy(img)[None, None])
    ref = ndi.gaussian_filter(img, cfg.nuclei.peak_sigma_um / 0.5, mode="reflect", truncate=3.0)
    # interior only: scipy 'reflect' is half-sample symmetric, torch 'reflect' whole-sample
    np.testing.assert_allclose(out["peak"][0, 0].numpy()[8:-8, 8:-8], ref[8:-8, 8:-8], atol=1e-4)
    assert out["peak"].dtype == torch.float32


def test_torch_background_map_matches_scipy_reference(cfg):
    """With mask_contrast_od set, the dense module also gives the 8 µm background map, equal to
    reference_maps' SciPy twin; ecad.yaml (contrast off) gets no such map."""
    rng = np.random.default_rng(1)
    img = ndi.gaussian_filter(rng.random((128, 128)).astype(np.float32), 2)
    assert cfg.nuclei.mask_contrast_od is not None
    out = nuc.NucleusMaps(0.5, cfg.nuclei)(torch.from_numpy(img)[None, None])
    ref = nuc.reference_maps(img, 0.5, cfg.nuclei)
    assert set(out) == set(ref) == {"peak", "mask", "background"}
    np.testing.assert_allclose(out["background"][0, 0].numpy(), ref["background"], atol=1e-5)
    # the coarse map (4 x 4 block means, blurred) brought back to the full grid is the full-
    # resolution 8 µm blur to within a tenth of the contrast it is compared with (0.05 OD)
    sigma_px = cfg.nuclei.mask_background_sigma_um / 0.5
    assert ref["background"].shape == (128 // nuc.background_factor(sigma_px),) * 2
    up = nuc.upsample_background(ref["background"], img.shape, sigma_px)
    exact = nuc.gaussian_reference(img, sigma_px)
    np.testing.assert_allclose(up, exact, atol=0.1 * cfg.nuclei.mask_contrast_od)
    ecad = load_config("ecad").ecad.nuclei
    assert ecad.mask_contrast_od is None
    assert set(nuc.NucleusMaps(0.25, ecad)(torch.from_numpy(img)[None, None])) == {"peak", "mask"}


def _nuclei_on_dark_stroma(mpp: float = 0.5) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Five 7 µm nuclei (0.8 OD) in haematoxylin-stained stroma (0.42 OD, mottled by 0.015 OD
    on a 2 µm scale, under a third of the contrast) that fills the image: a heavily stained
    section, every pixel above mask_od 0.3."""
    rng = np.random.default_rng(3)
    img = _disks(mpp, 7.0, 0.8, _CENTRES_UM)
    mottle = ndi.gaussian_filter(rng.normal(size=img.shape).astype(np.float32), 2.0 / mpp)
    stroma = (0.42 + 0.015 * mottle / mottle.std()).astype(np.float32)
    return np.maximum(img, stroma), _CENTRES_UM


def test_contrast_mask_keeps_nuclei_and_drops_dark_stroma(cfg):
    """he.yaml (mask_contrast_od 0.05): in stroma darker than mask_od the detector still finds the
    five nuclei, each about its drawn size, and nothing in the stroma; with the absolute
    threshold alone the stroma is taken for nuclei (extra cells or nuclei grown into it).
    (The edge of such a sheet against pale tissue does pass the contrast test: not tested.)"""
    img, centres = _nuclei_on_dark_stroma()
    _, table = nuc.detect_nuclei(img, 0.5, cfg.nuclei)
    assert len(table["row"]) == len(centres)
    # the blurred edge (0.8 -> 0.42 OD) crosses background + 0.05 ~0.4 µm outside the drawn one
    np.testing.assert_allclose(table["area_um2"], np.pi * 3.5**2, rtol=0.3)
    got_um = np.column_stack([table["row"], table["col"]]) * 0.5 + 0.25
    for r, c in centres:
        assert np.min(np.hypot(got_um[:, 0] - r, got_um[:, 1] - c)) < 1.0
    _, absolute = nuc.detect_nuclei(img, 0.5, cfg.nuclei.model_copy(update={"mask_contrast_od": None}))
    assert len(absolute["row"]) > len(centres) or absolute["area_um2"].max() > 2 * np.pi * 3.5**2


def test_contrast_off_is_the_absolute_threshold(cfg):
    """mask_contrast_od and mask_fill_holes_um2 null (as ecad.yaml) give the plain
    mask_map > mask_od, twice; with the contrast test the mask is a subset of it and its filled
    version has no holes."""
    rng = np.random.default_rng(2)
    m = rng.random((40, 40)).astype(np.float32)
    ecad = load_config("ecad").ecad.nuclei
    assert ecad.mask_contrast_od is None and ecad.mask_fill_holes_um2 is None
    off = cfg.nuclei.model_copy(update={"mask_contrast_od": None, "mask_fill_holes_um2": None})
    mask, filled = nuc.nuclear_mask(m, 0.5, off, m)
    np.testing.assert_array_equal(mask, m > off.mask_od)
    np.testing.assert_array_equal(filled, mask)
    on, on_filled = nuc.nuclear_mask(m, 0.5, cfg.nuclei.model_copy(update={"mask_fill_holes_um2": None}), m)
    assert not (on & ~mask).any() and on.sum() < mask.sum()
    assert not (on & ~on_filled).any()
    np.testing.assert_array_equal(on_filled, ndi.binary_fill_holes(on_filled))


@pytest.mark.parametrize(("diameter_um", "hole_um"), [(9.0, 4.0), (10.0, 5.0)])
def test_nucleus_with_a_pale_centre_is_one_whole_nucleus(cfg, diameter_um, hole_um):
    """he.yaml (mask_fill_holes_um2 50): an open-chromatin nucleus whose pale centre (0.1 OD) is
    below mask_od is one nucleus with the area of the whole disk; with the hole left open the
    shape split cuts the ring into pieces at "waists" that are only the hole."""
    img = _disks(0.5, diameter_um, 0.7, [(30.0, 30.0)], size_um=60.0)
    img[_disks(0.5, hole_um, 1.0, [(30.0, 30.5)], size_um=60.0) > 0] = 0.1
    _, table = nuc.detect_nuclei(img, 0.5, cfg.nuclei)
    assert len(table["row"]) == 1
    assert table["area_um2"][0] == pytest.approx(np.pi * (diameter_um / 2) ** 2, rel=0.1)
    _, ring = nuc.detect_nuclei(img, 0.5, cfg.nuclei.model_copy(update={"mask_fill_holes_um2": None}))
    assert len(ring["row"]) >= 2


def test_holes_wider_than_the_fill_limit_stay_open(cfg):
    """A ring of eight 6 µm nuclei round a 16 µm gap (an erythroblastic island's macrophage) keeps
    its gap: eight nuclei, each about its own size."""
    ang = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    centres = [(40 + 10 * np.sin(a), 40 + 10 * np.cos(a)) for a in ang]
    img = _disks(0.5, 7.0, 0.8, centres, size_um=80.0)
    _, table = nuc.detect_nuclei(img, 0.5, cfg.nuclei)
    assert len(table["row"]) == 8
    np.testing.assert_allclose(table["area_um2"], np.pi * 3.5**2, rtol=0.2)


def test_centre_is_the_dense_core_not_a_pale_tail(cfg):
    """he.yaml (centre_core_fraction 0.5): a 7 µm nucleus (0.9 OD) whose region runs into a pale
    attached tongue (0.4 OD, 4 µm wide, 8 µm long) is reported at the nucleus's centre (< 0.5 µm);
    the whole region's centroid is pulled > 1 µm towards the tongue. Areas are the same."""
    img = _disks(0.5, 7.0, 0.9, [(30.0, 30.0)], size_um=60.0)
    rr, cc = np.mgrid[0:120, 0:120] * 0.5 + 0.25
    img[(np.abs(rr - 30.0) <= 2.0) & (cc > 30.0) & (cc <= 41.5) & (img == 0)] = 0.4
    _, core = nuc.detect_nuclei(img, 0.5, cfg.nuclei)
    _, whole = nuc.detect_nuclei(img, 0.5, cfg.nuclei.model_copy(update={"centre_core_fraction": None}))
    assert len(core["row"]) == len(whole["row"]) == 1
    np.testing.assert_array_equal(core["area_um2"], whole["area_um2"])
    core_um = np.array([core["row"][0], core["col"][0]]) * 0.5 + 0.25
    whole_um = np.array([whole["row"][0], whole["col"][0]]) * 0.5 + 0.25
    assert np.hypot(*(core_um - 30.0)) < 0.5
    assert whole_um[1] - 30.0 > 1.0


def test_weighted_core_centre_gives_a_faint_shoulder_little_weight(cfg):
    """he.yaml (weighted core at 0.4): a 7 µm nucleus (0.9 OD) with an attached 3 µm-wide shoulder of
    0.45 OD (just above 0.4 x 0.9) is reported within 0.5 µm of its centre; the plain core, which
    counts every shoulder pixel once, is pulled > 0.8 µm towards the shoulder."""
    assert cfg.nuclei.centre_core_fraction == 0.4
    img = _disks(0.5, 7.0, 0.9, [(30.0, 30.0)], size_um=60.0)
    rr, cc = np.mgrid[0:120, 0:120] * 0.5 + 0.25
    img[(np.abs(rr - 30.0) <= 1.5) & (cc > 30.0) & (cc <= 40.0) & (img == 0)] = 0.45
    labels = (img > 0).astype(np.int32)
    table = {c: np.zeros(1) for c in nuc.NUCLEUS_COLUMNS}
    table["label"] = np.array([1], np.int32)
    density = nuc.gaussian_reference(img, cfg.nuclei.mask_sigma_um / 0.5)
    plain = nuc.core_centroids(labels, table, density, 0.4)
    weighted = nuc.core_centroids(labels, table, density, 0.4, weighted=True)
    assert plain["col"][0] * 0.5 + 0.25 - 30.0 > 0.8
    assert np.hypot(weighted["row"][0] * 0.5 + 0.25 - 30.0, weighted["col"][0] * 0.5 + 0.25 - 30.0) < 0.5
    # the detector (he.yaml) reports the weighted centre
    _, det = nuc.detect_nuclei(img, 0.5, cfg.nuclei)
    assert len(det["row"]) == 1
    assert np.hypot(det["row"][0] * 0.5 + 0.25 - 30.0, det["col"][0] * 0.5 + 0.25 - 30.0) < 0.5


def test_weighted_core_of_a_flat_nucleus_is_its_centroid():
    """On a flat region every pixel has the same excess: weighted and plain centres are the same."""
    img = _disks(0.5, 6.0, 0.8, [(20.0, 24.0)], size_um=50.0)
    labels = (img > 0).astype(np.int32)
    table = {c: np.zeros(1) for c in nuc.NUCLEUS_COLUMNS}
    table["label"] = np.array([1], np.int32)
    plain = nuc.core_centroids(labels, table, img, 0.5)
    weighted = nuc.core_centroids(labels, table, img, 0.5, weighted=True)
    np.testing.assert_allclose([weighted["row"][0], weighted["col"][0]], [plain["row"][0], plain["col"][0]])


def test_label_measurements_match_regionprops():
    """Centroid, area, eccentricity and intensity mean/std equal scikit-image's regionprops."""
    from skimage.measure import regionprops_table

    rng = np.random.default_rng(1)
    img = _disks(0.5, 7.0, 0.8, _CENTRES_UM) + _disks(0.5, 5.0, 0.5, [(40.0, 90.0), (42.0, 94.0)])
    labels = ndi.label(img > 0)[0]
    labels[labels == 2] = 0  # a missing id
    inten = rng.random(img.shape).astype(np.float32)
    m = nuc.label_measurements(labels, inten)
    p = regionprops_table(labels, intensity_image=inten,
                          properties=("label", "centroid", "area", "eccentricity", "intensity_mean", "intensity_std"))
    sel = p["label"] - 1
    np.testing.assert_allclose(m["row"][sel], p["centroid-0"])
    np.testing.assert_allclose(m["col"][sel], p["centroid-1"])
    np.testing.assert_allclose(m["area_px"][sel], p["area"])
    np.testing.assert_allclose(m["eccentricity"][sel], p["eccentricity"], atol=1e-9)
    np.testing.assert_allclose(m["mean"][sel], p["intensity_mean"], rtol=1e-5)
    np.testing.assert_allclose(m["std"][sel], p["intensity_std"], rtol=1e-4)
    assert m["area_px"][1] == 0


def test_solidity_is_one_for_a_disk_and_low_for_a_ring():
    """Solidity counts pixel centres in the convex hull (Pick): a digital disk is 1, a C shape well below."""
    rr, cc = np.mgrid[0:100, 0:100]
    disk = (rr - 15) ** 2 + (cc - 15) ** 2 <= 81
    d2 = (rr - 60) ** 2 + (cc - 60) ** 2
    ring = (d2 <= 400) & (d2 > 144) & (cc < 70)
    labels = disk.astype(np.int32) + 2 * ring.astype(np.int32)
    m = nuc.label_measurements(labels, np.ones(labels.shape, np.float32))
    assert m["solidity"][0] == pytest.approx(1.0)
    assert m["solidity"][1] < 0.7


def test_distance_seeds_split_overlapping_disks(cfg):
    """Two 8 µm disks overlapping by 2 µm (one haematoxylin peak between them) are two nuclei."""
    # Beer-Lambert: the overlap is twice as dark, and the smoothed map peaks there only once
    img = _disks(0.5, 8.0, 0.7, [(30.0, 30.0)], size_um=60.0) + _disks(0.5, 8.0, 0.7, [(30.0, 36.0)], size_um=60.0)
    _, peaks = nuc.detect_nuclei(img, 0.5, cfg.nuclei.model_copy(update={"seeds": "peaks", "split_max_solidity": None}))
    assert len(peaks["row"]) == 1
    dist_cfg = cfg.nuclei.model_copy(update={"seeds": "distance", "centre_core_fraction": None})
    _, table = nuc.detect_nuclei(img, 0.5, dist_cfg)
    assert len(table["row"]) == 2
    assert sorted((table["col"] * 0.5 + 0.25).tolist()) == pytest.approx([29.75, 36.25], abs=1.0)
    # he.yaml's weighted core centre leans towards the twice-dark overlap (a known cost of
    # weighting by density), but stays within 1.5 µm
    _, weighted = nuc.detect_nuclei(img, 0.5, dist_cfg.model_copy(update={"centre_core_fraction": 0.4}))
    got = sorted((weighted["col"] * 0.5 + 0.25).tolist())
    assert got == pytest.approx([29.75, 36.25], abs=1.5)
    assert got[0] > sorted((table["col"] * 0.5 + 0.25).tolist())[0]


def test_shape_split_cuts_overlapping_disks_at_the_waist(cfg):
    """Peak seeds + split_by_shape: two 8 µm disks overlapping by 1 µm (one haematoxylin peak) become two."""
    img = _disks(0.5, 8.0, 0.7, [(30.0, 30.0)], size_um=60.0) + _disks(0.5, 8.0, 0.7, [(30.0, 37.0)], size_um=60.0)
    whole = cfg.nuclei.model_copy(update={"seeds": "peaks", "split_max_solidity": None})
    _, one = nuc.detect_nuclei(img, 0.5, whole)
    assert len(one["row"]) == 1 and one["solidity"][0] < 0.95
    split = whole.model_copy(update={"split_max_solidity": 0.95, "split_min_area_um2": 40.0, "split_h_um": 0.25})
    labels, two = nuc.detect_nuclei(img, 0.5, split)
    assert len(two["row"]) == 2
    assert sorted((two["col"] * 0.5 + 0.25).tolist()) == pytest.approx([29.75, 37.25], abs=1.0)
    # the parts share the pixels of the merged region, each about half of it
    assert two["area_um2"].sum() == pytest.approx(one["area_um2"][0], rel=1e-6)
    np.testing.assert_allclose(two["area_um2"], one["area_um2"][0] / 2, rtol=0.1)
    assert sorted(np.unique(labels[labels > 0]).tolist()) == sorted(two["label"].tolist())


def test_shape_split_keeps_convex_nuclei_whole(cfg):
    """A large round nucleus and an oval one are solid: the split leaves them (and the table) alone."""
    oval = np.zeros((120, 120), np.float32)
    rr, cc = np.mgrid[0:120, 0:120]
    oval[((rr - 60) / 9.0) ** 2 + ((cc - 60) / 20.0) ** 2 <= 1.0] = 0.7  # semi-axes 4.5 x 10 µm at 0.5 µm/px
    big = _disks(0.5, 12.0, 0.7, [(30.0, 30.0)], size_um=60.0)
    split = cfg.nuclei.model_copy(update={"split_max_solidity": 0.95, "split_min_area_um2": 40.0, "split_h_um": 0.25})
    whole = split.model_copy(update={"split_max_solidity": None})
    for img in (oval, big):
        _, a = nuc.detect_nuclei(img, 0.5, whole)
        _, b = nuc.detect_nuclei(img, 0.5, split)
        assert len(a["row"]) == len(b["row"]) == 1
        np.testing.assert_array_equal(a["area_um2"], b["area_um2"])


def test_shape_split_leaves_regions_above_max_area_whole(cfg):
    """Two overlapping 14 µm disks (~280 µm² together) are cut without a limit, kept whole above it."""
    img = _disks(0.5, 14.0, 0.7, [(30.0, 25.0)], size_um=60.0) + _disks(0.5, 14.0, 0.7, [(30.0, 37.0)], size_um=60.0)
    # peak seeds give the pair one seed, so the split alone decides (distance seeds cut it anyway)
    split = cfg.nuclei.model_copy(update={"split_max_solidity": 0.95, "split_min_area_um2": 40.0, "split_h_um": 0.25,
                                          "split_max_area_um2": None, "min_distance_um": 8.0, "seeds": "peaks"})
    _, cut = nuc.detect_nuclei(img, 0.5, split)
    assert len(cut["row"]) == 2
    _, whole = nuc.detect_nuclei(img, 0.5, split.model_copy(update={"split_max_area_um2": 250.0}))
    assert len(whole["row"]) == 1 and whole["area_um2"][0] > 250.0


def test_touching_nuclei_get_one_distance_seed_each_and_single_nuclei_one(cfg):
    """he.yaml's distance seeds: two 6 µm nuclei 3.5 µm apart (one haematoxylin maximum between
    them, no waist deep enough for the shape split) are two cells, where peak seeds find one;
    a round or elongated single nucleus (up to 20 µm long) is still one."""
    assert cfg.nuclei.seeds == "distance"
    pair = np.maximum(_disks(0.25, 6.0, 0.6, [(30.0, 28.25)], size_um=60.0),
                      _disks(0.25, 6.0, 0.6, [(30.0, 31.75)], size_um=60.0))
    _, table = nuc.detect_nuclei(pair, 0.25, cfg.nuclei)
    assert len(table["row"]) == 2
    assert np.sort(table["col"] * 0.25 + 0.125) == pytest.approx([28.25, 31.75], abs=1.0)  # one in each nucleus
    _, peaks = nuc.detect_nuclei(pair, 0.25, cfg.nuclei.model_copy(update={"seeds": "peaks", "min_distance_um": 1.5}))
    assert len(peaks["row"]) == 1
    rr, cc = np.mgrid[0:240, 0:240] * 0.25 + 0.125
    for a_um, b_um in [(5.0, 5.0), (7.0, 3.5), (10.0, 4.0), (10.0, 10.0)]:  # semi-axes
        img = np.where(((rr - 30.0) / b_um) ** 2 + ((cc - 30.0) / a_um) ** 2 <= 1.0, 0.6, 0.0).astype(np.float32)
        assert len(nuc.detect_nuclei(img, 0.25, cfg.nuclei)[1]["row"]) == 1, (a_um, b_um)


def test_a_pale_thin_nucleus_the_seeds_miss_still_gets_one(cfg):
    """he.yaml's seed_unseeded: a 5.6 x 2.8 µm nucleus at 0.45 OD (a neutrophil lobe's size) is in
    the nuclear mask, but smoothed over 1.5 µm it stays under min_peak_od, so no seed rule
    finds it; it is one cell at its centre, and lost without the rule."""
    assert cfg.nuclei.seed_unseeded
    rr, cc = np.mgrid[0:120, 0:120] * 0.5 + 0.25
    img = np.where(((rr - 30.0) / 1.4) ** 2 + ((cc - 30.0) / 2.8) ** 2 <= 1.0, 0.45, 0.0).astype(np.float32)
    _, table = nuc.detect_nuclei(img, 0.5, cfg.nuclei)
    assert len(table["row"]) == 1
    assert np.array([table["row"][0], table["col"][0]]) * 0.5 + 0.25 == pytest.approx([30.0, 30.0], abs=0.5)
    assert table["area_um2"][0] == pytest.approx(np.pi * 2.8 * 1.4, rel=0.2)
    _, off = nuc.detect_nuclei(img, 0.5, cfg.nuclei.model_copy(update={"seed_unseeded": False}))
    assert len(off["row"]) == 0


def test_unseeded_components_seed_only_large_seedless_components_at_their_highest_relief():
    mask = np.zeros((20, 40), bool)
    mask[2:8, 2:8] = True      # 36 px, seeded below
    mask[2:8, 12:18] = True    # 36 px, no seed
    mask[12:14, 2:4] = True    # 4 px, too small
    mask[12:18, 22:30] = True  # 48 px, no seed, its right half outside the search region
    search = mask.copy()
    search[:, 26:] = False
    relief = np.zeros(mask.shape, np.float32)
    relief[5, 14] = 2.0
    relief[13, 28] = 9.0  # highest of its component, but not searchable
    relief[15, 24] = 3.0
    got = nuc.unseeded_components(mask, search, relief, np.array([[4, 4]]), min_area_px=10)
    assert sorted(map(tuple, got.tolist())) == [(5, 14), (15, 24)]
    assert len(nuc.unseeded_components(mask, search, relief, np.array([[4, 4], [3, 13], [16, 23]]), 10)) == 0


def test_regions_below_min_area_are_dropped(cfg):
    """A 3 µm blob (7 µm²) is debris under he.yaml's min_area_um2 of 8 µm²; a 4 µm nucleus is kept."""
    assert cfg.nuclei.min_area_um2 == 8
    img = _disks(0.25, 3.0, 0.6, [(15.0, 15.0)], size_um=60.0) + _disks(0.25, 4.0, 0.6, [(40.0, 40.0)], size_um=60.0)
    _, table = nuc.detect_nuclei(img, 0.25, cfg.nuclei)
    assert len(table["row"]) == 1
    assert table["area_um2"][0] == pytest.approx(np.pi * 2.0**2, rel=0.15)


def _lobes(centre_um: tuple[float, float], ring_um: float, n: int = 3, diameter_um: float = 3.0) -> np.ndarray:
    """``n`` small lobes (0.7 OD disks) evenly round ``centre_um`` at ``ring_um`` from it, 60 µm image at 0.5 µm/px."""
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False) + 0.3
    centres = [(centre_um[0] + ring_um * np.sin(a), centre_um[1] + ring_um * np.cos(a)) for a in ang]
    return _disks(0.5, diameter_um, 0.7, centres, size_um=60.0)


def test_lobes_of_a_segmented_nucleus_are_one_cell_at_its_centre(cfg):
    """he.yaml (lobe_max_gap_um 1): three 3 µm lobes (7 µm² each, below min_area_um2) 1 µm
    apart round a pale centre are one cell, reported within 0.5 µm of the centre; without the
    grouping each lobe is debris and the cell is lost."""
    assert cfg.nuclei.lobe_max_gap_um == 1.0 and cfg.nuclei.min_area_um2 == 8
    img = _lobes((30.0, 30.0), 2.3)
    _, table = nuc.detect_nuclei(img, 0.5, cfg.nuclei)
    assert len(table["row"]) == 1
    got_um = np.array([table["row"][0], table["col"][0]]) * 0.5 + 0.25
    assert np.hypot(*(got_um - 30.0)) < 0.5
    assert table["area_um2"][0] == pytest.approx(3 * np.pi * 1.5**2, rel=0.25)
    _, off = nuc.detect_nuclei(img, 0.5, cfg.nuclei.model_copy(update={"lobe_max_gap_um": None}))
    assert len(off["row"]) == 0


def test_small_regions_apart_alone_or_too_wide_are_not_grouped(cfg):
    """Lobes 3 µm apart, a lone 2.8 µm blob, and a row of four 2.8 µm blobs 1.2 µm apart but 15 µm long
    (wider than lobe_max_extent_um, 10 µm: not one nucleus) all stay debris."""
    apart = _lobes((30.0, 30.0), 3.5)
    lone = _disks(0.5, 2.8, 0.7, [(30.0, 30.0)], size_um=60.0)  # 6 µm² (3 µm: 8 µm² in pixels, a nucleus)
    row = _disks(0.5, 2.8, 0.7, [(30.0, 22.5 + 4.0 * k) for k in range(4)], size_um=60.0)
    for img in (apart, lone, row):
        _, table = nuc.detect_nuclei(img, 0.5, cfg.nuclei)
        assert len(table["row"]) == 0
    # the row's blobs are separate in the mask: only the extent keeps them apart
    _, wide = nuc.detect_nuclei(row, 0.5, cfg.nuclei.model_copy(update={"lobe_max_extent_um": 20.0}))
    assert len(wide["row"]) == 1


def test_thin_strip_is_dropped_and_nuclei_are_kept(cfg):
    """he.yaml (min_width_um 2.5): a 2 µm x 14 µm strip of dark stroma is dropped; a 5 µm round
    nucleus and a 3.5 µm x 14 µm spindle-shaped nucleus are kept. Without the test the strip is counted."""
    assert cfg.nuclei.min_width_um == 2.5
    img = _disks(0.5, 5.0, 0.8, [(15.0, 15.0)], size_um=60.0)
    rr, cc = np.mgrid[0:120, 0:120] * 0.5 + 0.25
    img[(np.abs(rr - 40.0) <= 1.0) & (np.abs(cc - 15.0) <= 7.0)] = 0.8
    # spindle: an ellipse of semi-axes 1.75 and 7 µm, densest along its middle (one peak)
    q = ((rr - 15.0) / 1.75) ** 2 + ((cc - 42.0) / 7.0) ** 2
    img[q <= 1.0] = (0.9 - 0.3 * q)[q <= 1.0]
    _, table = nuc.detect_nuclei(img, 0.5, cfg.nuclei)
    got_um = np.column_stack([table["row"], table["col"]]) * 0.5 + 0.25
    assert len(got_um) == 2
    assert np.all(np.abs(got_um[:, 0] - 15.0) < 1.0)
    width = nuc.ellipse_width_um(table)
    assert width.min() > 2.5
    _, all_kept = nuc.detect_nuclei(img, 0.5, cfg.nuclei.model_copy(update={"min_width_um": None}))
    # the flat strip holds a seed at each end: one or two cells
    assert len(all_kept["row"]) >= 3
    assert nuc.ellipse_width_um(all_kept).min() < 2.5


def test_ellipse_width_of_a_disk_is_its_diameter():
    """The minor axis from area and eccentricity: a disk's diameter, an ellipse's minor axis."""
    table = {"area_um2": np.array([np.pi * 2.5**2, np.pi * 4.0 * 1.5]), "eccentricity": np.array([0.0, np.sqrt(1 - (1.5 / 4.0) ** 2)])}
    np.testing.assert_allclose(nuc.ellipse_width_um(table), [5.0, 3.0])


def _clump_cfg(cfg, **update):
    """he.yaml's detector without the shape split, plus ``update`` (clump keys are not in the YAML)."""
    return cfg.nuclei.model_copy(update={"split_max_solidity": None, **update})


def test_area_split_counts_two_heavily_overlapping_nuclei(cfg):
    """Two 7 µm nuclei 2.5 µm apart make one convex region of ~56 µm² (no waist, one peak): one nucleus
    without the area split; with a 35 µm² nucleus it is round(56 / 35) = 2, each centre within 1 µm
    of a true one, the parts sharing the region's pixels."""
    img = _disks(0.5, 7.0, 0.8, [(30.0, 28.75), (30.0, 31.25)], size_um=60.0)
    _, one = nuc.detect_nuclei(img, 0.5, _clump_cfg(cfg))
    assert len(one["row"]) == 1 and 50.0 < one["area_um2"][0] < 62.0
    labels, two = nuc.detect_nuclei(img, 0.5, _clump_cfg(cfg, clump_nucleus_area_um2=35.0))
    assert len(two["row"]) == 2
    assert sorted((two["col"] * 0.5 + 0.25).tolist()) == pytest.approx([28.75, 31.25], abs=1.0)
    np.testing.assert_allclose(two["row"] * 0.5 + 0.25, 30.0, atol=0.5)
    assert two["area_um2"].sum() == pytest.approx(one["area_um2"][0], rel=1e-6)
    assert sorted(np.unique(labels[labels > 0]).tolist()) == sorted(two["label"].tolist())
    # deterministic: the same parts again
    labels2, again = nuc.detect_nuclei(img, 0.5, _clump_cfg(cfg, clump_nucleus_area_um2=35.0))
    np.testing.assert_array_equal(labels, labels2)


def test_area_split_keeps_single_nuclei_solid_clumps_and_large_nuclei_whole(cfg):
    """A 7.5 µm nucleus (~44 µm² < 1.5 x 35) stays one; the convex two-nucleus clump stays one under
    a solidity limit of 0.9 and under an area limit below its area."""
    single = _disks(0.5, 7.5, 0.8, [(30.0, 30.0)], size_um=60.0)
    _, t = nuc.detect_nuclei(single, 0.5, _clump_cfg(cfg, clump_nucleus_area_um2=35.0))
    assert len(t["row"]) == 1 and t["area_um2"][0] < 52.5
    clump = _disks(0.5, 7.0, 0.8, [(30.0, 28.75), (30.0, 31.25)], size_um=60.0)
    _, solid = nuc.detect_nuclei(clump, 0.5, _clump_cfg(cfg, clump_nucleus_area_um2=35.0, clump_max_solidity=0.9))
    assert len(solid["row"]) == 1
    _, big = nuc.detect_nuclei(clump, 0.5, _clump_cfg(cfg, clump_nucleus_area_um2=35.0, split_max_area_um2=40.0))
    assert len(big["row"]) == 1


def test_area_split_cuts_a_row_of_three_into_three():
    """Three flat 7 µm disks 2.5 µm apart in a row (~75 µm²) with a 25 µm² nucleus: three parts."""
    img = _disks(0.5, 7.0, 0.8, [(30.0, 27.5), (30.0, 30.0), (30.0, 32.5)], size_um=60.0)
    labels = (img > 0).astype(np.int32)
    labels, table = nuc.measure_labels(labels, img, 0.5, 0.0)
    out_labels, out = nuc.split_by_area(img, 0.5, labels, table, nucleus_area_um2=25.0)
    assert len(out["row"]) == 3
    assert sorted((out["col"] * 0.5 + 0.25).tolist()) == pytest.approx([27.0, 30.0, 33.0], abs=1.0)
    assert (out_labels > 0).sum() == (labels > 0).sum()


def test_ecad_detector_has_no_width_test_or_lobe_grouping():
    """The E-cadherin analyzer's detector is unchanged by the H&E-only steps (both off)."""
    ecad = load_config("ecad").ecad.nuclei
    assert ecad.min_width_um is None and ecad.lobe_max_gap_um is None
    # nor by the (weighted) core centre or the area split of clumps
    assert ecad.centre_core_fraction is None
    assert getattr(ecad, "clump_nucleus_area_um2", None) is None


def test_megakaryocyte_needs_an_even_nucleus_when_cv_limit_set(cfg):
    """With megakaryocyte_max_od_cv a large but patchy object (a clump) is not a megakaryocyte."""
    table = {
        "area_um2": np.array([400.0, 400.0]),
        "eccentricity": np.array([0.5, 0.5]),
        "h_od_mean": np.array([0.7, 0.7]),
        "h_od_cv": np.array([0.12, 0.35]),
    }
    limited = cfg.classes.model_copy(update={"megakaryocyte_max_od_cv": 0.22})
    assert list(nuc.classify_nuclei(table, limited)) == ["megakaryocyte", "other"]
    size_only = cfg.classes.model_copy(update={"megakaryocyte_max_od_cv": None})
    assert list(nuc.classify_nuclei(table, size_only)) == ["megakaryocyte", "megakaryocyte"]


def _megakaryocyte(mpp: float, size_um: float = 100.0, mottle: float = 0.15) -> np.ndarray:
    """A lobulated megakaryocyte nucleus (five overlapping 16-18 µm lobes, ~800 µm²) with
    mottled chromatin centred at (50, 50) µm, and four 7 µm nuclei, one touching it."""
    rng = np.random.default_rng(0)
    lobes = [(50.0, 50.0, 9.0), (44.0, 43.0, 8.0), (43.0, 57.0, 8.5), (57.0, 44.0, 8.0), (57.0, 58.0, 9.0)]
    img = np.zeros((int(round(size_um / mpp)),) * 2, np.float32)
    for r_um, c_um, rad in lobes:
        img = np.maximum(img, _disks(mpp, 2 * rad, 0.75, [(r_um, c_um)], size_um))
    # chromatin clumps ~2 µm: many smoothed-haematoxylin peaks inside the one nucleus
    blotch = ndi.gaussian_filter(rng.normal(size=img.shape).astype(np.float32), 2.0 / mpp)
    img = np.where(img > 0, img * np.maximum(1.0 + mottle * blotch / blotch.std(), 0.2), 0).astype(np.float32)
    small = [(15.0, 15.0), (15.0, 85.0), (85.0, 20.0), (50.0, 69.0)]  # the last touches a lobe
    return np.maximum(img, _disks(mpp, 7.0, 0.7, small, size_um))


@pytest.mark.parametrize("seeds", ["distance", "peaks"])
@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_lobulated_megakaryocyte_is_one_nucleus_and_classified(cfg, mpp, seeds):
    """he.yaml, with either seed rule: the lobulated nucleus is one megakaryocyte at its centre,
    the four small nuclei stay four; without the megakaryocyte merge the peak seeds cut it into
    fragments, each counted as a cell."""
    img = _megakaryocyte(mpp)
    ncfg = cfg.nuclei.model_copy(update={"seeds": seeds})
    _, table = nuc.detect_nuclei(img, mpp, ncfg)
    classes = nuc.classify_nuclei(table, cfg.classes)
    assert len(table["row"]) == 5
    mk = classes == "megakaryocyte"
    assert mk.sum() == 1
    centre_um = np.array([table["row"][mk][0], table["col"][mk][0]]) * mpp
    assert np.hypot(*(centre_um - 50.0)) < 3.0
    lobes_um2 = float((_megakaryocyte(mpp) > 0).sum()) * mpp**2 - 4 * np.pi * 3.5**2
    assert table["area_um2"][mk][0] == pytest.approx(lobes_um2, rel=0.1)
    assert (table["area_um2"][~mk] < 60.0).all()
    if seeds == "peaks":
        _, frag = nuc.detect_nuclei(img, mpp, ncfg.model_copy(update={"megakaryocyte_min_radius_um": None}))
        assert len(frag["row"]) >= 4 + 3  # the small nuclei and at least three fragments


def test_megakaryocyte_merge_leaves_an_uneven_mass_in_pieces(cfg):
    """A large mass whose haematoxylin is patchy (std/mean above megakaryocyte_merge_max_od_cv)
    is a clump of nuclei: its pieces stay apart; without the check they are merged."""
    img = _megakaryocyte(0.5, mottle=0.6)
    assert cfg.nuclei.megakaryocyte_merge_max_od_cv == 0.22
    _, kept = nuc.detect_nuclei(img, 0.5, cfg.nuclei)
    _, merged = nuc.detect_nuclei(img, 0.5, cfg.nuclei.model_copy(update={"megakaryocyte_merge_max_od_cv": None}))
    big = merged["area_um2"] >= 250.0
    assert big.sum() == 1 and merged["h_od_cv"][big][0] > 0.22
    assert len(kept["row"]) >= len(merged["row"]) + 2
    assert kept["area_um2"].max() < 0.6 * merged["area_um2"][big][0]


def test_megakaryocyte_merge_leaves_clumps_of_small_nuclei_alone(cfg):
    """A tight clump of 19 nuclei 9 µm across, 1 µm apart (a hexagonal rosette ~50 µm wide),
    is no megakaryocyte: none of it holds a 15 µm disk, so the detector's table is unchanged.
    (Nuclei packed with no pale line between them make one solid mass that no mask-based rule
    can tell from one nucleus.)"""
    centres = [(50.0 + 10.0 * (i + 0.5 * j), 50.0 + 10.0 * 0.866 * j) for i in range(-2, 3) for j in range(-2, 3)
               if abs(i + j) <= 2]
    img = _disks(0.5, 9.0, 0.7, centres, size_um=100.0)
    _, merged = nuc.detect_nuclei(img, 0.5, cfg.nuclei)
    _, plain = nuc.detect_nuclei(img, 0.5, cfg.nuclei.model_copy(update={"megakaryocyte_min_radius_um": None}))
    assert len(merged["row"]) == len(plain["row"]) == len(centres)
    assert not (nuc.classify_nuclei(merged, cfg.classes) == "megakaryocyte").any()


# -- learned detector (he.nuclei.detector: unet) ---------------------------------------------

def _he_rgb(h_od: np.ndarray, e_od: float = 0.25) -> np.ndarray:
    """RGB uint8 of a haematoxylin OD image on an even eosin background (Ruifrok vectors)."""
    from marrowseg import stains

    rgb_from = stains.stain_matrix(stains.RUIFROK_H, stains.RUIFROK_E)
    od = h_od[..., None] * rgb_from[0] + e_od * rgb_from[1]
    return np.clip(255.0 * 10.0 ** (-od), 0, 255).round().astype(np.uint8)


def _packaged_weights():
    from marrowseg.analyzers import nuclei_model as nm

    return nm.WEIGHTS_DIR / "nuclei_unet.pt"


# trained weights ship only when the learned detector wins under leave-one-patient-out
# validation (scripts/train_nuclei.py); until then the tests that need them are skipped
needs_weights = pytest.mark.skipif(not _packaged_weights().is_file(), reason="no packaged nuclei_unet.pt")


def test_centre_net_state_dict_round_trips_with_weights_only_and_is_small(tmp_path):
    from marrowseg.analyzers import nuclei_model as nm

    torch.manual_seed(0)
    net = nm.CentreNet(base=8)
    assert sum(p.numel() for p in net.parameters()) < 100_000
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    assert path.stat().st_size < 2_000_000
    back = nm.load_centre_net(path)
    x = torch.rand(1, 3, 37, 50) * 255  # odd sizes: the skips are resized
    with torch.no_grad():
        torch.testing.assert_close(back(x), net.eval()(x))
    assert back(x).shape == (1, 1, 37, 50)


def test_missing_packaged_weights_say_how_to_train(tmp_path):
    from marrowseg.analyzers import nuclei_model as nm

    with pytest.raises(FileNotFoundError, match="train_nuclei"):
        nm.load_centre_net(tmp_path / "absent.pt")


@needs_weights
def test_packaged_centre_net_loads_safely_and_is_small():
    from marrowseg.analyzers import nuclei_model as nm

    path = _packaged_weights()
    assert path.stat().st_size < 2_000_000
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    net = nm.load_centre_net()
    assert sum(p.numel() for p in net.parameters()) < 100_000


@needs_weights
def test_centre_net_finds_nothing_on_blank_tile(cfg):
    from marrowseg.analyzers import nuclei_model as nm

    net = nm.load_centre_net()
    for level in (255, 235):  # glass, pale eosin-free background
        x = torch.full((1, 3, 128, 128), float(level))
        with torch.no_grad():
            m = net(x)[0, 0].numpy()
        pk = nm.centre_peaks(m, 0.5, min_score=cfg.nuclei.unet_min_score, min_distance_um=cfg.nuclei.unet_min_distance_um)
        assert pk.shape == (0, 2)


@needs_weights
def test_centre_net_finds_drawn_disks(cfg):
    """Loose: the net is trained on real marrow only; most drawn nuclei are found, near their centres."""
    from marrowseg.analyzers import nuclei_model as nm

    mpp = 0.5
    h = _disks(mpp, 7.0, 0.8, _CENTRES_UM)
    net = nm.load_centre_net()
    with torch.no_grad():
        m = net(torch.from_numpy(_he_rgb(h)).permute(2, 0, 1)[None].float())[0, 0].numpy()
    pk = nm.centre_peaks(m, mpp, min_score=cfg.nuclei.unet_min_score, min_distance_um=cfg.nuclei.unet_min_distance_um)
    truth = (np.asarray(_CENTRES_UM) - 0.5 * mpp) / mpp
    d = np.sqrt(((pk[:, None, :] - truth[None]) ** 2).sum(-1)) if len(pk) else np.full((0, len(truth)), np.inf)
    found = (d.min(axis=0) <= 2.0 / mpp).sum() if len(pk) else 0
    assert found >= 4
    assert len(pk) <= 2 * len(_CENTRES_UM)


def test_learned_detection_measures_nuclei_like_classical(cfg):
    """detect_nuclei_from_centre_map keeps each peak, and grows it with the classical watershed."""
    mpp = 0.5
    h = _disks(mpp, 7.0, 0.8, _CENTRES_UM)
    truth = (np.asarray(_CENTRES_UM) - 0.5 * mpp) / mpp
    cmap = np.zeros_like(h)
    for r, c in np.round(truth).astype(int):
        cmap[r, c] = 1.0
    cmap = ndi.gaussian_filter(cmap, 2.0) / ndi.gaussian_filter(cmap, 2.0).max()
    _, table = nuc.detect_nuclei_from_centre_map(h, mpp, cfg.nuclei, cmap)
    assert len(table["row"]) == len(_CENTRES_UM)
    np.testing.assert_allclose(table["area_um2"], np.pi * 3.5**2, rtol=0.15)
    blank, empty = nuc.detect_nuclei_from_centre_map(h, mpp, cfg.nuclei, np.zeros_like(h))
    assert len(empty["row"]) == 0 and not blank.any()


def _random_labels(rng, shape, n_seeds):
    """Random touching regions (Voronoi cells of random seeds inside a blobby mask), ids 1..k."""
    mask = ndi.gaussian_filter(rng.random(shape), 2.0) > 0.5
    seeds = np.zeros(shape, np.int32)
    seeds[rng.integers(0, shape[0], n_seeds), rng.integers(0, shape[1], n_seeds)] = np.arange(1, n_seeds + 1)
    _, (ir, ic) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    return np.where(mask, seeds[ir, ic], 0).astype(np.int32)


def test_local_peaks_equal_peak_local_max():
    """local_peaks is skimage's peak_local_max with labels: same peaks, same order, plateaus included."""
    from skimage.feature import peak_local_max

    rng = np.random.default_rng(0)
    for t in range(150):
        h, w = rng.integers(5, 90, 2)
        q = int(rng.integers(2, 12))
        if t % 2:
            img = (rng.integers(0, q, (h, w)) / q).astype(np.float32)  # many plateaus
        else:
            img = np.round(ndi.gaussian_filter(rng.random((h, w)), 1.5) * 40 * q).astype(np.float32)
        if t % 3 == 0:
            img = img.astype(np.float64)
        elif t % 5 == 0:
            img[:] = img.max()  # one plateau: scikit-image's special case
        search = rng.random((h, w)) < rng.uniform(0.3, 1.0)
        m, thr = int(rng.integers(1, 5)), float(rng.uniform(0.0, 0.5))
        ref = peak_local_max(img, min_distance=m, threshold_abs=thr, labels=search.astype(np.uint8), exclude_border=False)
        got = nuc.local_peaks(img, m, thr, search)
        assert got.dtype == ref.dtype and np.array_equal(got, ref), t


def test_fill_holes_equal_remove_small_holes_and_binary_fill_holes():
    """fill_holes gives skimage's remove_small_holes and then scipy's binary_fill_holes exactly."""
    from skimage.morphology import remove_small_holes

    rng = np.random.default_rng(1)
    for t in range(200):
        h, w = rng.integers(1, 70, 2)
        if t % 2:
            m = ndi.gaussian_filter(rng.random((h, w)), rng.uniform(0.3, 2.0)) > rng.uniform(0.4, 0.6)
        else:
            m = rng.random((h, w)) < rng.uniform(0.2, 0.95)
        max_size = [None, 0, 1, 3, 10, 50][t % 6]
        small = m.copy() if max_size is None else remove_small_holes(m, max_size=max_size)
        got_small, got_all = nuc.fill_holes(m, max_size)
        assert np.array_equal(got_small, small), t
        assert np.array_equal(got_all, ndi.binary_fill_holes(small)), t


def test_convex_pixel_counts_equal_per_label_cv2_hull_area():
    """The batched Pick count equals cv2.convexHull + cv2.contourArea label by label."""
    import cv2

    rng = np.random.default_rng(2)
    for t in range(20):
        labels = _random_labels(rng, tuple(rng.integers(20, 120, 2)), int(rng.integers(1, 60)))
        labels[rng.random(labels.shape) < 0.02] = 0  # specks and one-pixel pieces
        n = int(labels.max())
        ref = np.zeros(n)
        for i in range(1, n + 1):
            rr, cc = np.nonzero(labels == i)
            if rr.size == 0:
                continue
            pts = np.column_stack([cc, rr]).astype(np.int32)
            hv = cv2.convexHull(pts).reshape(-1, 2)
            d = np.abs(np.diff(np.vstack([hv, hv[:1]]), axis=0))
            ref[i - 1] = abs(cv2.contourArea(hv)) + np.gcd(d[:, 0], d[:, 1]).sum() / 2.0 + 1.0
        assert np.array_equal(ntable._convex_pixel_counts(labels, n), ref), t
