"""reviews.csv round trip and agreement statistics (weighted kappa, Bland-Altman, largest disagreements)."""

from __future__ import annotations

import numpy as np
import pytest

from marrowseg.errors import MarrowsegError
from marrowseg.review import (
    agreement,
    bland_altman,
    cohen_weighted_kappa,
    import_reviews,
    read_reviews,
    record_review,
    reviews_path,
)


def test_weighted_kappa_matches_hand_computed_table():
    """Quadratic kappa of a small 3-category table equals the value worked out by hand."""
    a = [0, 0, 1, 1, 2, 2]
    b = [0, 1, 1, 1, 2, 1]
    # observed disagreement sum w*p: two off-by-one pairs, w = (1/2)^2 -> 2 * 0.25 / 6
    po = 2 * 0.25 / 6
    pa = np.array([2, 2, 2]) / 6
    pb = np.array([1, 4, 1]) / 6
    w = ((np.arange(3)[:, None] - np.arange(3)[None, :]) / 2.0) ** 2
    pe = float((w * np.outer(pa, pb)).sum())
    assert cohen_weighted_kappa(a, b, n_categories=3) == pytest.approx(1 - po / pe)


def test_weighted_kappa_perfect_and_undefined():
    """Identical grades give 1; a single shared category is undefined (nan); empty is nan."""
    assert cohen_weighted_kappa([0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(1.0)
    assert np.isnan(cohen_weighted_kappa([2, 2], [2, 2]))
    assert np.isnan(cohen_weighted_kappa([], []))
    with pytest.raises(ValueError, match="0..3"):
        cohen_weighted_kappa([4], [0])


def test_bland_altman_bias_and_limits():
    """Bias is the mean difference, limits bias -/+ 1.96 sd (ddof 1)."""
    ba = bland_altman([50, 60, 70], [45, 60, 75])
    d = np.array([5, 0, -5])
    assert ba["bias"] == pytest.approx(0.0)
    assert ba["sd"] == pytest.approx(d.std(ddof=1))
    assert ba["loa_high"] == pytest.approx(1.96 * d.std(ddof=1))
    assert ba["n"] == 3


def test_record_review_round_trip_replaces_same_reviewer(tmp_path):
    """A second review of the same slide by the same reviewer replaces the first."""
    record_review(tmp_path, "s1", "agree", reviewer="AB")
    record_review(tmp_path, "s1", "override", reviewer="AB", mf_grade=1, comment="streaming artefact")
    record_review(tmp_path, "s1", "agree", reviewer="CD")
    rows = read_reviews(tmp_path)
    assert [(r["reviewer"], r["verdict"], r["mf_grade"]) for r in rows] == [("AB", "override", 1), ("CD", "agree", None)]
    assert reviews_path(tmp_path).read_text().splitlines()[0].startswith("slide_id,stain,reviewer,verdict")


@pytest.mark.parametrize("kw, match", [
    ({"verdict": "maybe"}, "verdict"),
    ({"verdict": "override", "mf_grade": 5}, "mf_grade"),
    ({"verdict": "override", "cellularity_pct": 140}, "outside 0-100"),
    ({"verdict": "override", "ecad_pos_per_100_nucleated": -1}, "ecad_pos_per_100_nucleated -1.0 outside 0-100"),
    ({"verdict": "override"}, "needs mf_grade"),
])
def test_record_review_rejects_bad_entries(tmp_path, kw, match):
    """Bad verdicts and values raise MarrowsegError naming the problem; nothing is written."""
    with pytest.raises(MarrowsegError, match=match):
        record_review(tmp_path, "s1", **kw)
    assert not reviews_path(tmp_path).exists()


def test_import_reviews_merges_csv(tmp_path):
    """Reviews from another CSV are merged into reviews.csv."""
    src = tmp_path / "in.csv"
    src.write_text("slide_id,verdict,mf_grade,cellularity_pct,reviewer\ns1,override,2,,X\ns2,agree,,,X\n")
    out = tmp_path / "out"
    out.mkdir()
    import_reviews(out, src)
    assert [r["slide_id"] for r in read_reviews(out)] == ["s1", "s2"]


def test_agreement_pairs_reviews_with_readouts():
    """Agree counts as the measured value; overrides give differences; largest sorted by weight."""
    slides = [
        {"slide_id": "r1", "stain": "reticulin", "readouts": {"mf_grade": 2}},
        {"slide_id": "r2", "stain": "reticulin", "readouts": {"mf_grade": 0}},
        {"slide_id": "h1", "stain": "he", "readouts": {"cellularity_pct": 50.0}},
        {"slide_id": "h2", "stain": "he", "readouts": {"cellularity_pct": 30.0}},
    ]
    reviews = [
        {"slide_id": "r1", "verdict": "override", "mf_grade": 1, "cellularity_pct": None, "reviewer": "A", "comment": ""},
        {"slide_id": "r2", "verdict": "agree", "mf_grade": None, "cellularity_pct": None, "reviewer": "A", "comment": ""},
        {"slide_id": "h1", "verdict": "override", "mf_grade": None, "cellularity_pct": 70.0, "reviewer": "A", "comment": ""},
        {"slide_id": "h2", "verdict": "agree", "mf_grade": None, "cellularity_pct": None, "reviewer": "A", "comment": ""},
        {"slide_id": "gone", "verdict": "agree", "mf_grade": None, "cellularity_pct": None, "reviewer": "A", "comment": ""},
    ]
    a = agreement(slides, reviews)
    assert a["grade"]["n"] == 2 and a["grade"]["exact_frac"] == 0.5
    assert a["cellularity"]["n"] == 2 and a["cellularity"]["bias"] == pytest.approx(-10.0)
    assert [p["slide_id"] for p in a["largest"]] == ["h1", "r1"]  # 20 points = 2 steps > 1 step


def test_ecad_share_is_reviewed_and_agreed_like_cellularity(tmp_path):
    """A pathologist's E-cad+ share per 100 nucleated cells: stored, paired with the readout, Bland-Altman,
    and ranked among the largest disagreements (2 per 100 ~ one MF step); an older reviews.csv without
    the column still reads."""
    record_review(tmp_path, "e1", "override", reviewer="A", stain="ecad", ecad_pos_per_100_nucleated=4.0)
    record_review(tmp_path, "e2", "agree", reviewer="A", stain="ecad")
    rows = read_reviews(tmp_path)
    assert [r["ecad_pos_per_100_nucleated"] for r in rows] == [4.0, None]
    slides = [{"slide_id": "e1", "stain": "ecad", "readouts": {"ecad_pos_per_100_nucleated": 8.0}},
              {"slide_id": "e2", "stain": "ecad", "readouts": {"ecad_pos_per_100_nucleated": 3.0}},
              {"slide_id": "r1", "stain": "reticulin", "readouts": {"mf_grade": 2}}]
    a = agreement(slides, rows + [{"slide_id": "r1", "verdict": "override", "mf_grade": 1, "reviewer": "A"}])
    assert a["ecad_pos"]["n"] == 2 and a["ecad_pos"]["bias"] == pytest.approx(2.0)  # (8 - 4 + 3 - 3) / 2
    assert a["cellularity"]["n"] == 0 and a["grade"]["n"] == 1
    assert [p["slide_id"] for p in a["largest"]] == ["e1", "r1"]  # 4 per 100 = 2 steps > 1 MF step
    old = tmp_path / "old.csv"
    old.write_text("slide_id,stain,reviewer,verdict,mf_grade,cellularity_pct,comment,reviewed_at\ns9,he,B,agree,,,,\n")
    assert read_reviews(old)[0]["ecad_pos_per_100_nucleated"] is None
