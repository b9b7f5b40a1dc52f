"""The output folder contract of ``marrowseg analyze`` (pinned so it cannot drift silently)."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import zarr

from marrowseg.analyzers import available_stains
from marrowseg.analyzers.reticulin import GRADE_RGB
from tests._cli import run_cli

STAINS = available_stains()

#: readout keys each stain must report (the README documents them)
REQUIRED_READOUTS = {
    "he": {"cellularity_pct", "bone_area_frac", "marrow_area_mm2", "nucleated_cells",
           "nucleated_cells_per_mm2", "late_erythroid_per_100"},
    "ecad": {"nucleated_cells", "ecad_pos_per_100_nucleated", "left_shift_ratio", "left_shift_ratio_ci95"},
    "reticulin": {"fibre_length_um_per_1e4um2", "intersections_per_mm2", "mf_grade", "fibrosis_index"},
}


@pytest.fixture(scope="module", params=STAINS)
def analysed(request, tmp_path_factory):
    """A small phantom of each available stain, analysed through the CLI."""
    from marrowseg.synth import write_phantom

    stain = request.param
    root = tmp_path_factory.mktemp(f"contract-{stain}")
    tiff, _ = write_phantom(root, stain, name="ph", seed=1001, size_px=(1200, 1000), mpp=0.5)
    out = root / "out"
    code = run_cli("analyze", str(tiff), "--stain", stain, "--out", str(out), "--age", "45", "-q")
    assert code == 0, f"analyze exited {code}"
    return stain, tiff, out


def test_metrics_json_has_the_documented_structure(analysed):
    stain, tiff, out = analysed
    m = json.loads((out / "metrics.json").read_text())
    assert m["schema"] == "marrowseg.metrics/1"
    assert m["stain"] == stain and m["age"] == 45
    assert {"path", "size_bytes", "sha256", "width", "height", "mpp"} <= set(m["slide"])
    assert (m["slide"]["width"], m["slide"]["height"]) == (1200, 1000)
    assert m["slide"]["mpp"] == pytest.approx(0.5)
    assert REQUIRED_READOUTS[stain] <= set(m["readouts"])
    assert isinstance(m["areas_um2"], dict) and isinstance(m["counts"], dict)
    prov = m["provenance"]
    assert {"config", "config_hash", "versions", "device", "timings_s"} <= set(prov)
    assert prov["versions"]["marrowseg"] and prov["versions"]["torch"]
    assert prov["config"][stain]["mpp"] > 0
    for k in m["units"]:
        assert k in m["readouts"]
    assert "metrics.json" in m["outputs"]


def test_cells_csv_has_slide_coordinates_and_class(analysed):
    stain, tiff, out = analysed
    with open(out / "cells.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    header = list(rows[0].keys()) if rows else (out / "cells.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["x", "y", "x_um", "y_um", "tile", "class"]
    for r in rows[:50]:
        assert 0 <= float(r["x"]) < 1200 and 0 <= float(r["y"]) < 1000
        assert float(r["x_um"]) == pytest.approx((float(r["x"]) + 0.5) * 0.5, abs=1e-3)


def test_labels_png_is_at_the_input_resolution(analysed):
    stain, tiff, out = analysed
    lab = cv2.imread(str(out / "labels.png"), cv2.IMREAD_UNCHANGED)
    assert lab.shape == (1000, 1200)
    assert set(np.unique(lab)) <= {0, 1, 2, 3}
    ov = cv2.imread(str(out / "overlay.png"))
    assert ov.shape == (1000, 1200, 3)
    if stain == "reticulin":
        fib = cv2.imread(str(out / "fibres.png"), cv2.IMREAD_UNCHANGED)
        assert fib.shape == (1000, 1200) and set(np.unique(fib)) <= {0, 255}


def test_labels_zarr_and_tiles_csv(analysed):
    stain, tiff, out = analysed
    g = zarr.open_group(str(out / "labels.zarr"), mode="r")
    assert "labels" in g
    lab = np.asarray(g["labels"])
    mpp_map = g.attrs["marrowseg"]["mpp"]
    assert lab.shape == (round(1000 * 0.5 / mpp_map), round(1200 * 0.5 / mpp_map))
    with open(out / "tiles.csv", newline="") as fh:
        tiles = list(csv.DictReader(fh))
    assert tiles and {"tile", "status", "row_px", "col_px"} <= set(tiles[0])
    assert not list(out.glob(".*tmp*"))


def test_tissue_class_areas_partition_the_analysed_area(analysed):
    stain, tiff, out = analysed
    m = json.loads((out / "metrics.json").read_text())
    classes = ("haematopoietic", "fat", "bone", "excluded")  # a partition; other keys are sub-areas
    assert set(classes) <= set(m["areas_um2"])
    total = sum(m["areas_um2"][k] for k in classes)
    assert total == pytest.approx(1200 * 1000 * 0.25, rel=1e-6)


def test_atomic_open_leaves_the_old_file_when_writing_fails(tmp_path):
    """A crash while writing never leaves half a file nor a temporary one behind."""
    from marrowseg.outputs.atomic import atomic_open

    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as fh:
            fh.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with atomic_open(target, "w") as fh:
        fh.write("new")
    assert target.read_text() == "new"


def test_outputs_get_the_mode_a_plain_open_gives(analysed, tmp_path):
    """Every file ``analyze`` writes is as readable as one made with ``open``: the write-then-rename
    files (metrics.json, tiles.csv, the pictures) came out 0600, which on a shared server hid a
    batch's results from the rest of the lab."""
    _, _, out = analysed
    probe = tmp_path / "probe.txt"
    probe.write_text("")
    want = probe.stat().st_mode & 0o777
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert {"metrics.json", "tiles.csv", "cells.csv"} <= set(modes)
    assert {k: oct(v) for k, v in modes.items() if v != want} == {}


def test_atomic_open_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    from marrowseg.outputs.atomic import atomic_write_text

    target = tmp_path / "summary.csv"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o640


def test_reticulin_writes_the_local_grade_map_its_grade_is_made_of(analysed):
    """local_grades.csv holds the graded grid cells whose areas give ``local_grade_frac``;
    local_grades.png draws the same grades, one block per cell."""
    stain, tiff, out = analysed
    if stain != "reticulin":
        assert not (out / "local_grades.csv").exists()
        return
    m = json.loads((out / "metrics.json").read_text())
    with open(out / "local_grades.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {"win_row", "win_col", "x_um", "y_um", "haem_um2", "local_grade"} <= set(rows[0])
    area = np.zeros(4)
    for r in rows:
        area[int(r["local_grade"])] += float(r["haem_um2"])
    frac = m["readouts"]["local_grade_frac"]
    np.testing.assert_allclose(area / area.sum(), [frac[f"MF-{g}"] for g in range(4)], atol=1e-9)
    cell_um = m["measurements"]["window_um"]
    assert all(float(r["x_um"]) == int(r["win_col"]) * cell_um for r in rows)
    img = cv2.cvtColor(cv2.imread(str(out / "local_grades.png")), cv2.COLOR_BGR2RGB)
    with open(out / "windows.csv", newline="") as fh:
        n_rows = max(int(w["win_row"]) for w in csv.DictReader(fh)) + 1  # the map spans every window
    k = img.shape[0] // n_rows
    assert img.shape[0] == k * n_rows
    colours = dict(enumerate(GRADE_RGB))
    for r in rows[:: max(1, len(rows) // 40)]:
        px = img[int(r["win_row"]) * k + k // 2, int(r["win_col"]) * k + k // 2]
        assert tuple(int(v) for v in px) == colours[int(r["local_grade"])]
    assert {"local_grades.csv", "local_grades.png"} <= set(m["outputs"])
