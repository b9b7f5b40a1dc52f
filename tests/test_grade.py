"""``marrowseg grade``: report wording, stain resolution, cases.csv grouping and the CLI contract."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from marrowseg.errors import MarrowsegError
from marrowseg.grade import (
    CASES_COLUMNS,
    case_document,
    case_text,
    recognise_stain,
    resolve_stains,
    slide_report_lines,
    write_cases_csv,
)
from marrowseg.report.slides import load_batch
from tests._grade_batch import batch_dir


@pytest.fixture(scope="module")
def out():
    return batch_dir()


def test_report_lines_use_pathology_wording_with_reference(out):
    """Each stain gives its headline line with figure and reference."""
    lines = {s.stain: slide_report_lines(s.metrics) for s in load_batch(out)}
    assert lines["he"][0].startswith("Cellularity ")
    assert "age-adjusted reference 30-75% for 45 years, Wong et al. 2023" in lines["he"][0]
    assert lines["he"][0].endswith(("hypocellular", "normocellular", "hypercellular"))
    assert lines["ecad"][0].startswith("E-cadherin+ erythroid precursors ")
    assert "left-shift ratio" in lines["ecad"][0] and "95% CI" in lines["ecad"][0]
    ret = lines["reticulin"][0]
    assert ret.startswith("Reticulin fibrosis MF-") and "fibre length density" in ret
    assert "per 10,000 µm²" in ret and "intersections per mm²" in ret and "local grades: MF-0 " in ret


def test_borderline_reticulin_grade_is_worded_with_both_grades():
    """A deciding share near the 30 % rule reads as borderline between the two grades; otherwise nothing."""
    cfg = {"provenance": {"config": {"reticulin": {"grade_rule_frac": 0.3, "grade_borderline_margin": 0.05}}}}
    ro = {"mf_grade": 0, "grade_rule": "eumnet_30pct", "local_grade_frac": {"MF-0": 0.63, "MF-2": 0.28},
          "mf_grade_borderline_with": 2}
    line = slide_report_lines({"stain": "reticulin", "readouts": ro, **cfg})[0]
    assert line.startswith("Reticulin fibrosis MF-0 ")
    assert "borderline between MF-0 and MF-2: the deciding share lies within 5 points of the rule's 30%" in line
    ro["mf_grade_borderline_with"] = None
    assert "borderline" not in slide_report_lines({"stain": "reticulin", "readouts": ro, **cfg})[0]


def test_megakaryocyte_density_is_worded_as_a_lower_bound():
    """Megakaryocytes with separate nuclear lobes are missed on real H&E: the report says so."""
    m = {"stain": "he", "readouts": {"cellularity_pct": 50.0, "megakaryocytes_per_mm2": 0.0}}
    second = slide_report_lines(m)[1]
    assert "megakaryocytes 0 per mm² (a lower bound: those whose nuclear lobes lie apart are missed)" in second


@pytest.mark.parametrize("flag", [True, False])
def test_clusters_are_named_with_where_to_find_them_only_when_flagged(flag):
    m = {"stain": "ecad", "readouts": {"ecad_pos_per_100_nucleated": 9.0, "left_shift_ratio": 0.7},
         "interpretation": {"clusters": {"value": 2 if flag else 0, "flag": flag}}}
    text = " ".join(slide_report_lines(m))
    assert ("Clusters of E-cadherin+ precursors: 2" in text and "ecad_cluster in cells.csv" in text) == flag
    assert flag or "Clusters" not in text


def test_unreadable_tiles_are_reported_with_their_area():
    """A slide not read whole says so under its figures; a whole one says nothing."""
    m = {"stain": "he", "readouts": {"cellularity_pct": 50.0},
         "tiles": {"n": 12, "missing": 2, "missing_area_um2": 1_310_720.0}}
    lines = slide_report_lines(m)
    assert lines[-1] == ("Not assessed: 2 of 12 tiles could not be read (1.31 mm² left out of every figure; "
                         "tiles.csv gives each one's reason)")
    m["tiles"]["missing"] = 0
    assert not any(line.startswith("Not assessed") for line in slide_report_lines(m))


def test_a_stain_that_looks_like_another_is_named_in_the_report():
    m = {"stain": "he", "readouts": {"cellularity_pct": 50.0},
         "provenance": {"tissue": {"stain_check": {"looks_like": "reticulin", "confidence": 0.93, "mismatch": True}}}}
    assert ("Check the stain: analysed as H&E, but its colours look like Gomori reticulin (confidence 0.93)"
            in slide_report_lines(m))
    m["provenance"]["tissue"]["stain_check"]["mismatch"] = False
    assert not any(line.startswith("Check the stain") for line in slide_report_lines(m))


def test_a_scan_coarser_than_validated_is_named_in_the_report():
    m = {"stain": "ecad", "readouts": {},
         "provenance": {"tissue": {"resolution_check": {"scan_mpp": 1.0, "max_scan_mpp": 0.6, "too_coarse": True}}}}
    assert ("Check the scan: 1.00 µm/px is coarser than the 0.60 µm/px these figures were validated at; "
            "the cell counts and membrane scores may read low") in slide_report_lines(m)
    m["provenance"]["tissue"]["resolution_check"]["too_coarse"] = False
    assert not any(line.startswith("Check the scan") for line in slide_report_lines(m))


def test_an_out_of_focus_slide_is_named_in_the_report():
    m = {"stain": "he", "readouts": {"cellularity_pct": 50.0},
         "tiles": {"focus_min": 0.15, "focus_judged_tiles": 9, "out_of_focus_tiles": 3,
                   "out_of_focus_frac": 0.31, "out_of_focus_area_um2": 3_145_728.0}}
    assert ("Check the focus: 31% of the tissue looked at is out of focus (3 of 9 tiles, 3.15 mm²); "
            "the cell counts there may read low") in slide_report_lines(m)
    m["tiles"]["out_of_focus_frac"] = 0.05
    assert not any(line.startswith("Check the focus") for line in slide_report_lines(m))


def test_late_erythroid_share_says_it_rests_on_nuclear_morphology():
    """A small lymphocyte's nucleus passes the late-normoblast rules: the report says so."""
    m = {"stain": "he", "readouts": {"cellularity_pct": 50.0, "late_erythroid_per_100": 21.04, "nucleated_cells": 1234}}
    second = slide_report_lines(m)[1]
    assert ("late erythroid precursors 21.0 per 100 nucleated cells (by nuclear morphology alone, which small "
            "lymphocytes share; 1,234 nucleated cells counted)") in second


def test_cellularity_line_without_age_says_so():
    """No age: the cellularity is reported without a reference, and says why."""
    m = {"stain": "he", "age": None, "readouts": {"cellularity_pct": 41.6}}
    assert slide_report_lines(m)[0] == "Cellularity 42% (no age given, so no age-adjusted reference)"


def test_case_document_orders_stains_and_names_missing(out):
    """Slides come in H&E, E-cadherin, reticulin order; a missing stain is listed."""
    slides = [s for s in load_batch(out) if s.stain != "ecad"]
    doc = case_document(slides, out_dir=out)
    assert [d["stain"] for d in doc["slides"]] == ["he", "reticulin"]
    assert doc["missing_stains"] == ["ecad"]
    assert "Not assessed (no slide): E-cadherin" in case_text(doc)
    json.dumps(doc)  # serialisable as is


@pytest.mark.parametrize("given, n, expected", [
    (None, 2, ["auto", "auto"]), (["he"], 3, ["he"] * 3), (["HE", "ecad"], 2, ["he", "ecad"]),
])
def test_resolve_stains(given, n, expected):
    """--stain: none (auto), once for all, or once per slide."""
    assert resolve_stains(n, given) == expected


@pytest.mark.parametrize("given, match", [(["he", "ecad"], "2 times for 3 slides"), (["pas"], "expected auto")])
def test_resolve_stains_rejects(given, match):
    """Wrong count or unknown stain is a one-line MarrowsegError."""
    with pytest.raises(MarrowsegError, match=match):
        resolve_stains(3, given)


def test_recognise_stain_from_colour(out):
    """--stain auto recognises each phantom's stain and says how."""
    for s in load_batch(out):
        stain, how = recognise_stain(s.slide_path)
        assert stain == s.stain and how.startswith("auto: ")


def test_write_cases_csv_groups_by_patient_and_date(out):
    """One row per biopsy from summary.csv + metrics.json; the failed slide is its own case."""
    path = write_cases_csv(out)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CASES_COLUMNS
    p1 = next(r for r in rows if r["patient"] == "P001")
    assert p1["biopsy_date"] == "2024-03-01" and p1["n_slides"] == "3"
    assert p1["he_slide"] == "p1_he" and p1["ecad_slide"] == "p1_ecad" and p1["reticulin_slide"] == "p1_ret"
    assert float(p1["cellularity_pct"]) > 0 and p1["mf_grade"] in "0123" and p1["left_shift_ratio"]
    assert p1["report"].count("|") >= 2
    p2 = next(r for r in rows if r["patient"] == "P002")
    assert p2["failed_slides"].startswith("p2_broken") and p2["he_slide"] == ""


def test_write_cases_csv_accepts_rows_without_summary(out, tmp_path):
    """Rows naming slides by path stem work too; patient comes from metrics.json's manifest."""
    path = write_cases_csv(out, [{"path": "/x/p1_he.tiff"}, {"slide": "p1_ret"}])
    rows = list(csv.DictReader(path.open(newline="")))
    assert len(rows) == 1 and rows[0]["slides"] == "p1_he;p1_ret" and "E-cadherin" in rows[0]["notes"]


def test_cli_grade_json_prints_one_document(out, tmp_path, capsys, monkeypatch):
    """`marrowseg grade --json` prints exactly one JSON document on stdout; analyses kept with --out."""
    from marrowseg import cli

    slide = out.parent / "slides" / "p1_he.tiff"
    monkeypatch.setattr(sys, "argv", ["marrowseg", "grade", str(slide), "--stain", "he", "--age", "70",
                                      "--json", "--out", str(tmp_path / "g")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code in (0, None)
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["slides"][0]["stain"] == "he" and doc["report"][0].startswith("Cellularity ")
    assert "for 70 years" in doc["report"][0]
    assert (tmp_path / "g" / "p1_he" / "metrics.json").exists()


def test_cli_grade_error_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    """A missing slide: exit code 1, one line on stderr, nothing on stdout."""
    from marrowseg import cli

    monkeypatch.setattr(sys, "argv", ["marrowseg", "grade", str(tmp_path / "nope.svs"), "--stain", "he"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().count("\n") == 0 and "nope.svs: no such file" in captured.err



def test_left_shift_ratio_is_worded_with_its_orientation_range_only_when_given():
    """The normal early share is shown beside the ratio, marked as orientation; absent, nothing is made up."""
    ro = {"ecad_pos_per_100_nucleated": 3.0, "left_shift_ratio": 0.31, "left_shift_ratio_ci95": [0.25, 0.38]}
    shift = {"verdict": "left-shifted erythropoiesis", "erythroid_cells": 200,
             "orientation": {"low": 0.05, "high": 0.08}}
    line = slide_report_lines({"stain": "ecad", "readouts": ro, "interpretation": {"left_shift": shift}})[0]
    assert "left-shift ratio 0.31 (95% CI 0.25-0.38) [normal marrow about 0.05-0.08, for orientation only]: " \
           "left-shifted erythropoiesis" in line
    del shift["orientation"]
    assert "orientation" not in slide_report_lines({"stain": "ecad", "readouts": ro,
                                                    "interpretation": {"left_shift": shift}})[0]
