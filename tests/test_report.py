"""HTML case report: self-contained, local grades from the analyzer's rules, renders in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from marrowseg.grade import case_document
from marrowseg.report.html import case_report_html, write_case_report
from marrowseg.report.slides import load_batch, local_grade_grid
from marrowseg.report.views import fields, heatmap, overview
from tests._grade_batch import batch_dir


@pytest.fixture(scope="module")
def slides():
    return {s.stain: s for s in load_batch(batch_dir())}


def test_local_grade_grid_reproduces_slide_local_grade_shares(slides):
    """Window grades recomputed from windows.csv give the analyzer's local_grade_frac exactly."""
    ret = slides["reticulin"]
    grid = local_grade_grid(ret)
    assert grid is not None and grid["source"] == "windows"
    total = sum(grid["area_by_grade"].values())
    got = {f"MF-{g}": a / total for g, a in grid["area_by_grade"].items()}
    want = ret.readouts["local_grade_frac"]
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9)


def test_local_grade_grid_falls_back_to_tiles(slides, tmp_path):
    """Without windows.csv the tile cores of tiles.csv are graded instead (and said so)."""
    src = slides["reticulin"].out_dir
    dst = tmp_path / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("windows.csv", "labels.zarr"))
    from marrowseg.report.slides import load_slide_output

    grid = local_grade_grid(load_slide_output(dst))
    assert grid["source"] == "tiles" and (grid["grades"] >= 0).any()


def test_figures_of_each_stain(slides):
    """Overview for every stain; full-resolution fields with cells or fibres; a heatmap for reticulin only."""
    for stain, s in slides.items():
        assert overview(s) is not None
        figs = fields(s, n=2, field_um=100)
        assert len(figs) in (1, 2)
        assert figs[0].rgb.shape[:2] == (200, 200)  # 100 µm at 0.5 µm/px: full resolution
        assert (heatmap(s) is not None) == (stain == "reticulin")


def test_report_is_self_contained(slides):
    """One HTML document; every image inline as a base64 PNG; no external URL."""
    doc = case_document(list(slides.values()), case={"patient": "P001"})
    page = case_report_html(doc, list(slides.values()), n_fields=1)
    assert page.startswith("<!DOCTYPE html>")
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) >= 7 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(href|src)="(https?:|//|file:)', page)
    for text in ("Cellularity", "Reticulin fibrosis MF-", "config_hash", "Local fibrosis grades"):
        assert text in page


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_report_renders_in_headless_chromium(slides, tmp_path):
    """The page renders with its images: screenshot not blank, and the overview's own colours are on it."""
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed (CI installs it: apt-get install chromium)")
    doc = case_document([slides["he"]], case={"patient": "P001"})
    html_path = write_case_report(tmp_path / "report.html", doc, [slides["he"]], n_fields=1)
    shot = tmp_path / "shot.png"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           "--hide-scrollbars", html_path.as_uri()]
    subprocess.run(cmd, check=False, capture_output=True, timeout=120)
    assert shot.exists(), "chromium wrote no screenshot"
    img = cv2.cvtColor(cv2.imread(str(shot)), cv2.COLOR_BGR2RGB)
    assert img.std() > 20
    # the overview is shown at its own size: its most common non-white colours must be on screen
    ov = overview(slides["he"]).rgb.reshape(-1, 3)
    ov = ov[ov.min(1) < 230]
    colours, counts = np.unique(ov, axis=0, return_counts=True)
    top = colours[np.argsort(-counts)[:20]]
    screen = {tuple(c) for c in np.unique(img.reshape(-1, 3), axis=0)}
    found = sum(tuple(c) in screen for c in top)
    assert found >= 15, f"only {found} of the overview's 20 main colours on the screenshot"


def test_qa_flags_a_borderline_reticulin_grade(tmp_path):
    """The QA notebook's flag follows the analyzer's borderline readout, and only it."""
    from marrowseg.report.qa import slide_flags
    from marrowseg.report.slides import SlideOutput

    ro = {"mf_grade": 0, "fibrosis_index": 1.45, "mf_grade_borderline_with": 2,
          "local_grade_frac": {"MF-0": 0.63, "MF-1": 0.09, "MF-2": 0.28, "MF-3": 0.0}}
    metrics = {"stain": "reticulin", "readouts": ro, "areas_um2": {"haematopoietic": 2e6}}
    flags = slide_flags(SlideOutput("s", tmp_path, metrics))
    assert any("borderline between MF-0 and MF-2" in f for f in flags), flags
    ro["mf_grade_borderline_with"] = None
    assert not any("borderline" in f for f in slide_flags(SlideOutput("s", tmp_path, metrics)))


def test_qa_flags_unreadable_tiles_with_their_area(tmp_path):
    """A slide not read whole is flagged for review; a whole one is not."""
    from marrowseg.report.qa import slide_flags
    from marrowseg.report.slides import SlideOutput

    metrics = {"stain": "he", "readouts": {"cellularity_pct": 50.0}, "areas_um2": {"haematopoietic": 2e6},
               "tiles": {"n": 9, "missing": 1, "missing_area_um2": 655_360.0}}
    assert "unreadable tiles (1 of 9, 0.66 mm² left out)" in slide_flags(SlideOutput("s", tmp_path, metrics))
    metrics["tiles"]["missing"] = 0
    assert not any("unreadable" in f for f in slide_flags(SlideOutput("s", tmp_path, metrics)))


def test_qa_flags_an_out_of_focus_slide(tmp_path):
    from marrowseg.report.qa import slide_flags
    from marrowseg.report.slides import SlideOutput

    metrics = {"stain": "he", "readouts": {}, "areas_um2": {"haematopoietic": 2e6},
               "tiles": {"focus_min": 0.15, "focus_judged_tiles": 4, "out_of_focus_tiles": 2,
                         "out_of_focus_frac": 0.5, "out_of_focus_area_um2": 1e6}}
    assert "out of focus (50% of the tissue, 2 of 4 tiles)" in slide_flags(SlideOutput("s", tmp_path, metrics))
    metrics["tiles"]["out_of_focus_frac"] = 0.0
    assert not any("out of focus" in f for f in slide_flags(SlideOutput("s", tmp_path, metrics)))


def test_qa_flags_a_scan_coarser_than_validated(tmp_path):
    from marrowseg.report.qa import slide_flags
    from marrowseg.report.slides import SlideOutput

    metrics = {"stain": "he", "readouts": {}, "areas_um2": {"haematopoietic": 2e6},
               "provenance": {"tissue": {"resolution_check": {"scan_mpp": 4.0, "max_scan_mpp": 2.0, "too_coarse": True}}}}
    assert "scan coarser than validated (4.00 µm/px, limit 2.00)" in slide_flags(SlideOutput("s", tmp_path, metrics))
    metrics["provenance"]["tissue"]["resolution_check"]["too_coarse"] = False
    assert not any("scan coarser" in f for f in slide_flags(SlideOutput("s", tmp_path, metrics)))


def test_qa_flags_and_the_report_name_a_suspect_pixel_size(tmp_path):
    from marrowseg.report.qa import slide_flags
    from marrowseg.report.slides import SlideOutput
    from marrowseg.report.wording import slide_report_lines

    metrics = {"stain": "he", "readouts": {}, "areas_um2": {"haematopoietic": 2e6}, "slide": {"mpp": 0.5},
               "measurements": {"nuclear_scale": {"cells": 268, "expected_um2": [13.0, 40.0],
                                                  "geomean_area_um2": 42.7, "outside": True}}}
    assert "pixel size? (nuclei 43 µm², marrow 13-40 at 0.5 µm/px)" in slide_flags(SlideOutput("s", tmp_path, metrics))
    assert ("Check the pixel size: the nuclei measure 43 µm² on average, outside the 13-40 µm² of marrow nuclei at "
            "0.5 µm/px; if that pixel size is wrong, so is every area and density above") in slide_report_lines(metrics)
    metrics["measurements"]["nuclear_scale"]["outside"] = False
    assert not any("pixel size" in f for f in slide_flags(SlideOutput("s", tmp_path, metrics)))
    assert not any("pixel size" in line for line in slide_report_lines(metrics))


def test_qa_flags_and_the_report_name_crush_left_out(tmp_path):
    from marrowseg.report.qa import slide_flags
    from marrowseg.report.slides import SlideOutput
    from marrowseg.report.wording import slide_report_lines

    metrics = {"stain": "he", "readouts": {}, "areas_um2": {"haematopoietic": 2e6},
               "measurements": {"crush": {"area_um2": 250_000.0, "share_of_marrow": 0.11}}}
    assert "crush artefact (0.25 mm², 11% of the marrow left out)" in slide_flags(SlideOutput("s", tmp_path, metrics))
    assert ("Left out as crush artefact: 0.25 mm² (11% of the marrow), where the haematoxylin runs in parallel "
            "strands; check it by eye (streaming fibrosis can look the same)") in slide_report_lines(metrics)
    # a speck below the flag's share is left out in silence
    metrics["measurements"]["crush"] = {"area_um2": 20_000.0, "share_of_marrow": 0.01}
    assert not any("crush" in f for f in slide_flags(SlideOutput("s", tmp_path, metrics)))
    assert not any("crush" in line for line in slide_report_lines(metrics))


def test_qa_flags_a_stain_that_looks_like_another(tmp_path):
    from marrowseg.report.qa import slide_flags
    from marrowseg.report.slides import SlideOutput

    metrics = {"stain": "reticulin", "readouts": {}, "areas_um2": {"haematopoietic": 2e6},
               "provenance": {"tissue": {"stain_check": {"looks_like": "he", "confidence": 1.0, "mismatch": True}}}}
    assert "stain looks like he, analysed as reticulin (confidence 1.00)" in slide_flags(SlideOutput("s", tmp_path, metrics))
