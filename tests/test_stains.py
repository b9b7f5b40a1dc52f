"""Optical density and colour deconvolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marrowseg import stains


def _mix(conc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """RGB uint8-range floats of concentrations ``conc`` (N, k) under Beer-Lambert with rows of ``m``."""
    return 255.0 * 10 ** (-(conc @ m))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deconvolution_recovers_known_concentrations(dtype):
    """Pure haematoxylin gives (c, 0, 0); mixtures give back their concentrations."""
    m = stains.stain_matrix(stains.RUIFROK_H, stains.RUIFROK_DAB)
    rng = np.random.default_rng(0)
    conc = np.column_stack([rng.uniform(0, 1.2, 500), rng.uniform(0, 0.8, 500), np.zeros(500)])
    rgb = _mix(conc, m)
    od = torch.as_tensor(stains.od_from_rgb(rgb), dtype=dtype).T.reshape(1, 3, 500, 1)
    out = stains.concentrations_torch(od, m)[0, :, :, 0].T.numpy()
    assert out.dtype == (np.float32 if dtype == torch.float32 else np.float64)
    np.testing.assert_allclose(out, conc, atol=2e-3)


def test_od_of_glass_is_zero_and_of_black_is_finite():
    od = stains.od_from_rgb(np.array([[255, 255, 255], [0, 0, 0]], np.uint8))
    assert od.dtype == np.float32
    np.testing.assert_allclose(od[0], 0)
    assert np.isfinite(od[1]).all() and (od[1] > 2).all()


def test_stain_matrix_completes_two_vectors_with_a_positive_unit_row():
    m = stains.stain_matrix(stains.RUIFROK_H, stains.RUIFROK_E)
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1)
    np.testing.assert_allclose(m[2], np.abs(np.cross(m[0], m[1])) / np.linalg.norm(np.cross(m[0], m[1])))
    assert (m[2] >= 0).all() and abs(np.linalg.det(m)) > 0.1


def test_macenko_finds_the_mixed_vectors_haematoxylin_first():
    h, dab = stains.normalize_rows(np.array([stains.RUIFROK_H, stains.RUIFROK_DAB]))
    rng = np.random.default_rng(1)
    conc = np.column_stack([rng.exponential(0.4, 20000), rng.exponential(0.3, 20000)])
    od = stains.od_from_rgb(np.clip(_mix(conc, np.vstack([h, dab])), 0, 255))
    vecs, info = stains.estimate_two_stains(od)
    assert info["n_pixels"] > 10000
    assert np.degrees(np.arccos(np.clip(vecs[0] @ h, -1, 1))) < 5
    assert np.degrees(np.arccos(np.clip(vecs[1] @ dab, -1, 1))) < 5


def test_macenko_says_impossible_on_glass():
    vecs, info = stains.estimate_two_stains(np.zeros((1000, 3)))
    assert vecs is None and info["n_pixels"] == 0


def test_restain_scales_every_optical_density():
    grey = np.arange(1, 256, dtype=np.uint8)
    rgb = np.stack([grey, grey[::-1], np.full(255, 200, np.uint8)], axis=1)
    assert (stains.restain(rgb, 1.0) == rgb).all()
    assert (stains.restain(np.zeros((1, 3), np.uint8), 1.0) == 1).all()  # black reads as 1, the OD floor
    darker = stains.restain(rgb, 1.5)
    od, od2 = stains.od_from_rgb(rgb), stains.od_from_rgb(darker)
    # every channel's OD x1.5 up to the 8-bit rounding (half a grey level of the darker image),
    # where the darker image is not saturated
    tol = 0.5 / np.maximum(darker.astype(np.float64), 1) / np.log(10) + 1e-6
    lit = darker >= 10
    assert lit.mean() > 0.9 and (np.abs(od2 - 1.5 * od)[lit] <= tol[lit]).all()
    assert (stains.restain(rgb, 0.5) >= rgb).all()  # paler: never darker
    with pytest.raises(ValueError):
        stains.restain(rgb, 0.0)


def test_od_of_uint8_is_the_formula_to_the_bit_and_leaves_float_input_alone():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = np.maximum(img.astype(np.float32), np.float32(1.0))
    expected = np.maximum(-np.log10(x / np.float32(255.0)), np.float32(0.0))
    got = stains.od_from_rgb(img)
    assert got.dtype == np.float32 and (got.view(np.int32) == expected.view(np.int32)).all()
    f = img.astype(np.float32)
    before = f.copy()
    assert (stains.od_from_rgb(f) == got).all()
    assert (f == before).all()  # not clamped in place


def test_match_stains_pairs_by_angle_not_by_the_estimators_order():
    ref = stains.stain_matrix(stains.RUIFROK_H, stains.RUIFROK_DAB)
    h, dab = ref[0] + 0.02, ref[1] - 0.02
    for given in ((h, dab), (dab, h)):
        got = stains.match_stains(np.array(given), ref)
        np.testing.assert_array_equal(got[0], h)
        np.testing.assert_array_equal(got[1], dab)
    assert stains.angle_deg(ref[0], 3 * ref[0]) == pytest.approx(0.0, abs=1e-5)
    assert stains.angle_deg([1, 0, 0], [0, 1, 0]) == pytest.approx(90.0)


def test_estimate_with_a_reference_comes_in_the_references_order():
    """Given reference vectors, the estimate is paired with them by angle: listed DAB first, the
    pixels of an H-DAB mixture come back DAB first; without, haematoxylin (bluest) first."""
    rng = np.random.default_rng(1)
    m = stains.orthogonal_stain_matrix(stains.RUIFROK_H, stains.RUIFROK_DAB)
    od = rng.uniform(0, 1, (5000, 2)) @ m[:2]
    plain, _ = stains.estimate_two_stains(od)
    paired, _ = stains.estimate_two_stains(od, reference=m[[1, 0]])
    assert stains.angle_deg(plain[0], m[0]) < 3.0 and stains.angle_deg(plain[1], m[1]) < 3.0
    np.testing.assert_array_equal(paired, plain[[1, 0]])
    ortho = stains.orthogonal_stain_matrix(stains.RUIFROK_H, stains.RUIFROK_DAB)
    assert abs(ortho[2] @ ortho[0]) < 1e-12 and abs(ortho[2] @ ortho[1]) < 1e-12


def test_rehue_moves_each_stain_onto_the_target_vector_and_back():
    """A pixel of pure haematoxylin restains along the target haematoxylin with the same amount;
    restaining there and back returns the image within 0.03 OD."""
    src = (stains.RUIFROK_H, stains.RUIFROK_E)
    dst = ((0.5626, 0.7201, 0.4062), (0.2159, 0.8012, 0.5581))
    h_only = stains.rgb_from_od(0.6 * stains.normalize_rows(np.asarray([src[0]], float)).reshape(1, 1, 3))
    od = stains.od_from_rgb(stains.rehue(h_only, src, dst)).reshape(3).astype(np.float64)
    want = 0.6 * np.asarray(dst[0]) / np.linalg.norm(dst[0])
    assert np.abs(od - want).max() < 0.01  # within the 8-bit rounding
    assert stains.angle_deg(od, np.asarray(src[0])) > 5.0
    rng = np.random.default_rng(0)
    conc = rng.uniform(0, 0.8, (64, 64, 2))
    rgb = stains.rgb_from_od(conc @ stains.stain_matrix(*src)[:2])
    there = stains.rehue(rgb, src, dst)
    back = stains.rehue(there, dst, src)
    lit = (there >= 20).all(axis=-1) & (rgb >= 20).all(axis=-1)  # 8-bit rounding of dark channels aside
    assert lit.mean() > 0.8
    assert np.abs(stains.od_from_rgb(back) - stains.od_from_rgb(rgb))[lit].max() < 0.03
    assert np.array_equal(stains.rehue(rgb, src, src), rgb)


@pytest.mark.parametrize("bad", ["1,2:3,4,5", "a,b,c:1,2,3", "1,2,3", "1,2,3:4,5,6:7,8,9"])
def test_parse_stain_pair_reads_two_triples_and_refuses_the_rest(bad):
    assert stains.parse_stain_pair("0.65,0.70,0.29:0.07,0.99,0.11") == ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11))
    with pytest.raises(ValueError, match="two stain vectors"):
        stains.parse_stain_pair(bad)
