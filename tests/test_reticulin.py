"""Reticulin analyzer: drawn fibres of known geometry, the grade rule, real BoMBR crop, phantoms."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from marrowseg.analyzers.base import TileContext
from marrowseg.analyzers.reticulin import (
    ReticulinAnalyzer,
    apply_grade_rule,
    borderline_grade,
    grade_from_measurements,
)
from marrowseg.config import load_config

BACKGROUND_RGB = (200, 170, 175)  # pale counterstained marrow (haematopoietic, not empty)
FIBRE_RGB = (70, 60, 65)  # silver: dark and nearly neutral


def _config(**overrides):
    cfg = load_config("reticulin", overrides={"reticulin": overrides} if overrides else {})
    return cfg


def _run_tile(rgb: np.ndarray, mpp: float):
    """Module + post on one tile whose core is the whole image, then finalize."""
    cfg = _config(mpp=mpp)
    an = ReticulinAnalyzer(cfg.reticulin)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        dense = {k: v[0].numpy() for k, v in an.module(x).items()}
    h, w = rgb.shape[:2]
    ctx = TileContext(0, (0, 0), (slice(0, h), slice(0, w)), (h, w), mpp)
    res = an.post(dense, rgb, ctx)
    return res, an.finalize(res.stats, res.windows)


def _draw(size_um: float, mpp: float, lines=(), width_um: float = 1.0, disks=(), ss: int = 4):
    """Anti-aliased drawing at ``ss`` times the resolution, area-averaged down to ``mpp``.

    ``lines`` are (r0, c0, r1, c1) in µm; ``disks`` (r, c, radius) in µm, drawn dark grey.
    """
    n = int(round(size_um / mpp))
    s = ss / mpp
    img = np.empty((n * ss, n * ss, 3), np.uint8)
    img[:] = BACKGROUND_RGB
    for r0, c0, r1, c1 in lines:
        cv2.line(img, (round(c0 * s), round(r0 * s)), (round(c1 * s), round(r1 * s)), FIBRE_RGB,
                 max(1, round(width_um * s)), cv2.LINE_AA)
    for r, c, rad in disks:
        cv2.circle(img, (round(c * s), round(r * s)), round(rad * s), (60, 50, 60), -1, cv2.LINE_AA)
    return cv2.resize(img, (n, n), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_line_length_is_recovered_at_any_angle(mpp):
    """Straight 100 µm lines at four angles measure 100 µm within 4 % each (3 % on average)."""
    measured = []
    for ang in (0.0, 22.5, 45.0, 60.0):
        t = math.radians(ang)
        dr, dc = 50 * math.sin(t), 50 * math.cos(t)
        img = _draw(120, mpp, [(60 - dr, 60 - dc, 60 + dr, 60 + dc)])
        res, _ = _run_tile(img, mpp)
        measured.append(res.stats["fibre_length_um"])
        assert res.stats["n_junctions"] == 0
    np.testing.assert_allclose(measured, 100.0, rtol=0.04)
    assert abs(np.mean(measured) / 100.0 - 1) < 0.03


@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_two_crossing_lines_give_one_intersection(mpp):
    """An X of two 100 µm lines is one intersection seen and 200 µm of fibre; the overlap model
    adds only what the fibres' local cover implies (a few per cent), never removes any."""
    res, rep = _run_tile(_draw(130, mpp, [(65, 15, 65, 115), (15, 65, 115, 65)]), mpp)
    assert res.stats["n_junctions_seen"] == 1
    assert rep["counts"]["n_junctions_seen"] == 1
    # the model never removes a crossing and adds only what the local cover implies
    assert res.stats["n_junctions_seen"] <= res.stats["n_junctions"] < 1.2 * res.stats["n_junctions_seen"]
    assert rep["counts"]["n_junctions"] == res.stats["n_junctions"]
    np.testing.assert_allclose(res.stats["fibre_length_um"], 200.0, rtol=0.04)


def test_crossing_count_does_not_depend_on_how_the_skeleton_splits_it():
    """Hand-made skeletons: a degree-4 cross is 1 crossing, two degree-3 nodes 6 px apart (a
    shallow crossing) are 1, a T is 1/2, and a straight line none, at any merge distance."""
    from marrowseg.analyzers import fibres

    x = np.zeros((41, 41), bool)
    x[20, 5:36] = True
    x[5:36, 20] = True
    split = np.zeros((41, 41), bool)
    split[20, 5:36] = True
    split[5:20, 14] = True  # one fibre leaves the line at col 14, the other at col 20
    split[21:36, 20] = True
    tee = np.zeros((41, 41), bool)
    tee[20, 5:36] = True
    tee[21:36, 20] = True
    line = np.zeros((41, 41), bool)
    line[20, 5:36] = True
    for radius in (1.0, 2.0, 5.0):
        for skel, want in ((x, 1.0), (split, 1.0), (tee, 0.5), (line, 0.0)):
            _, w = fibres.crossings(skel, radius)
            assert w.sum() == want


def test_crossings_hidden_by_overlap_follow_the_hole_model():
    """Each branch point's (deg - 2) / 2 is divided by 1 - p at that pixel, p the local cover
    less the crossing fibres' own share; 1 / (1 - p) is close to the length factor squared."""
    from marrowseg.analyzers import fibres

    x = np.zeros((41, 41), bool)
    x[20, 5:36] = True
    x[5:36, 20] = True
    cover = np.zeros((41, 41))
    cover[:, 21:] = 0.5  # the factor only counts where the branch point is
    zero = np.zeros_like(cover)
    _, w = fibres.crossings(x, 2.0, fibres.crossing_overlap_factor(cover, zero, 1.0, max_frac=0.8))
    assert w.sum() == 1.0
    cover[20, 20] = 0.3
    _, w = fibres.crossings(x, 2.0, fibres.crossing_overlap_factor(cover, zero, 1.0, max_frac=0.8))
    np.testing.assert_allclose(w.sum(), 1 / 0.7)
    np.testing.assert_allclose(w.sum(), (-math.log(0.7) / 0.3) ** 2, rtol=0.02)
    # the two crossing fibres cover 1/8 of the window: p = (0.3 - 0.125) / 0.875 = 0.2
    own = np.full_like(cover, 0.125)
    _, w = fibres.crossings(x, 2.0, fibres.crossing_overlap_factor(cover, own, 1.0, max_frac=0.8))
    np.testing.assert_allclose(w.sum(), 1 / 0.8)
    _, w = fibres.crossings(x, 2.0, fibres.crossing_overlap_factor(cover, zero, 0.0, max_frac=0.8))
    assert w.sum() == 1.0


def test_overlap_factor_follows_the_boolean_model():
    """Fibres covering 30 % of the marrow (stripes) get -ln(0.7)/0.3 = 1.19 inside; sparse ones ~1."""
    from marrowseg.analyzers import fibres

    region = np.ones((200, 200), bool)
    dense = np.zeros((200, 200), bool)
    dense[:, ::10] = dense[:, 1::10] = dense[:, 2::10] = True  # 3 px of every 10
    f = fibres.overlap_factor(dense, region, 8.0, max_frac=0.8)
    np.testing.assert_allclose(f[100, 100], -math.log(0.7) / 0.3, rtol=0.02)
    assert (f >= 1).all()
    sparse = np.zeros((200, 200), bool)
    sparse[100, :] = True
    assert fibres.overlap_factor(sparse, region, 8.0, max_frac=0.8).max() < 1.05
    assert (fibres.overlap_factor(np.zeros_like(region), region, 8.0, max_frac=0.8) == 1).all()


def test_own_cover_of_a_fibre_is_its_share_of_the_window_and_is_removed():
    """A straight strip w px wide holds w / (sqrt(2 pi) sigma) of a Gaussian window centred on it;
    removing that share from cover = s + (1 - s) p gives back the cover p of the other fibres."""
    from marrowseg.analyzers import fibres

    region = np.ones((301, 301), bool)
    strip = np.zeros_like(region)
    strip[:, 149:152] = True  # 3 px wide through the centre
    measured = fibres.overlap_fraction(strip, region, 20.0)[150, 150]
    np.testing.assert_allclose(measured, fibres.own_cover(np.float64(3.0), 1, 20.0), rtol=0.03)
    s = fibres.own_cover(np.array([1.5, 1.5]), 2, 10.0)  # two 1.5 µm fibres, 10 µm window
    p = np.array([0.0, 0.25])
    np.testing.assert_allclose(fibres.cover_without_own(s + (1 - s) * p, s, max_frac=0.8), p, atol=1e-12)
    # measured cover below the fibre's own share (noise, a narrower neighbour) reads as no overlap
    assert fibres.cover_without_own(np.array([0.01]), np.array([0.1]), max_frac=0.8)[0] == 0.0


def test_lone_fibre_length_is_not_inflated_by_its_own_cover():
    """A single straight fibre overlaps nothing: with the fibre's own share removed (Palm), the
    overlap correction leaves its skeleton length as it is; reading the raw cover at the fibre
    added a few per cent."""

    def length(**kw):
        cfg = _config(mpp=0.5, **kw)
        an = ReticulinAnalyzer(cfg.reticulin)
        img = _draw(120, 0.5, [(60, 10, 60, 110)], width_um=1.5)
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            dense = {k: v[0].numpy() for k, v in an.module(x).items()}
        n = img.shape[0]
        res = an.post(dense, img, TileContext(0, (0, 0), (slice(0, n), slice(0, n)), (n, n), 0.5))
        return res.stats["fibre_length_um"]

    raw = length(overlap_sigma_um=0.0)
    palm = length()
    plain = length(overlap_palm=False)
    assert abs(palm / raw - 1) < 0.005
    assert plain / raw - 1 > 0.01  # the fibre's own cover read as overlap
    assert palm < plain


def test_blank_tile_gives_zeros():
    """White glass: no haematopoietic area, no fibres, grade 0."""
    res, rep = _run_tile(np.full((256, 256, 3), 255, np.uint8), 0.5)
    assert res.stats["haem_px"] == 0
    assert res.stats["fibre_length_um"] == 0 and res.stats["n_junctions"] == 0
    assert rep["readouts"]["mf_grade"] == 0
    assert rep["readouts"]["fibre_length_um_per_1e4um2"] == 0


def test_dark_round_blobs_are_not_fibres():
    """Dark disks of nuclear size (2.5-5 µm radius) give no fibre length."""
    disks = [(50, 50, 3), (50, 120, 4), (120, 60, 5), (140, 140, 3.5), (100, 100, 2.5)]
    res, _ = _run_tile(_draw(200, 0.5, disks=disks), 0.5)
    assert res.stats["fibre_length_um"] < 2.0
    assert res.stats["n_junctions"] == 0


def test_thick_fibres_are_told_from_thin_by_width():
    """A 1 µm line is thin, a 4 µm band is thick (thick_width_um in the config is 2 µm)."""
    thin, _ = _run_tile(_draw(120, 0.5, [(60, 10, 60, 110)], width_um=1.0), 0.5)
    thick, _ = _run_tile(_draw(120, 0.5, [(60, 10, 60, 110)], width_um=4.0), 0.5)
    assert thin.stats["thick_fibre_length_um"] < 0.05 * thin.stats["fibre_length_um"]
    assert thick.stats["thick_fibre_length_um"] > 0.9 * thick.stats["fibre_length_um"]


def test_windows_sum_to_tile_totals():
    """Per-window sums add up to the tile stats (windows partition the core)."""
    mpp = 0.5
    img = _draw(300, mpp, [(20, 20, 280, 280), (280, 20, 20, 280), (150, 5, 150, 295)])
    cfg = _config(mpp=mpp, window_um=100)
    an = ReticulinAnalyzer(cfg.reticulin)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        dense = {k: v[0].numpy() for k, v in an.module(x).items()}
    h, w = img.shape[:2]
    core = (slice(20, h - 20), slice(20, w - 20))
    ctx = TileContext(0, (40, 40), core, (h, w), mpp)
    res = an.post(dense, img, ctx)
    for key in ("haem_px", "fibre_length_um", "n_junctions"):
        total = sum(win[key] for win in res.windows.values())
        np.testing.assert_allclose(total, res.stats[key], rtol=1e-9, atol=1e-9)
    # window index = floor(slide_px * mpp / window_um); the core starts at slide px 60 = 30 µm
    assert min(res.windows) == (0, 0) and max(res.windows) == (3, 3)


def test_grade_rule_on_hand_made_areas():
    """EUMNET: highest grade covering >= 30 % of haematopoietic area; max and majority rules."""
    assert apply_grade_rule({0: 50, 2: 50}, "eumnet_30pct", 0.3) == 2
    assert apply_grade_rule({1: 75, 3: 25}, "eumnet_30pct", 0.3) == 1
    assert apply_grade_rule({1: 65, 3: 35}, "eumnet_30pct", 0.3) == 3
    assert apply_grade_rule({1: 75, 3: 25}, "max", 0.3) == 3
    assert apply_grade_rule({0: 60, 2: 40}, "majority", 0.3) == 0
    assert apply_grade_rule({}, "eumnet_30pct", 0.3) == 0


def _cell_sums(grade_of, shape, c):
    """Hand-made per-cell sums: every cell full of marrow at the middle of its grade's band."""
    px = round((c.window_um / c.mpp) ** 2)
    cell_um2 = c.window_um**2
    t = c.grade_thresholds
    # length density, intersections /mm², thick fraction per grade, well inside each band
    levels = {0: (40.0, 0.0, 0.0), 1: (250.0, 150.0, 0.0), 2: (700.0, 1500.0, 0.05), 3: (1600.0, 9000.0, 0.2)}
    assert levels[1][0] > t.fibre_length_um_per_1e4um2[0] and levels[2][2] < t.thick_fibre_frac[2]
    cells = {}
    for r in range(shape[0]):
        for col in range(shape[1]):
            dens, jun, thick = levels[grade_of(r, col)]
            length = dens * cell_um2 / 1e4
            cells[(r, col)] = {"haem_px": px, "fibre_length_um": length,
                               "thick_fibre_length_um": thick * length, "n_junctions": jun * cell_um2 / 1e6}
    totals = {k: sum(w[k] for w in cells.values()) for k in cells[(0, 0)]}
    return cells, totals


def test_finalize_grades_half_and_half_by_eumnet():
    """Half the marrow at MF-2 level, half at MF-0 (1 mm square of cells) -> MF-2; the MF-2
    share of the local-grade map is close to a half (the sliding window blurs both ways)."""
    c = _config().reticulin
    an = ReticulinAnalyzer(c)
    n = int(round(1000 / c.window_um))
    cells, totals = _cell_sums(lambda r, col: 2 if col < n // 2 else 0, (n, n), c)
    ro = an.finalize(totals, cells)["readouts"]
    assert ro["mf_grade"] == 2
    assert ro["grade_rule"] == "eumnet_30pct"
    assert abs(ro["local_grade_frac"]["MF-2"] - 0.5) <= 0.1
    assert ro["local_grade_frac"]["MF-0"] >= 0.3
    assert ro["mf_grade_borderline_with"] is None  # half the marrow is far from the 30 % rule


def test_borderline_grade_names_the_other_grade_near_the_30_pct_rule():
    """A deciding share within the margin of 30 % names the grade it would give across it."""
    assert borderline_grade({0: 63, 1: 9, 2: 28}, 0.3, 0.05) == 2  # MF-0, MF-2 just short
    assert borderline_grade({1: 69, 3: 31}, 0.3, 0.05) == 1  # MF-3, just over
    assert borderline_grade({1: 50, 2: 18, 3: 32}, 0.3, 0.05) == 1  # without MF-3's share MF-1 leads
    assert borderline_grade({0: 50, 2: 50}, 0.3, 0.05) is None
    assert borderline_grade({1: 78, 3: 22}, 0.3, 0.05) is None  # 8 points short
    assert borderline_grade({1: 69, 3: 31}, 0.3, 0.0) is None  # margin 0: off
    assert borderline_grade({3: 100}, 0.3, 0.05) is None and borderline_grade({}, 0.3, 0.05) is None


@pytest.mark.parametrize("pct, want", [(25, 1), (40, 3)])
def test_finalize_patch_graded_by_its_area(pct, want):
    """A square MF-3 patch in MF-1 marrow: 25 % of the area -> MF-1, 40 % -> MF-3 (EUMNET 30 %),
    and the patch's graded share is within 7 points of its true share."""
    c = _config().reticulin
    an = ReticulinAnalyzer(c)
    n = int(round(1000 / c.window_um))
    side = int(round(n * math.sqrt(pct / 100)))
    cells, totals = _cell_sums(lambda r, col: 3 if r < side and col < side else 1, (n, n), c)
    ro = an.finalize(totals, cells)["readouts"]
    true_frac = side * side / (n * n)
    assert abs(ro["local_grade_frac"]["MF-3"] - true_frac) <= 0.07
    assert ro["mf_grade"] == want
    share = ro["local_grade_frac"]["MF-3"]
    near = abs(share - 0.3) <= 0.05
    assert (ro["mf_grade_borderline_with"] is not None) == near
    if near:
        assert ro["mf_grade_borderline_with"] == 4 - want  # MF-1 <-> MF-3


def test_fatty_marrow_is_graded_over_a_larger_window_not_dropped():
    """Left half fatty (a quarter of each cell is marrow, MF-1 level), right half cellular MF-3
    (1.5 mm square): the fatty half keeps about its share of the marrow (1/5) in the map."""
    c = _config().reticulin
    an = ReticulinAnalyzer(c)
    n = int(round(1500 / c.window_um))
    cells, _ = _cell_sums(lambda r, col: 1 if col < n // 2 else 3, (n, n), c)
    for (_r, col), w in cells.items():
        if col < n // 2:
            for k in w:
                w[k] = w[k] * 0.25
            w["haem_px"] = round(w["haem_px"])
    totals = {k: sum(w[k] for w in cells.values()) for k in cells[(0, 0)]}
    ro = an.finalize(totals, cells)["readouts"]
    assert abs(ro["local_grade_frac"]["MF-1"] - 1 / 5) < 0.05
    assert ro["mf_grade"] == 3


def test_local_grade_map_is_centred_and_one_cell_window_is_the_old_grid():
    """The grade of a cell is measured over the window centred on it; with a one-cell window
    each cell is graded on its own sums."""
    from marrowseg.analyzers.reticulin import local_grades

    c = _config().reticulin
    cells, _ = _cell_sums(lambda r, col: 3 if (r, col) == (5, 5) else 0, (11, 11), c)
    one = local_grades(cells, c.mpp, c.grade_thresholds, cell_um=c.window_um, window_um=c.window_um,
                       min_haem_frac=c.window_min_haem_frac)
    assert one["grades"][5, 5] == 3 and (one["grades"] == 0).sum() == 120
    wide = local_grades(cells, c.mpp, c.grade_thresholds, cell_um=c.window_um, window_um=5 * c.window_um,
                        min_haem_frac=c.window_min_haem_frac)
    assert wide["window_cells"] == 5
    # one dense cell in 25 does not make its neighbourhood MF-3; the map is symmetric about it
    g = wide["grades"]
    assert g.max() < 3 and (g == g[::-1, ::-1]).all() and (g == g.T).all()
    assert (g[:3] <= 0).all()  # cells whose window misses the dense cell (corners: too little marrow)


def test_fibrosis_index_is_monotone_in_length_density():
    """The continuous index never decreases as fibre density grows, and floor(index) is the grade."""
    t = _config().reticulin.grade_thresholds
    prev = -1.0
    for length in np.linspace(0, 3000, 301):
        m = {"fibre_length_um_per_1e4um2": length, "intersections_per_mm2": 1e5, "thick_fibre_frac": 1.0}
        grade, idx = grade_from_measurements(m, t)
        assert idx >= prev
        assert grade == min(3, math.floor(idx + 1e-9))
        prev = idx
    assert prev == 3.0


def _f1_with_tolerance(pred: np.ndarray, truth: np.ndarray) -> float:
    st = np.ones((3, 3), bool)
    precision = (pred & ndi.binary_dilation(truth, st)).sum() / max(pred.sum(), 1)
    recall = (truth & ndi.binary_dilation(pred, st)).sum() / max(truth.sum(), 1)
    return 2 * precision * recall / max(precision + recall, 1e-9)


def test_bombr_fibre_mask_f1(shared_data):
    """Real Gomori crop at 1.0 µm/px through the engine: fibre F1 (1 px tolerance) >= 0.6."""
    from skimage.io import imread

    from marrowseg.analyzers import get_analyzer
    from marrowseg.engine import analyze_array

    rgb = imread(shared_data("reticulin-bombr/fig0_image.png"))[..., :3]
    truth = imread(shared_data("reticulin-bombr/fig0_reticulin_gt.png")) > 0
    cfg = load_config("reticulin")
    res = analyze_array(rgb, 1.0, get_analyzer("reticulin", cfg), cfg)
    fib = res.maps["fibres"] > 0
    # the analysis runs at 0.5 µm/px: a 1 µm pixel is fibre when any of its 2 x 2 is
    fib = cv2.resize(fib.astype(np.uint8), truth.shape[::-1], interpolation=cv2.INTER_AREA) > 0
    assert _f1_with_tolerance(fib, truth) >= 0.6
    assert res.report["readouts"]["fibre_length_um_per_1e4um2"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("grade", [0, 3])
def test_phantom_grade_is_recovered(grade):
    """Small synthetic phantoms (unseen seeds >= 1000) of MF-0 and MF-3 get their grade."""
    from marrowseg.analyzers import get_analyzer
    from marrowseg.engine import analyze_array
    from marrowseg.synth import make_phantom

    ph = make_phantom("reticulin", seed=1000 + grade, size_px=(1536, 1536), mpp=0.25, grade=grade)
    rgb = ph.render(0, 0, 1536, 1536)[..., :3]
    cfg = load_config("reticulin")
    res = analyze_array(rgb, 0.25, get_analyzer("reticulin", cfg), cfg)
    assert res.report["readouts"]["mf_grade"] == grade


def test_reference_dense_matches_module_and_post():
    """The NumPy/SciPy reference of the dense step gives the module's maps and post stats within 1 %."""
    mpp = 0.5
    lines = [(20, 20, 280, 280), (280, 20, 20, 280), (150, 5, 150, 295), (60, 10, 90, 290)]
    img = _draw(300, mpp, lines, disks=[(230, 80, 4), (100, 200, 3)])
    img[400:480, 100:200] = (190, 120, 90)  # a pale orange (bone-like) patch
    an = ReticulinAnalyzer(_config(mpp=mpp).reticulin)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        dense = {k: v[0].numpy() for k, v in an.module(x).items()}
    ref = an.reference_dense(img)
    assert set(ref) == set(dense)
    for key in ("ridge_od", "mean_od", "orange_od", "tophat_od", "wide_dark_od"):
        assert ref[key].shape == dense[key].shape and ref[key].dtype == np.float32
        np.testing.assert_allclose(ref[key], dense[key], atol=2e-3, err_msg=key)
    h, w = img.shape[:2]
    ctx = TileContext(0, (0, 0), (slice(0, h), slice(0, w)), (h, w), mpp)
    got, want = an.post(ref, img, ctx).stats, an.post(dense, img, ctx).stats
    for key, v in want.items():
        np.testing.assert_allclose(got[key], v, rtol=0.01, atol=1, err_msg=key)


def test_half_max_rays_cover_the_square_once():
    from marrowseg.analyzers import fibres

    for r in (1, 2, 3):
        offs = [o for ray in fibres.half_max_rays(r) for o in ray]
        both = offs + [(-a, -b) for a, b in offs]
        square = [(a, b) for a in range(-r, r + 1) for b in range(-r, r + 1) if (a, b) != (0, 0)]
        assert sorted(both) == sorted(square)


def _blurred_profile(values: list[float], rows: int = 21) -> np.ndarray:
    """Columns of given contrast (OD), repeated down ``rows`` rows: a vertical structure."""
    return np.tile(np.asarray(values, np.float32), (rows, 1))


def test_half_max_body_keeps_a_bundle_beside_a_darker_fibre():
    """A black fibre (0.6 OD) on a fainter bundle (0.2 OD): the plain half-max (>= half the
    square's maximum) cuts slits into the bundle beside the fibre; the body keeps them. An
    isolated fibre's skirt below half maximum and a valley between two fibres stay out."""
    from marrowseg.analyzers import fibres

    bundle = [0, 0, 0.2, 0.2, 0.2, 0.2, 0.6, 0.2, 0.2, 0.2, 0.2, 0, 0]
    top = _blurred_profile(bundle)
    body = fibres.half_max_body(top, 2.0, 0.04)
    row = body[10]
    plain = (top >= 0.5 * ndi.maximum_filter(top, size=5, mode="nearest"))[10]
    assert not plain[4] and not plain[8]  # the slits of the former rule
    assert row[2:11].all() and not row[:2].any() and not row[11:].any()

    skirt = fibres.half_max_body(_blurred_profile([0, 0, 0.05, 0.15, 0.6, 0.15, 0.05, 0, 0]), 2.0, 0.04)[10]
    assert skirt[2:7].tolist() == [False, False, True, False, False]
    valley = fibres.half_max_body(_blurred_profile([0, 0, 0.6, 0.2, 0.6, 0, 0]), 2.0, 0.04)[10]
    assert valley[2] and not valley[3] and valley[4]
    # a faint level side (below the seed contrast) is background, not a bundle
    faint = fibres.half_max_body(_blurred_profile([0.03, 0.03, 0.03, 0.03, 0.3, 0, 0]), 2.0, 0.04)[10]
    assert not faint[3]


def test_half_max_body_torch_matches_numpy():
    from marrowseg.analyzers import fibres

    rng = np.random.default_rng(0)
    top = ndi.gaussian_filter(rng.random((40, 50)).astype(np.float32), 1.0) ** 3
    ref = fibres.half_max_body(top, 2.0, 0.04)
    out = fibres.half_max_body_torch(torch.from_numpy(top)[None, None], 2.0, 0.04)[0, 0].numpy()
    assert ref.any() and not ref.all()
    np.testing.assert_array_equal(out, ref)


def test_fill_small_holes_only_fills_small_enclosed_holes():
    from marrowseg.tiling import fill_enclosed_holes

    m = np.zeros((20, 20), bool)
    m[2:8, 2:8] = True
    m[4, 4] = False  # one-pixel hole
    m[2:8, 10:16] = True
    m[4, 12:14] = False  # two-pixel hole
    m[0:3, 17] = True  # touches the border: the background beside it is not a hole
    out = fill_enclosed_holes(m, 1.0)
    assert out[4, 4] and not out[4, 12:14].any()
    assert fill_enclosed_holes(m, 2.0)[4, 12:14].all()
    assert (fill_enclosed_holes(m, 0.0) == m).all()
    assert out.sum() == m.sum() + 1


def test_black_fibres_over_a_fainter_bundle_cross_it():
    """Two black reticulin fibres (0.8 µm) crossing a fainter 5 µm bundle at +-70 deg: the mask
    holds the whole bundle (the former half-max rule cut slits beside each fibre, covering
    95 % of it and leaving the fibres unjoined: 0 crossings) and the skeleton crosses twice."""
    mpp, ss = 0.5, 4
    n, s = int(round(120 / mpp)), ss / mpp
    img = np.empty((n * ss, n * ss, 3), np.uint8)
    img[:] = BACKGROUND_RGB
    cv2.line(img, (round(10 * s), round(60 * s)), (round(110 * s), round(60 * s)), (140, 125, 125),
             round(5 * s), cv2.LINE_AA)
    for x0, ang in ((35.0, 70.0), (85.0, 110.0)):
        t = math.radians(ang)
        dr, dc = 30 * math.sin(t), 30 * math.cos(t)
        cv2.line(img, (round((x0 - dc) * s), round((60 - dr) * s)), (round((x0 + dc) * s), round((60 + dr) * s)),
                 FIBRE_RGB, round(0.8 * s), cv2.LINE_AA)
    img = cv2.resize(img, (n, n), interpolation=cv2.INTER_AREA)
    res, _ = _run_tile(img, mpp)
    mask = res.maps["fibres"] > 0
    rr, cc = np.mgrid[0:n, 0:n] * mpp
    body = (np.abs(rr - 60) < 2.0) & (cc > 15) & (cc < 105)
    assert mask[body].mean() > 0.99
    assert res.stats["n_junctions_seen"] == 2.0


def test_branch_width_keeps_thin_fibres_crossing_a_bundle_thin():
    """Thin fibres (2 px) crossing a bundle (11 px): per pixel, the stretch of each thin fibre's
    skeleton inside the bundle has the bundle's distance-transform width; measured along its
    branch away from the junction, it is thin again, and the bundle stays thick."""
    from skimage.morphology import skeletonize

    from marrowseg.analyzers import fibres

    mask = np.zeros((80, 200), bool)
    mask[30:41, 10:190] = True  # bundle
    for col in (40, 80, 120, 160):
        mask[5:75, col : col + 2] = True  # thin fibres across it
    skel = skeletonize(mask)
    width = fibres.local_width_px(mask, skel)
    branch = fibres.branch_width_px(mask, skel, dist=ndi.distance_transform_edt(mask))
    assert (branch[skel] >= 1).all() and (branch[~skel] == 0).all()
    thin = skel & (np.abs(np.arange(80) - 35) >= 2)[:, None] & (np.isin(np.arange(200) // 40, [1, 2, 3, 4]))[None, :] \
        & ((np.arange(200) % 40) < 4)[None, :]
    inside = thin & (np.abs(np.arange(80) - 35) <= 4)[:, None]
    assert inside.sum() >= 8
    assert width[inside].max() > 4  # per pixel: the bundle's width
    assert branch[thin].max() <= 2  # per branch: the thin fibre's
    along = skel & (np.arange(80) == 35)[:, None] & ((np.arange(200) % 40) >= 8)[None, :]
    assert along.sum() > 100 and branch[along].min() >= 9
    np.testing.assert_array_equal(fibres.branch_width_px(mask, skel), branch)


def test_thin_fibres_across_a_bundle_do_not_count_as_thick():
    """A 5 µm bundle crossed by four 1 µm fibres: the thick length is the bundle's, not the
    bundle's plus the thin fibres' stretches inside it (about 4 x 5 µm more, per pixel)."""
    lines = [(60, 10, 60, 110)] + [(30, x, 90, x) for x in (25, 45, 65, 85)]
    bundle = _draw(120, 0.5, lines[:1], width_um=5.0)
    alone, _ = _run_tile(bundle, 0.5)
    res, _ = _run_tile(np.minimum(bundle, _draw(120, 0.5, lines[1:], width_um=1.0)), 0.5)
    st = res.stats
    # per pixel, each crossing added ~2.5 µm of thick length (+15 µm in all); the rest of the
    # difference is the overlap correction of the bundle near the crossings
    assert abs(st["thick_fibre_length_um"] - alone.stats["thick_fibre_length_um"]) <= 8.0
    assert st["fibre_length_um"] - st["thick_fibre_length_um"] >= 4 * 60 - 30


def test_fibrosis_index_is_monotone_in_every_measurement():
    """Raising any measurement never lowers the index or the grade (random pairs a <= b, the
    configured bounds and random ones), so serial biopsies change it in the fibres' direction."""
    from marrowseg.analyzers.reticulin import MEASURES, grade_index_array

    rng = np.random.default_rng(0)
    scale = {"fibre_length_um_per_1e4um2": 3000.0, "intersections_per_mm2": 20000.0, "thick_fibre_frac": 0.6}
    configured = _config().reticulin.grade_thresholds
    random_bounds = type("T", (), {k: sorted(rng.uniform(0, scale[k], 3)) for k in MEASURES})
    for t in (configured, random_bounds):
        a = {k: rng.uniform(0, scale[k], 4000) for k in MEASURES}
        b = {k: a[k] + rng.uniform(0, scale[k], 4000) * (rng.random(4000) < 0.5) for k in MEASURES}
        ga, ia = grade_index_array(a, t)
        gb, ib = grade_index_array(b, t)
        assert (ib >= ia - 1e-12).all() and (gb >= ga).all()
        assert ia.min() < 1 and ib.max() > 2  # the draws span the grades


@pytest.mark.parametrize("min_width_um", [12.0, 0.0])
def test_narrow_empty_space_in_marrow_is_not_fat(min_width_um):
    """An empty space as large as an adipocyte section but narrow (pale marrow) stays marrow.

    A round empty space 30 µm across (an adipocyte) is fat either way; an empty band 8 µm wide and
    60 µm long (~400 µm², above ``fat_min_um2``) is fat only when ``fat_min_width_um`` is off.
    """
    from marrowseg.analyzers.reticulin import FAT, HAEM

    mpp = 0.5
    img = _draw(200, mpp)
    empty_rgb = (242, 240, 242)  # mean OD ~0.03, below fat_max_od
    cv2.circle(img, (round(60 / mpp), round(60 / mpp)), round(15 / mpp), empty_rgb, -1)
    img[round(120 / mpp):round(128 / mpp), round(70 / mpp):round(130 / mpp)] = empty_rgb
    cfg = _config(mpp=mpp, fat_min_width_um=min_width_um)
    an = ReticulinAnalyzer(cfg.reticulin)
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        dense = {k: v[0].numpy() for k, v in an.module(x).items()}
    h, w = img.shape[:2]
    labels = an.post(dense, img, TileContext(0, (0, 0), (slice(0, h), slice(0, w)), (h, w), mpp)).maps["labels"]
    disk = labels[round(50 / mpp):round(70 / mpp), round(50 / mpp):round(70 / mpp)]
    band = labels[round(122 / mpp):round(126 / mpp), round(80 / mpp):round(120 / mpp)]
    assert (disk == FAT).all()
    if min_width_um > 0:
        assert (band == HAEM).all()
    else:
        assert (band == FAT).all()


def test_black_fill_is_excluded_and_does_not_dilute_the_fibre_density():
    """A black band was marrow without fibres: the density read lower by the band's share."""
    from marrowseg import synth
    from marrowseg.analyzers.reticulin import ReticulinAnalyzer
    from marrowseg.engine import analyze_array

    ph = synth.make_phantom("reticulin", seed=1090, size_px=(1024, 1024), mpp=0.5, grade=1)
    rgb = ph.render(0, 0, 1024, 1024)
    cfg = load_config("reticulin")
    clean = analyze_array(rgb, 0.5, ReticulinAnalyzer(cfg.reticulin), cfg, device="cpu")
    rgb[:, :200] = 0
    res = analyze_array(rgb, 0.5, ReticulinAnalyzer(cfg.reticulin), cfg, device="cpu")
    assert (res.maps["labels"][:, : 200 // ReticulinAnalyzer(cfg.reticulin).map_downsample] == 0).all()
    want = clean.report["readouts"]["fibre_length_um_per_1e4um2"]
    assert res.report["readouts"]["fibre_length_um_per_1e4um2"] == pytest.approx(want, rel=0.1)
