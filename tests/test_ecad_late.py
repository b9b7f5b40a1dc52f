"""Late-erythroid calls of the E-cadherin analyzer that look at neighbours and small or pale caps."""

from __future__ import annotations

import numpy as np
import pytest

from marrowseg.analyzers.ecad import ECadAnalyzer
from marrowseg.config import load_config

MPP = 0.5
CAPS = "ecad.late_caps={min_area_um2: 6, min_spacing_um: 5.5, max_od_cv: 0.15, max_eccentricity: 0.85}"
CROWDED = "ecad.late_crowded={spacing_um: 5, min_od: 0.5, max_eccentricity: 0.7}"
NO_PALE = "ecad.late_rim.pale_od=null"
FAINT = ("ecad.late_faint={min_area_um2: 10, max_area_um2: 24, max_eccentricity: 0.7, min_solidity: 0.9, "
         "max_od_cv: 0.35, min_od: 0.28}")


def _analyzer(*sets: str) -> ECadAnalyzer:
    return ECadAnalyzer(load_config("ecad", overrides=["ecad.late_caps=null", "ecad.late_crowded=null", *sets]).ecad)


def _table(rows_um, cols_um, **cols) -> dict[str, np.ndarray]:
    n = len(rows_um)
    out = {"row": np.asarray(rows_um, np.float64) / MPP, "col": np.asarray(cols_um, np.float64) / MPP,
           "label": np.arange(1, n + 1, dtype=np.int32)}
    defaults = {"area_um2": 9.0, "eccentricity": 0.3, "solidity": 1.0, "h_od_mean": 0.55, "h_od_cv": 0.05}
    for key, v in defaults.items():
        out[key] = np.asarray(cols.get(key, [v] * n), np.float64)
    return out


def test_small_round_even_isolated_caps_are_late():
    an = _analyzer(CAPS)
    # 0: the cap; 1: the same 3.5 µm from a neighbour (2); 3: elongated; 4: uneven; 5: too small;
    # 6: too pale; 7: at the shared rules' minimum area (their business, stays other)
    rows = [0, 100, 100, 200, 300, 400, 500, 600]
    cols = [0, 0, 3.5, 0, 0, 0, 0, 0]
    t = _table(rows, cols, eccentricity=[0.3, 0.3, 0.3, 0.95, 0.3, 0.3, 0.3, 0.3],
               h_od_cv=[0.05, 0.05, 0.05, 0.05, 0.3, 0.05, 0.05, 0.05],
               area_um2=[9, 9, 9, 9, 9, 4, 9, 13], h_od_mean=[0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.3, 0.55])
    classes = np.array(["other"] * len(rows), dtype=object)
    out = an._late_caps(t, classes, MPP)
    assert list(out) == ["late_erythroid"] + ["other"] * 7
    assert list(classes) == ["other"] * len(rows)  # the input is not modified
    # positive cells and megakaryocytes keep their class
    fixed = np.array(["ecad_pos", "megakaryocyte"] + ["other"] * 6, dtype=object)
    assert list(an._late_caps(t, fixed, MPP)[:2]) == ["ecad_pos", "megakaryocyte"]
    # off: nothing changes
    assert list(_analyzer()._late_caps(t, classes, MPP)) == ["other"] * len(rows)


def test_crowded_late_calls_must_be_dense_and_round():
    an = _analyzer(CROWDED)
    # pairs 4 µm apart: (pale, dense) / (elongated, round); 4: dense and round, alone
    rows = [0, 0, 100, 100, 200]
    cols = [0, 4, 0, 4, 0]
    t = _table(rows, cols, area_um2=[20] * 5, h_od_mean=[0.45, 0.7, 0.7, 0.7, 0.45],
               eccentricity=[0.3, 0.3, 0.85, 0.3, 0.85])
    classes = np.array(["late_erythroid"] * 5, dtype=object)
    out = an._late_caps(t, classes, MPP)
    assert list(out) == ["other", "late_erythroid", "other", "late_erythroid", "late_erythroid"]


def test_classify_cells_calls_caps_late_for_the_membrane_compartment_only():
    rows, cols = [0, 100], [0, 0]
    t = _table(rows, cols, area_um2=[9, 20], h_od_mean=[0.55, 0.7], eccentricity=[0.3, 0.3])
    score = np.array([0.0, 0.0])
    _, classes = _analyzer(CAPS).classify_cells(t, score)
    assert list(classes) == ["late_erythroid", "late_erythroid"]
    _, classes = _analyzer(CAPS, "ecad.positivity_compartment=nucleus").classify_cells(t, score)
    assert list(classes) == ["other", "late_erythroid"]
    # a positive cap stays positive
    positive, classes = _analyzer(CAPS).classify_cells(t, np.array([1.0, 0.0]))
    assert list(classes) == ["ecad_pos", "late_erythroid"] and list(positive) == [True, False]


def _two_nuclei():
    """Two 5-px nuclei of 14 and 32 µm² (table), 60 px apart, and their 5-9 px rims (blank: fill them)."""
    shape = (40, 120)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    rings = np.zeros(shape, bool)
    for i, c in enumerate((30, 90), 1):
        d = np.hypot(yy - 20, xx - c)
        labels[d <= 5] = i
        rings |= (d > 5) & (d <= 9)
    table = {"label": np.array([1, 2], np.int32), "area_um2": np.array([14.0, 32.0]),
             "h_od_mean": np.array([0.8, 0.8])}
    return labels, np.zeros(shape, np.float32), table, xx, rings


def test_rim_limit_falls_with_nuclear_area():
    """late_rim.od_per_um2: the same rim density keeps a small late call and drops a large one."""
    labels, h, table, xx, rings = _two_nuclei()
    h[rings] = 0.10  # the same rim round both, under late_rim.max_od (0.11)
    classes = np.array(["late_erythroid"] * 2, dtype=object)
    d = {"h_od": h, "dab_od": np.zeros(h.shape, np.float32)}
    # a cap called late by _late_caps (under the minimum area) is left to its own tests
    cap = dict(table, area_um2=np.array([9.0, 32.0]))
    out = _analyzer("ecad.late_rim.od_per_um2=0", "ecad.late_rim.max_od=0.05",
                    NO_PALE)._late_rules(d, labels, cap, classes, MPP)
    assert list(out) == ["late_erythroid", "other"]
    d = {"h_od": h, "dab_od": np.zeros(h.shape, np.float32)}
    flat = _analyzer("ecad.late_rim.od_per_um2=0", NO_PALE)._late_rules(d, labels, table, classes, MPP)
    assert list(flat) == ["late_erythroid", "late_erythroid"]
    # 0.11 - 0.001 * (area - 13): 0.109 at 14 µm², 0.091 at 32 µm²
    sloped = _analyzer("ecad.late_rim.od_per_um2=0.001", NO_PALE)._late_rules(d, labels, table, classes, MPP)
    assert list(sloped) == ["late_erythroid", "other"]


def test_pale_share_limit_rises_with_nuclear_area():
    """late_rim.pale_share_per_um2: the same part-pale rim keeps a small late call and drops a large one."""
    from marrowseg.analyzers.ecad.membrane import _rim_stats, rim_density

    labels, h, table, xx, rings = _two_nuclei()
    h[rings] = 0.09  # dense enough to be no cytoplasm, pale enough to pass the rim quantile (0.11)
    for c in (30, 90):
        h[rings & (xx > c + 6) & (xx < c + 20)] = 0.02  # a pale cap of cytoplasm on one side (~10 % of the band)
    d = {"h_od": h, "dab_od": np.zeros(h.shape, np.float32)}
    rim, pale = _rim_stats(labels, table, h, MPP, inner_um=0.5, outer_um=1.5, quantile=0.25, pale_od=0.08)
    assert np.allclose(rim, rim_density(labels, table, h, MPP, inner_um=0.5, outer_um=1.5, quantile=0.25))
    # the hand count: share of each nucleus' band pixels below 0.08 OD
    from marrowseg.analyzers.distance import nearest_label_band

    _, rr, cc, owner = nearest_label_band(labels, 0.5 / MPP, 1.5 / MPP)
    for i in (1, 2):
        assert pale[i - 1] == pytest.approx(np.mean(h[rr[owner == i], cc[owner == i]] < 0.08))
    # needs 0.0075 * (14 - 13) and 0.0075 * (32 - 13) = 0.14: the share lies between
    assert 0.0075 < pale[0] < 0.14 and 0.0075 < pale[1] < 0.14
    classes = np.array(["late_erythroid"] * 2, dtype=object)
    flat = "ecad.late_rim.od_per_um2=0"
    out = _analyzer(flat, "ecad.late_rim.pale_od=0.08", "ecad.late_rim.pale_share_per_um2=0.0075")._late_rules(
        d, labels, table, classes, MPP)
    assert list(out) == ["late_erythroid", "other"]
    assert list(_analyzer(flat, NO_PALE)._late_rules(d, labels, table, classes, MPP)) == ["late_erythroid"] * 2
    # an all-pale rim keeps both
    h2 = np.where((labels == 0) & (h > 0), 0.02, h).astype(np.float32)
    out = _analyzer(flat, "ecad.late_rim.pale_od=0.08", "ecad.late_rim.pale_share_per_um2=0.0075")._late_rules(
        {"h_od": h2, "dab_od": d["dab_od"]}, labels, table, classes, MPP)
    assert list(out) == ["late_erythroid"] * 2


def test_round_solid_even_faint_nuclei_are_late():
    an = _analyzer(FAINT)
    # 0: a faint late cap; 1: too small; 2: too large; 3: elongated; 4: notched; 5: uneven; 6: too pale
    ft = _table([0] * 7, [0] * 7, area_um2=[16, 8, 30, 16, 16, 16, 16],
                eccentricity=[0.4, 0.4, 0.4, 0.8, 0.4, 0.4, 0.4], solidity=[0.98, 0.98, 0.98, 0.98, 0.8, 0.98, 0.98],
                h_od_cv=[0.2, 0.2, 0.2, 0.2, 0.2, 0.45, 0.2], h_od_mean=[0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.2])
    assert list(an._late_faint(ft)) == ["late_erythroid"] + ["other"] * 6
    assert list(_analyzer("ecad.late_faint=null")._late_faint(ft)) == ["other"] * 7
