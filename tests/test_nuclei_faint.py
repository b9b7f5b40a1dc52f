"""nuclei.faint_nuclei (the pale-nucleus pass shared by E-cadherin and H&E): its optional limits."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from marrowseg.analyzers import ecad
from marrowseg.analyzers import nuclei as nuc

MPP = 0.5
KW = {"background_um": 6.0, "contrast_od": 0.2, "gap_um": 1.0, "min_radius_um": 1.75, "min_distance_um": 4.0,
      "min_area_um2": 8.0, "max_area_um2": 80.0}


def _scene() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Pale nuclei on pale and on darker ground, a pale elongated strand, and one dense nucleus."""
    h = np.full((200, 300), 0.01, np.float32)
    h[:, 150:] = 0.12                                      # darker cytoplasm / stroma on the right
    yy, xx = np.mgrid[:200, :300]
    want = {"pale_light": np.array([[40.0, 40.0], [40.0, 100.0], [160.0, 40.0]]),
            "pale_dark": np.array([[40.0, 190.0], [40.0, 250.0], [160.0, 250.0]]),
            "strand": np.array([[110.0, 90.0]])}
    for r, c in np.vstack([want["pale_light"], want["pale_dark"]]):
        disc = np.hypot(yy - r, xx - c) <= 3.0 / MPP       # 6 µm across, 28 µm²
        h[disc] += 0.26                                    # stands 0.26 OD out of its ground
    # 4.5 µm x 14 µm ellipse: as deep as a nucleus (min_radius_um) but elongated (eccentricity 0.95)
    r, c = want["strand"][0]
    h[((yy - r) / (2.25 / MPP)) ** 2 + ((xx - c) / (7.0 / MPP)) ** 2 <= 1.0] += 0.26
    dense = np.hypot(yy - 160, xx - 110) <= 3.5 / MPP      # a nucleus the first pass found
    h[dense] = 0.9
    return h, dense, want


def _found(table: dict[str, np.ndarray], points: np.ndarray) -> int:
    got = np.column_stack([table["row"], table["col"]])
    if len(got) == 0:
        return 0
    d = np.hypot(points[:, None, 0] - got[None, :, 0], points[:, None, 1] - got[None, :, 1])
    return int((d.min(axis=1) <= 2.0 / MPP).sum())


def test_background_and_eccentricity_limits_drop_what_they_should_and_nothing_else():
    h, dense, want = _scene()
    mask_od = ndi.gaussian_filter(h, 0.5 / MPP).astype(np.float32)
    peak_od = ndi.gaussian_filter(h, 1.5 / MPP).astype(np.float32)
    n_all = sum(len(v) for v in want.values())

    _, t = nuc.faint_nuclei(mask_od, peak_od, h, MPP, dense, **KW)
    assert len(t["label"]) == n_all                        # no limit: every pale body, the dense one excluded
    assert all(_found(t, v) == len(v) for v in want.values())

    # background limit: the nuclei on the darker ground (opening ~0.12 OD) go, the others stay
    _, t = nuc.faint_nuclei(mask_od, peak_od, h, MPP, dense, max_background_od=0.03, **KW)
    assert _found(t, want["pale_dark"]) == 0
    assert _found(t, want["pale_light"]) == len(want["pale_light"]) and _found(t, want["strand"]) == 1
    assert len(t["label"]) == len(want["pale_light"]) + 1
    # a limit above the darker ground changes nothing
    _, t_hi = nuc.faint_nuclei(mask_od, peak_od, h, MPP, dense, max_background_od=0.2, **KW)
    assert len(t_hi["label"]) == n_all

    # eccentricity limit: the strand goes, the round nuclei stay
    _, t = nuc.faint_nuclei(mask_od, peak_od, h, MPP, dense, max_eccentricity=0.7, **KW)
    assert _found(t, want["strand"]) == 0
    assert len(t["label"]) == n_all - 1
    assert (t["eccentricity"] <= 0.7).all()


def test_limits_off_give_the_ecad_pass_unchanged():
    """The E-cadherin analyzer uses the same function; without the new limits its output is the same."""
    assert ecad.analyzer.faint_nuclei is nuc.faint_nuclei
    h, dense, _ = _scene()
    mask_od = ndi.gaussian_filter(h, 0.5 / MPP).astype(np.float32)
    peak_od = ndi.gaussian_filter(h, 1.5 / MPP).astype(np.float32)
    a_lab, a = nuc.faint_nuclei(mask_od, peak_od, h, MPP, dense, **KW)
    b_lab, b = nuc.faint_nuclei(mask_od, peak_od, h, MPP, dense, max_background_od=None, max_eccentricity=None, **KW)
    np.testing.assert_array_equal(a_lab, b_lab)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
