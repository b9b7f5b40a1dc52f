"""Slides made of several files: a DICOM folder, a MIRAX index with its data folder.

The reader's reopen check, the checksum in metrics.json and the batch's resume test must all
look at every file of such a slide (``marrowseg.io.files``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import types

import numpy as np
import pytest
from PIL import Image

from marrowseg.batch_plan import find_slides
from marrowseg.batch_slide import _input_record, _sha256
from marrowseg.errors import ConfigError, SlideError
from marrowseg.io import base as io_base
from marrowseg.io import open_slide
from marrowseg.io.files import files_sha256, slide_files

IMG = np.random.default_rng(5).integers(0, 256, (40, 60, 3), dtype=np.uint8)


class FakeSlide:
    """Stands in for ``openslide.OpenSlide`` (the real one needs real DICOM files)."""

    level_dimensions = ((60, 40),)
    level_downsamples = (1.0,)
    properties = {"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.5", "openslide.vendor": "dicom"}
    opened: list[str] = []

    def __init__(self, filename):
        FakeSlide.opened.append(str(filename))

    def read_region(self, location, level, size):
        (x, y), (w, h) = location, size
        rgba = np.dstack([IMG[y : y + h, x : x + w], np.full((h, w), 255, np.uint8)])
        return Image.fromarray(rgba, "RGBA")

    def close(self):
        pass


@pytest.fixture
def dicom_dir(tmp_path, monkeypatch):
    """A folder of three .dcm files (a DICOM WSI's levels and label) and a stand-in OpenSlide."""
    monkeypatch.setitem(sys.modules, "openslide", types.SimpleNamespace(OpenSlide=FakeSlide))
    folder = tmp_path / "case_dicom"
    folder.mkdir()
    for i, name in enumerate(["level0.dcm", "level1.dcm", "label.dcm"]):
        (folder / name).write_bytes(b"\0" * 128 + b"DICM" + bytes([i]) * (100 + i))
    (folder / "notes.txt").write_text("not part of the slide")
    return folder


def _later_mtime(path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_dicom_folder_is_reopened_in_a_worker(dicom_dir, monkeypatch):
    """A worker process reopens the slide; a DICOM folder must not read as changed then."""
    with open_slide(dicom_dir) as r:
        assert r.backend == "openslide" and r.vendor == "dicom"
        parent = r._handle
        monkeypatch.setattr(io_base.os, "getpid", lambda: -1)  # as in a forked tile worker
        np.testing.assert_array_equal(r.read_region(5, 6, 20, 10, 0.5), IMG[6:16, 5:25])
        assert r._handle is not parent
    assert FakeSlide.opened[-1].endswith("label.dcm")  # OpenSlide is given one file of the series


def test_a_changed_level_file_of_a_dicom_folder_is_noticed(dicom_dir):
    blob = pickle.dumps(open_slide(dicom_dir))
    with open(dicom_dir / "level1.dcm", "ab") as fh:  # not the file OpenSlide was pointed at
        fh.write(b"more")
    with pytest.raises(SlideError, match="changed on disk"):
        pickle.loads(blob).read_region(0, 0, 4, 4, 0.5)


def test_dicom_identity_covers_every_dcm_file(dicom_dir):
    files = sorted(dicom_dir.glob("*.dcm"))
    with open_slide(dicom_dir) as r:
        ident = r.identity()
    assert ident["size_bytes"] == sum(f.stat().st_size for f in files)
    assert ident["sha256"] == files_sha256(files) == _sha256(dicom_dir)  # batch resume compares these
    with open_slide(dicom_dir / "level0.dcm") as r:  # one file of the folder names the same slide
        assert (r.identity()["sha256"], r.identity()["size_bytes"]) == (ident["sha256"], ident["size_bytes"])
    (dicom_dir / "level1.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\7" * 101)
    with open_slide(dicom_dir) as r:
        assert r.identity()["sha256"] != ident["sha256"]


def test_one_file_checksum_is_its_plain_sha256(tmp_path):
    f = tmp_path / "a.svs"
    f.write_bytes(b"slide bytes")
    assert slide_files(f) == [f]
    assert files_sha256([f]) == hashlib.sha256(b"slide bytes").hexdigest()


def test_mrxs_files_are_the_index_and_its_data_folder(tmp_path):
    index = tmp_path / "slide.mrxs"
    index.write_text("[GENERAL]\n")
    assert slide_files(index) == [index]
    data = tmp_path / "slide"
    data.mkdir()
    for name in ("Slidedat.ini", "Data0000.dat"):
        (data / name).write_text(name)
    assert slide_files(index) == [index, data / "Data0000.dat", data / "Slidedat.ini"]


def test_batch_lists_a_dicom_folder_as_one_slide(dicom_dir):
    root = dicom_dir.parent
    (root / "b.svs").write_bytes(b"x")
    nested = root / "site" / "case2"
    nested.mkdir(parents=True)
    (nested / "0.dcm").write_bytes(b"y")
    assert [p.relative_to(root).as_posix() for p in find_slides(root)] == ["b.svs", "case_dicom", "site/case2"]
    assert [p.name for p in find_slides(root, pattern="*dicom")] == ["case_dicom"]
    with pytest.raises(ConfigError, match="is one DICOM slide"):
        find_slides(dicom_dir)


def test_batch_resume_sees_a_level_file_rewritten_in_place(dicom_dir):
    """A folder's own mtime does not move when a file in it is rewritten; the record must."""
    before = _input_record(dicom_dir)
    _later_mtime(dicom_dir / "level0.dcm")
    after = _input_record(dicom_dir)
    assert after["mtime_ns"] > before["mtime_ns"] and after["size_bytes"] == before["size_bytes"]


# ---------------------------------------------------------------------------- a real DICOM slide
def _real_openslide():
    pytest.importorskip("pydicom", reason="pydicom writes the test slide (the dev extra)")
    from marrowseg.io.openslide import openslide_available

    if not openslide_available():
        pytest.skip("OpenSlide is not installed (pip install 'marrowseg[openslide]')")


def test_dicom_slide_is_analysed_as_the_same_pixels_in_a_tiff(tmp_path):
    """A DICOM folder (written with pydicom, read by OpenSlide) through the engine's tile workers:
    the same cells and readouts as the same pixels in a TIFF, and a checksum over its files."""
    _real_openslide()
    import tifffile

    from marrowseg.config import load_config
    from marrowseg.pipeline import analyze_slide
    from marrowseg.synth import write_phantom
    from tests._dicom import write_dicom_wsi

    tiff, _ = write_phantom(tmp_path, "he", name="ph", seed=3, size_px=(1280, 1024), mpp=0.5)
    rgb = tifffile.imread(tiff, level=0)
    dicom = tmp_path / "case_dicom"
    write_dicom_wsi(dicom, rgb, 0.5)
    write_dicom_wsi(dicom, rgb[::8, ::8], 4.0, image_type="THUMBNAIL")
    config = load_config("he", overrides=["engine.workers=2", "tiling.tile_px=1024"])
    m_tif, _ = analyze_slide(tiff, "he", tmp_path / "out_tif", config=config)
    m_dcm, _ = analyze_slide(dicom, "he", tmp_path / "out_dcm", config=config)
    assert m_dcm["slide"]["vendor"] == "dicom" and m_dcm["slide"]["mpp"] == pytest.approx(0.5)
    assert m_dcm["slide"]["sha256"] == files_sha256(sorted(dicom.glob("*.dcm")))
    assert m_dcm["readouts"]["nucleated_cells"] > 100
    assert m_dcm["readouts"] == m_tif["readouts"]
    cells = [(tmp_path / d / "cells.csv").read_text() for d in ("out_tif", "out_dcm")]
    assert cells[0] == cells[1]
