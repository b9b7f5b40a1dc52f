"""``marrowseg batch``: discovery, ids, manifest, failures, resume, locks, Dask equality, kill-and-resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from marrowseg.analyzers import available_stains
from marrowseg.batch import run_batch
from marrowseg.batch_plan import find_slides, load_stain_rules, plan_jobs, slide_ids
from marrowseg.batch_slide import BatchSettings, process_slide, slide_lock
from marrowseg.errors import ConfigError
from tests._cli import run_cli

STAINS = [s for s in ("he", "ecad") if s in available_stains()]
#: decode in-process on the CPU (2-core CI); 768 px phantoms keep each slide to seconds
SETS = ["engine.workers=0", "engine.device=cpu"]
SET_ARGS = [a for s in SETS for a in ("--set", s)]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Phantoms of the available stains, a copy in a sub-folder with an awkward name, a truncated
    TIFF, a text file named .svs, a notes.txt, a blank slide, and a manifest."""
    from marrowseg.synth import write_phantom

    if "he" not in STAINS:
        pytest.skip("no H&E analyzer in this installation")
    root = tmp_path_factory.mktemp("cohort")
    src = root / "in"
    for stain in STAINS:
        write_phantom(src, stain, name=f"case1_{stain}", seed=11, size_px=(768, 768), mpp=0.5)
    (src / "sub dir").mkdir()
    shutil.copy(src / "case1_he.tiff", src / "sub dir" / "copy #2.tif")
    data = (src / "case1_he.tiff").read_bytes()
    (src / "broken_he.tiff").write_bytes(data[: len(data) // 3])
    (src / "fake.svs").write_text("not a slide\n")
    (src / "notes.txt").write_text("lab notes\n")
    import tifffile

    tifffile.imwrite(src / "blank.tiff", np.full((512, 512, 3), 246, np.uint8),
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "stain", "age", "patient", "biopsy_date", "site"])
        w.writerow(["case1_he.tiff", "H&E", "45", "P001", "2024-03-01", "iliac crest"])
        w.writerow(["missing.svs", "he", "", "P009", "", ""])
    return root


@pytest.fixture(scope="module")
def serial(cohort) -> Path:
    """The cohort through ``marrowseg batch`` serially (the reference run)."""
    out = cohort / "serial"
    code = run_cli("batch", str(cohort / "in"), str(out), "--manifest", str(cohort / "manifest.csv"), "-q", *SET_ARGS)
    assert code == 3
    return out


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="") as fh:
        return {r["slide"]: r for r in csv.DictReader(fh)}


def _readouts(out: Path) -> dict[str, dict]:
    res = {}
    for d in sorted(out.iterdir()):
        if (d / "metrics.json").is_file():
            res[d.name] = json.loads((d / "metrics.json").read_text())["readouts"]
    return res


def test_summary_says_when_a_slide_was_not_read_whole_or_looks_like_another_stain(serial, tmp_path):
    """summary.csv carries tiles_missing, stain_looks_like and stain_hue_deg beside the readouts."""
    from marrowseg.batch_plan import SlideJob
    from marrowseg.batch_slide import _row_from_metrics

    ok = [r for r in _summary(serial).values() if r["status"] == "ok"]
    assert ok and all(r["tiles_missing"] == "0" and r["stain_looks_like"] == "" for r in ok)
    assert all(float(r["out_of_focus_frac"]) == 0.0 for r in ok)  # the sharp phantoms
    # nothing crushed; reticulin does not look for crush
    assert all(float(r["crush_share"]) == 0.0 if r["stain"] in ("he", "ecad") else r["crush_share"] == "" for r in ok)
    # the H&E phantoms are drawn with Macenko's reference eosin, ~12.5 degrees from the development stain; other stains: none
    assert all(10 < float(r["stain_hue_deg"]) < 15 if r["stain"] == "he" else r["stain_hue_deg"] == "" for r in ok)
    doc = {"batch": {"stain": "he", "stain_source": "cli", "stain_confidence": 1.0, "config_hash": "x"},
           "slide": {"width": 10, "height": 10, "mpp": 0.5}, "readouts": {},
           "tiles": {"missing": 2, "out_of_focus_frac": 0.25},
           "measurements": {"crush": {"area_um2": 5e4, "share_of_marrow": 0.08}},
           "provenance": {"tissue": {"stain_check": {"looks_like": "reticulin", "confidence": 0.9, "mismatch": True}},
                          "prepare": {"stain_hue_deg": {"h": 3.5, "e": 11.25}}}}
    row = _row_from_metrics(SlideJob(tmp_path / "s.tif", "s.tif", "s", "he", "cli"), doc, ran=True)
    assert row["tiles_missing"] == 2 and row["stain_looks_like"] == "reticulin" and row["out_of_focus_frac"] == 0.25
    assert row["stain_hue_deg"] == 11.25 and row["crush_share"] == 0.08


# ----------------------------------------------------------------------------- plan
WEIRD = ["a.svs", "../up.svs", "sub/../x.tif", "con.tiff", "a b/c d.png", ".hidden.tif", "-dash.tif",
         "x" * 300 + ".svs", "ümlaut é.jpg", "summary.csv.png", "slides.tiff", "A.svs", "a.tiff", "a/b.svs",
         "a__b.svs", "new\nline.tif", "semi;colon$(rm).ndpi"]


def test_slide_ids_are_safe_and_unique_for_weird_names():
    """Ids never hold separators or leading dots, stay short, and differ case-insensitively."""
    ids = slide_ids(WEIRD)
    assert len({v.lower() for v in ids.values()}) == len(WEIRD)
    for rel, sid in ids.items():
        assert "/" not in sid and "\\" not in sid and not sid.startswith((".", "-")), (rel, sid)
        assert sid not in ("", ".", "..") and len(sid) <= 120
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in sid), sid
    assert ids["a.svs"] != ids["a.tiff"]  # same stem: both hashed
    assert ids["summary.csv.png"] != "summary.csv" and ids["slides.tiff"] != "slides"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=40).filter(lambda s: s.strip("/") and "\x00" not in s),
                min_size=1, max_size=8, unique=True))
def test_slide_ids_never_escape_out_dir(rels):
    """Any relative names give ids that resolve to distinct direct children of OUT_DIR."""
    out = Path("/tmp/out-root")
    ids = slide_ids(rels)
    assert len({v.lower() for v in ids.values()}) == len(rels)
    for sid in ids.values():
        assert (out / sid).resolve().parent == out


def test_plain_names_keep_their_stem():
    """A simple file name is its own id (the demo relies on it)."""
    assert slide_ids(["demo_he.tiff", "BM_1.svs"]) == {"demo_he.tiff": "demo_he", "BM_1.svs": "BM_1"}


def test_find_slides_skips_text_truth_and_our_outputs(tmp_path):
    """Only slide suffixes count; truth files, hidden files and output folders are skipped."""
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "p.tiff").write_bytes(b"x")
    (tmp_path / "p.grade.tiff").write_bytes(b"x")
    (tmp_path / "p.truth.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.tif").write_bytes(b"x")
    (tmp_path / "old" / "s1").mkdir(parents=True)
    (tmp_path / "old" / "s1" / "metrics.json").write_text("{}")
    (tmp_path / "old" / "s1" / "overlay.png").write_bytes(b"x")
    (tmp_path / "m.zarr").mkdir()
    (tmp_path / "m.zarr" / "x.png").write_bytes(b"x")
    found = [p.name for p in find_slides(tmp_path, exclude=load_stain_rules().exclude)]
    assert found == ["a.svs", "p.tiff"]
    assert [p.name for p in find_slides(tmp_path, pattern="*.svs")] == ["a.svs"]


@pytest.mark.parametrize(("rel", "stain"), [
    ("BM_GRAZ_HE_0001_01_000.png", "he"), ("case 7 H&E.svs", "he"), ("x-ecad.ndpi", "ecad"),
    ("p1_E-cadherin.svs", "ecad"), ("gomori_3.tif", "reticulin"), ("RETIC/slide4.svs", "reticulin"),
    ("heart.svs", None), ("the_chest.svs", None), ("he_vs_ecad.svs", None),
])
def test_filename_rules(rel, stain):
    """Rules match whole name parts, not substrings, and two stains in one name decide nothing."""
    assert load_stain_rules().stain_of(rel) == stain


def test_manifest_wins_over_rules_and_lists_missing(cohort):
    """Manifest stain beats the file-name rule; a listed file that is absent is a failure job."""
    jobs = {j.rel: j for j in plan_jobs(cohort / "in", cohort / "plan-out", manifest=cohort / "manifest.csv")}
    he = jobs["case1_he.tiff"]
    assert (he.stain, he.stain_source, he.age, he.manifest["patient"]) == ("he", "manifest", 45.0, "P001")
    assert jobs["missing.svs"].error
    assert jobs["sub dir/copy #2.tif"].stain_source == "auto"
    assert jobs["broken_he.tiff"].stain_source == "rule"
    assert "notes.txt" not in jobs
    forced = {j.rel: j for j in plan_jobs(cohort / "in", cohort / "plan-out", stain="ecad")}
    assert {j.stain_source for j in forced.values()} == {"cli"}


def test_bad_manifest_is_a_config_error(tmp_path):
    """A manifest without a slide column or with an escaping path fails before any analysis."""
    (tmp_path / "in").mkdir()
    (tmp_path / "m.csv").write_text("file,stain\na.svs,he\n")
    with pytest.raises(ConfigError, match="slide"):
        plan_jobs(tmp_path / "in", tmp_path / "out", manifest=tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("slide,stain\n../a.svs,he\n")
    with pytest.raises(ConfigError, match="relative"):
        plan_jobs(tmp_path / "in", tmp_path / "out", manifest=tmp_path / "m.csv")


# ----------------------------------------------------------------------------- a serial run
def test_summary_and_failures(serial, cohort):
    """One row per slide with stain source and readouts; bad slides in failures.csv with reasons."""
    rows = _summary(serial)
    assert set(rows) == {"case1_he.tiff", *(f"case1_{s}.tiff" for s in STAINS), "sub dir/copy #2.tif",
                         "broken_he.tiff", "fake.svs", "blank.tiff", "missing.svs"}
    he = rows["case1_he.tiff"]
    assert (he["status"], he["stain"], he["stain_source"]) == ("ok", "he", "manifest")
    assert float(he["cellularity_pct"]) > 0 and he["config_hash"] and he["patient"] == "P001"
    assert he["site"] == "iliac crest" and he["biopsy_date"] == "2024-03-01"
    auto = rows["sub dir/copy #2.tif"]
    assert (auto["status"], auto["stain"], auto["stain_source"]) == ("ok", "he", "auto")
    assert 0 < float(auto["stain_confidence"]) <= 1
    assert auto["cellularity_pct"] == rows["case1_he.tiff"]["cellularity_pct"]
    if "ecad" in STAINS:
        assert rows["case1_ecad.tiff"]["stain_source"] == "rule" and rows["case1_ecad.tiff"]["left_shift_ratio"]
    with open(serial / "failures.csv", newline="") as fh:
        fails = {r["slide"]: r["reason"] for r in csv.DictReader(fh)}
    assert set(fails) == {"broken_he.tiff", "fake.svs", "blank.tiff", "missing.svs"}
    assert "corrupt" in fails["broken_he.tiff"] or "truncated" in fails["broken_he.tiff"]
    assert "not a recognised" in fails["fake.svs"]
    assert "no tissue" in fails["blank.tiff"]
    assert "not found" in fails["missing.svs"]
    log = (serial / "marrowseg-batch.log").read_text()
    assert "FAILED" in log and "end:" in log


def test_manifest_columns_reach_metrics(serial):
    """Manifest extras are copied into metrics.json under 'manifest', with the batch record."""
    doc = json.loads((serial / "case1_he" / "metrics.json").read_text())
    assert doc["manifest"]["site"] == "iliac crest" and doc["age"] == 45.0
    assert doc["batch"]["stain_source"] == "manifest" and doc["outputs"][-1] == "metrics.json"
    assert all((serial / "case1_he" / name).exists() for name in doc["outputs"])


def test_geojson_outputs_are_qupath_shaped(serial):
    """cells.geojson: one detection Point per cells.csv row; regions.geojson: class MultiPolygons."""
    d = serial / "case1_he"
    cells = json.loads((d / "cells.geojson").read_text())
    assert cells["type"] == "FeatureCollection"
    with open(d / "cells.csv", newline="") as fh:
        n_rows = sum(1 for _ in csv.DictReader(fh))
    assert len(cells["features"]) == n_rows > 0
    names = {"late_erythroid", "megakaryocyte", "other"}
    for f in cells["features"][:50]:
        assert f["geometry"]["type"] == "Point"
        x, y = f["geometry"]["coordinates"]
        assert 0 <= x <= 768 and 0 <= y <= 768
        p = f["properties"]
        assert p["objectType"] == "detection" and p["classification"]["name"] in names
        assert len(p["classification"]["color"]) == 3 and all(0 <= c <= 255 for c in p["classification"]["color"])
        assert isinstance(p["measurements"], dict)
    regions = json.loads((d / "regions.geojson").read_text())
    assert regions["type"] == "FeatureCollection" and regions["features"]
    for f in regions["features"]:
        assert f["geometry"]["type"] == "MultiPolygon"
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] in {"haematopoietic", "fat", "bone"}
        for poly in f["geometry"]["coordinates"]:
            for ring in poly:
                assert ring[0] == ring[-1] and len(ring) >= 4
                xy = np.asarray(ring)
                assert xy.min() >= 0 and xy.max() <= 768


def test_ome_zarr_masks(serial):
    """masks.ome.zarr opens with zarr; NGFF 0.4 multiscales with y/x in µm and doubling scales."""
    d = serial / "case1_he"
    g = zarr.open_group(str(d / "masks.ome.zarr"), mode="r")
    ms = g.attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [(a["name"], a["type"], a["unit"]) for a in ms["axes"]] == [("y", "space", "micrometer"),
                                                                       ("x", "space", "micrometer")]
    map_mpp = json.loads((d / "metrics.json").read_text())["tiles"]["map_mpp"]
    for k, ds in enumerate(ms["datasets"]):
        assert ds["coordinateTransformations"][0]["scale"] == [map_mpp * 2**k] * 2
        assert g[ds["path"]].ndim == 2
    src = zarr.open_group(str(d / "labels.zarr"), mode="r")["labels"][:]
    np.testing.assert_array_equal(g["0"][:], src)
    assert (d / "overlay_thumb.png").stat().st_size > 0


def test_rerun_skips_complete_slides(serial, cohort):
    """A second run analyses nothing that is complete; only failed slides are tried again."""
    res = run_batch(cohort / "in", serial, manifest=cohort / "manifest.csv", sets=SETS)
    ran = {r["slide"] for r in res.rows if r["ran"]}
    assert ran == {"broken_he.tiff", "fake.svs", "blank.tiff"}
    assert res.exit_code == 3


def test_changed_config_redoes_slide(serial, cohort, tmp_path):
    """A different config hash means the slide is analysed again."""
    out = tmp_path / "out"
    shutil.copytree(serial, out)
    res = run_batch(cohort / "in", out, manifest=cohort / "manifest.csv", sets=[*SETS, "tiling.overlap_px=130"],
                    only=[cohort / "in" / "case1_he.tiff"])
    assert [r["ran"] for r in res.rows] == [True]


def test_lock_held_by_another_process_makes_slide_busy(cohort, tmp_path):
    """While one batch holds a slide's lock, another does not touch that slide."""
    job = next(j for j in plan_jobs(cohort / "in", tmp_path) if j.rel == "case1_he.tiff")
    st_ = BatchSettings(out_dir=tmp_path, configs={}, hashes={})
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from marrowseg.batch_slide import slide_lock\n"
        f"with slide_lock(Path({str(tmp_path)!r}), {job.slide_id!r}):\n"
        "    print('held', flush=True); time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert process_slide(job, st_, wait=False)["status"] == "busy"
    finally:
        holder.kill()
        holder.wait()
    with slide_lock(tmp_path, job.slide_id, wait=False) as held:  # released by the kill
        assert held


def test_cli_json_prints_one_document(serial, cohort, capsys):
    """--json prints exactly one JSON document on stdout; exit code 3 with failures."""
    code = run_cli("batch", str(cohort / "in"), str(serial), "--manifest", str(cohort / "manifest.csv"),
                   "--json", *SET_ARGS)
    assert code == 3
    rows = json.loads(capsys.readouterr().out)
    assert {r["status"] for r in rows} == {"ok", "failed"}


# ----------------------------------------------------------------------------- Dask and crashes
def test_local_cluster_matches_serial(serial, cohort, tmp_path):
    """Two Dask worker processes give the same readouts and files as the serial run."""
    out = tmp_path / "dask"
    res = run_batch(cohort / "in", out, manifest=cohort / "manifest.csv", sets=SETS, workers=2, cluster="local")
    assert res.exit_code == 3
    assert _readouts(out) == _readouts(serial)
    a, b = _summary(out), _summary(serial)
    for slide in a:
        for col in ("status", "stain", "config_hash", "cellularity_pct", "slide_id"):
            assert a[slide].get(col) == b[slide].get(col), (slide, col)
    assert (out / "case1_he" / "cells.csv").read_bytes() == (serial / "case1_he" / "cells.csv").read_bytes()


def _files(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}


def test_sigkill_then_resume_equals_uninterrupted(serial, cohort, tmp_path):
    """SIGKILL mid-slide, rerun: same slides, readouts and output files as one clean run."""
    out = tmp_path / "killed"
    argv = [sys.executable, "-c", "from marrowseg.cli import main; main()", "batch", str(cohort / "in"), str(out),
            "--manifest", str(cohort / "manifest.csv"), "-q", *SET_ARGS]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    try:
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and any(p.name.startswith(".") and ".partial-" in p.name for p in out.iterdir()):
                break
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the batch finished before it could be killed"
    assert not (out / "summary.csv").exists()
    code = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    assert code == 3
    assert not [p for p in out.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    assert _readouts(out) == _readouts(serial)
    for d in (p for p in serial.iterdir() if (p / "metrics.json").is_file()):
        assert _files(out / d.name) == _files(d)
        for name in ("cells.csv", "tiles.csv", "cells.geojson", "regions.geojson"):
            assert (out / d.name / name).read_bytes() == (d / name).read_bytes(), (d.name, name)
    assert set(_summary(out)) == set(_summary(serial))
