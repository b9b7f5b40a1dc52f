"""Tests for marrowseg.io: metadata, geometry of read_region, colour, errors, real slides."""

from __future__ import annotations

import logging
import pickle
import struct
import sys
import types
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from marrowseg.errors import MissingMppError, SlideError, UnsupportedFormatError
from marrowseg.io import SlideReader, open_slide
from marrowseg.io import base as io_base

RNG_SEED = 1234
APERIO_DESC = (
    "Aperio Image Library v12.0.0 \r\n512x384 [0,0 512x384] (64x64) JPEG/RGB Q=90"
    "|AppMag = 20|MPP = 0.25|Filename = synthetic"
)


# ---------------------------------------------------------------------------- fixture writers
def _noise(h: int, w: int, seed: int = RNG_SEED) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h: int, w: int) -> np.ndarray:
    """Smooth RGB content (survives JPEG well): gradients and a sine."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 40 + 180 * xx / w
    g = 40 + 180 * yy / h
    b = 128 + 100 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    return np.clip(np.dstack([r, g, b]), 0, 255).astype(np.uint8)


def write_pyramid(
    path: Path,
    img: np.ndarray,
    *,
    levels: int = 3,
    compression: str = "jpeg",
    px_per_cm: float | None = 40000.0,
) -> list[np.ndarray]:
    """Tiled TIFF with SubIFD levels (each 2x decimated); returns the levels as written."""
    pyramid = [img[:: 2**k, :: 2**k].copy() for k in range(levels)]
    res = {}
    if px_per_cm is not None:
        res = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            pyramid[0],
            tile=(64, 64),
            compression=compression,
            photometric="rgb",
            subifds=levels - 1,
            metadata=None,
            **res,
        )
        for k in range(1, levels):
            lvl_res = {}
            if px_per_cm is not None:
                lvl_res = {"resolution": (px_per_cm / 2**k,) * 2, "resolutionunit": "CENTIMETER"}
            tw.write(
                pyramid[k],
                tile=(64, 64),
                compression=compression,
                photometric="rgb",
                subfiletype=1,
                metadata=None,
                **lvl_res,
            )
    return pyramid


def write_svs(path: Path, img: np.ndarray, description: str = APERIO_DESC) -> None:
    """Single-level tiled JPEG TIFF with an Aperio description (SVS-style)."""
    tifffile.imwrite(
        path,
        img,
        tile=(64, 64),
        compression="jpeg",
        photometric="rgb",
        description=description,
        metadata=None,
    )


def write_ome(path: Path, img: np.ndarray, size_x: float, size_y: float, unit: str = "µm") -> None:
    tifffile.imwrite(
        path,
        img,
        tile=(64, 64),
        photometric="rgb",
        ome=True,
        metadata={
            "axes": "YXS",
            "PhysicalSizeX": size_x,
            "PhysicalSizeY": size_y,
            "PhysicalSizeXUnit": unit,
            "PhysicalSizeYUnit": unit,
        },
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height with one tiny IDAT (never decodable)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00"))
        + _png_chunk(b"IEND", b"")
    )


def padded_slice(img: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """img[y:y+h, x:x+w] with 255 outside (the oracle for reads at level-0 mpp)."""
    out = np.full((h, w, 3), 255, np.uint8)
    H, W = img.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x0 < x1 and y0 < y1:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = img[y0:y1, x0:x1]
    return out


def block_mean(img: np.ndarray, k: int) -> np.ndarray:
    h, w = img.shape[0] // k, img.shape[1] // k
    blocks = img[: h * k, : w * k].reshape(h, k, w, k, 3).astype(np.float64)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


@pytest.fixture
def pyramid_tif(tmp_path):
    path = tmp_path / "pyramid.tif"
    levels = write_pyramid(path, _smooth(384, 512))
    with tifffile.TiffFile(path) as tf:  # what the file holds after JPEG
        stored = [lvl.asarray() for lvl in tf.series[0].levels]
    assert [s.shape for s in stored] == [lv.shape for lv in levels]
    return path, stored


# ---------------------------------------------------------------------------- metadata
def test_pyramid_tiff_metadata_and_mpp_from_resolution_cm(pyramid_tif):
    """Levels, downsamples and mpp = 1e4 / px_per_cm come from a SubIFD pyramid."""
    path, stored = pyramid_tif
    with open_slide(path) as r:
        assert r.mpp == pytest.approx(0.25)
        assert r.mpp_source == "tiff-resolution"
        assert r.dimensions == (512, 384) and r.shape == (384, 512)
        assert r.level_count == 3
        assert r.level_dimensions == [(512, 384), (256, 192), (128, 96)]
        assert r.level_downsamples == [1.0, 2.0, 4.0]
        assert r.name == "pyramid.tif" and r.path == path
        assert "pyramid.tif" in repr(r)
        assert r.properties is r.properties  # cached


def test_svs_style_description_gives_aperio_mpp_and_vendor(tmp_path):
    """'MPP = 0.25' in an Aperio ImageDescription wins."""
    path = tmp_path / "slide.svs"
    write_svs(path, _smooth(384, 512))
    with open_slide(path) as r:
        assert (r.mpp, r.mpp_source, r.vendor) == (0.25, "aperio", "aperio")


@pytest.mark.parametrize(
    ("size", "unit", "expected_um"),
    [(0.5, "µm", 0.5), (500.0, "nm", 0.5), (0.0005, "mm", 0.5)],
)
def test_ome_physical_size_with_units(tmp_path, size, unit, expected_um):
    """OME PhysicalSizeX/Y is converted to µm."""
    path = tmp_path / "img.ome.tif"
    write_ome(path, _smooth(128, 128), size, size, unit)
    with open_slide(path) as r:
        assert r.mpp == pytest.approx(expected_um)
        assert (r.mpp_source, r.vendor) == ("ome", "ome")


def _philips_xml(spacings_mm: list[float], macro_mm: float = 0.0315) -> str:
    """A Philips DP ImageDescription: one DICOM_PIXEL_SPACING (mm, row then column) per level of the
    WSI image, one for its macro image (the shape of Philips IntelliSite TIFFs)."""
    reps = "".join(
        '<DataObject ObjectType="PixelDataRepresentation"><Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" '
        f'Element="0x0030" PMSVR="IDoubleArray">&quot;{s:g}&quot; &quot;{s:g}&quot;</Attribute></DataObject>'
        for s in spacings_mm)
    attr = '<Attribute Name="{}" Group="0x301D" Element="0x1004" PMSVR="{}">{}</Attribute>'
    return ('<?xml version="1.0" encoding="UTF-8" ?><DataObject ObjectType="DPUfsImport">'
            + attr.format("DICOM_MANUFACTURER", "IString", "PHILIPS")
            + '<Attribute Name="PIM_DP_SCANNED_IMAGES" Group="0x301D" Element="0x1003" PMSVR="IDataObjectArray"><Array>'
            '<DataObject ObjectType="DPScannedImage">' + attr.format("PIM_DP_IMAGE_TYPE", "IString", "WSI")
            + '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" Group="0x1001" Element="0x8B01" '
            'PMSVR="IDataObjectArray"><Array>' + reps + '</Array></Attribute></DataObject>'
            '<DataObject ObjectType="DPScannedImage">' + attr.format("PIM_DP_IMAGE_TYPE", "IString", "MACRO")
            + f'<Attribute Name="DICOM_PIXEL_SPACING" PMSVR="IDoubleArray">&quot;{macro_mm}&quot; &quot;{macro_mm}&quot;'
            '</Attribute></DataObject></Array></Attribute></DataObject>')


def test_philips_pixel_spacing_is_level_0_of_the_wsi_image():
    from marrowseg.io._mpp import mpp_from_philips

    assert mpp_from_philips(_philips_xml([0.000227, 0.000454, 0.000908])) == pytest.approx(("philips", 0.227, 0.227))
    assert mpp_from_philips(_philips_xml([])) is None  # the macro's spacing is not the slide's
    assert mpp_from_philips("Aperio Image Library | MPP = 0.25") is None
    assert mpp_from_philips('<?xml version="1.0"?><DataObject ObjectType="DPUfsImport"><broken') is None


def test_philips_tiff_reads_its_pixel_size_from_the_xml(tmp_path):
    """A Philips TIFF (no resolution tags, pixel size in the XML) opens without --mpp, and where
    OpenSlide is installed it reads the same pixels."""
    from marrowseg.io.openslide import openslide_available

    img = _smooth(512, 768)
    path = tmp_path / "philips.tiff"
    with tifffile.TiffWriter(path) as tw:
        for k in range(3):
            tw.write(img[:: 2**k, :: 2**k].copy(), tile=(128, 128), compression="jpeg", photometric="rgb",
                     software="Philips DP v1.0", description=_philips_xml([0.00025, 0.0005, 0.001]) if k == 0 else "",
                     subfiletype=1 if k else 0, metadata=None)
    with open_slide(path) as r:
        assert (r.mpp, r.mpp_source, r.dimensions, r.level_count) == (0.25, "philips", (768, 512), 3)
        ours = r.read_region(100, 50, 300, 200, 0.25)
    if openslide_available():
        import openslide

        with openslide.OpenSlide(str(path)) as s:
            assert s.properties["openslide.vendor"] == "philips"
            np.testing.assert_array_equal(ours, np.asarray(s.read_region((100, 50), 0, (300, 200)).convert("RGB")))


def test_planar_rgb_ome_pyramid_reads_as_interleaved(tmp_path):
    """A planar (one plane per colour, axes 'SYX') pyramidal OME-TIFF, which tiffslide refuses, reads
    pixel for pixel as the same image written interleaved, at every level and between levels."""
    img = _noise(300, 420)
    planar, interleaved = tmp_path / "planar.ome.tif", tmp_path / "interleaved.ome.tif"
    for path, data, axes, config in [(planar, np.moveaxis(img, 2, 0), "SYX", "separate"),
                                     (interleaved, img, "YXS", "contig")]:
        with tifffile.TiffWriter(path) as tw:
            opts = dict(tile=(64, 64), compression="zlib", photometric="rgb", planarconfig=config)
            tw.write(data, subifds=2, metadata={"axes": axes, "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}, **opts)
            for k in (1, 2):
                sub = data[:, :: 2**k, :: 2**k] if axes == "SYX" else data[:: 2**k, :: 2**k]
                tw.write(sub, subfiletype=1, **opts)
    with tifffile.TiffFile(planar) as tf:
        assert tf.series[0].axes == "SYX"
    with open_slide(planar) as p, open_slide(interleaved) as q:
        assert (p.dimensions, p.mpp, p.mpp_source, p.level_count) == ((420, 300), 0.25, "ome", 3)
        np.testing.assert_array_equal(p.read_region(10, 20, 400, 270, 0.25), img[20:290, 10:410])
        for mpp in (0.5, 0.8, 1.0, 2.0):
            np.testing.assert_array_equal(p.read_region(3, 5, 90, 60, mpp), q.read_region(3, 5, 90, 60, mpp))
        revived = pickle.loads(pickle.dumps(p))  # as the engine's worker processes get it
        np.testing.assert_array_equal(revived.read_region(0, 0, 64, 64, 0.25), img[:64, :64])
        revived.close()


def test_anisotropic_pixels_are_refused(tmp_path):
    """x and y pixel sizes 10 % apart raise, naming the file."""
    path = tmp_path / "aniso.ome.tif"
    write_ome(path, _smooth(64, 64), 0.5, 0.55)
    with pytest.raises(SlideError, match=r"aniso\.ome\.tif: anisotropic"):
        open_slide(path)


def test_mpp_argument_overrides_metadata(pyramid_tif):
    """The mpp argument wins over the TIFF resolution tags."""
    path, _ = pyramid_tif
    with open_slide(path, mpp=0.3) as r:
        assert (r.mpp, r.mpp_source) == (0.3, "flag")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 1000.0])
def test_mpp_argument_out_of_range_is_refused(tmp_path, bad):
    """An mpp that is not finite or outside 0.05..100 µm/px is refused."""
    with pytest.raises(SlideError, match="outside|not a number"):
        open_slide(_noise(8, 8), mpp=bad)


def test_missing_mpp_names_the_file(tmp_path):
    """A PNG without pHYs and no --mpp: MissingMppError with the path first."""
    path = tmp_path / "nompp.png"
    cv2.imwrite(str(path), _noise(16, 16))
    with pytest.raises(MissingMppError) as info:
        open_slide(path)
    assert str(info.value) == f"{path}: no pixel size in metadata or TIFF tags; pass --mpp"


def test_72_dpi_placeholder_is_not_a_pixel_size(tmp_path):
    """A TIFF at the default 72 dpi has no usable mpp."""
    path = tmp_path / "dpi72.tif"
    tifffile.imwrite(path, _noise(16, 16), resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(MissingMppError, match="dpi72.tif"):
        open_slide(path)
    assert open_slide(path, mpp=0.5).mpp_source == "flag"


def test_array_requires_mpp():
    """An array has no metadata, so mpp is required."""
    with pytest.raises(MissingMppError, match="<array>"):
        open_slide(_noise(8, 8))


def test_identity_hashes_file_and_array(pyramid_tif):
    """identity() hashes the file (or the array bytes) and reports the geometry."""
    import hashlib

    path, _ = pyramid_tif
    with open_slide(path) as r:
        ident = r.identity()
    assert ident["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ident["path"] == str(path.resolve())
    assert (ident["width"], ident["height"], ident["levels"]) == (512, 384, 3)
    assert ident["size_bytes"] == path.stat().st_size
    assert ident["mpp_source"] == "tiff-resolution" and ident["vendor"] is None
    arr = _noise(8, 9)
    a = open_slide(arr, mpp=0.5).identity()
    assert a["sha256"] == hashlib.sha256(arr.tobytes()).hexdigest()
    assert a["path"] is None and a["name"] == "<array>"


# ---------------------------------------------------------------------------- geometry
def test_read_at_level0_mpp_returns_exact_pixels(pyramid_tif):
    """At the level-0 mpp a read is the stored pixels, unchanged."""
    path, stored = pyramid_tif
    with open_slide(path) as r:
        got = r.read_region(37, 21, 100, 70, r.mpp)
    np.testing.assert_array_equal(got, stored[0][21:91, 37:137])


def test_read_at_2x_mpp_uses_level_1_exactly(pyramid_tif, monkeypatch):
    """s = 2 reads the stored level 1 (not level 0), pixel for pixel."""
    path, stored = pyramid_tif
    with open_slide(path) as r:
        levels_read = []
        original = type(r)._read_level

        def spy(self, handle, level, *window):
            levels_read.append((level, window))
            return original(self, handle, level, *window)

        monkeypatch.setattr(type(r), "_read_level", spy)
        got = r.read_region(10, 5, 64, 48, r.mpp * 2)
    np.testing.assert_array_equal(got, stored[1][5:53, 10:74])
    assert {lvl for lvl, _ in levels_read} == {1}
    # only the window was read, never the whole level
    assert all((x1 - x0) * (y1 - y0) <= 64 * 48 for _, (x0, y0, x1, y1) in levels_read)


def test_read_at_8x_mpp_is_block_mean_of_coarsest_level(pyramid_tif):
    """s = 8 picks level 2 (ds 4) and averages 2x2 blocks of it."""
    path, stored = pyramid_tif
    with open_slide(path) as r:
        assert r.best_level(8.0) == 2 and r.best_level(3.99) == 1 and r.best_level(0.5) == 0
        got = r.read_region(0, 0, 64, 48, r.mpp * 8)
    np.testing.assert_allclose(got, block_mean(stored[2], 2), atol=1)


def test_read_at_2x_mpp_equals_block_mean_on_single_level():
    """A checkerboard-like noise slide read 2x coarser is the 2x2 block mean."""
    img = _noise(60, 80)
    r = open_slide(img, mpp=0.5)
    got = r.read_region(0, 0, 40, 30, 1.0)
    np.testing.assert_allclose(got, block_mean(img, 2), atol=1)
    checker = ((np.indices((60, 80)).sum(0) % 2) * 255).astype(np.uint8)
    got = open_slide(checker, mpp=0.5).read_region(3, 4, 10, 10, 1.0)
    assert np.all(np.abs(got.astype(int) - 128) <= 1)


def test_non_integer_factor_samples_gradient_at_exact_centres():
    """s = 1.5 on a linear ramp: target col c samples level-0 x = (c + 0.5) * 1.5 - 0.5."""
    ramp = np.broadcast_to(np.arange(200, dtype=np.float64)[None, :, None], (40, 200, 3))
    r = open_slide(ramp.astype(np.uint8), mpp=0.5)
    got = r.read_region(5, 2, 100, 10, 0.75)
    expected = ((np.arange(5, 105) + 0.5) * 1.5 - 0.5)[None, :]
    np.testing.assert_allclose(got[:, :, 0], np.broadcast_to(expected, (10, 100)), atol=1.0)


def test_upsampling_is_linear_and_keeps_block_alignment():
    """s = 0.5: two target px per source px; centres interpolate linearly."""
    ramp = np.broadcast_to((np.arange(50) * 4).astype(np.uint8)[None, :, None], (10, 50, 3))
    got = open_slide(ramp.copy(), mpp=1.0).read_region(10, 0, 40, 4, 0.5)
    expected = np.clip(((np.arange(10, 50) + 0.5) * 0.5 - 0.5) * 4, 0, None)
    np.testing.assert_allclose(got[0, :, 0], expected, atol=1.0)


def test_read_straddling_edges_is_white_outside(pyramid_tif):
    """Pixels wholly outside the slide are 255; inside ones are the slide's."""
    path, stored = pyramid_tif
    with open_slide(path) as r:
        got = r.read_region(480, 360, 64, 48, r.mpp)
        np.testing.assert_array_equal(got, padded_slice(stored[0], 480, 360, 64, 48))
        coarse = r.read_region(-10, -10, 40, 40, r.mpp * 1.5)
        assert (coarse[:10] == 255).all() and (coarse[:, :10] == 255).all()
        assert (coarse[10:, 10:] < 255).any()
        assert (r.read_region(1000, 0, 8, 8, r.mpp) == 255).all()
        with pytest.raises(TypeError):
            r.read_region(1.5, 0, 8, 8, r.mpp)


def test_large_low_res_read_goes_in_bounded_blocks(monkeypatch):
    """With a tiny block budget the result is identical and every level window is small."""
    img = _smooth(300, 400)
    r = open_slide(img, mpp=0.5)
    full = r.read_region(0, 0, 130, 100, 0.5 * 3.1)
    monkeypatch.setattr(io_base, "LEVEL_WINDOW_MAX_PX", 2000)
    sizes = []
    original = type(r)._read_level

    def spy(self, handle, level, x0, y0, x1, y1):
        sizes.append((x1 - x0) * (y1 - y0))
        return original(self, handle, level, x0, y0, x1, y1)

    monkeypatch.setattr(type(r), "_read_level", spy)
    blocked = r.read_region(0, 0, 130, 100, 0.5 * 3.1)
    np.testing.assert_array_equal(blocked, full)
    assert len(sizes) > 1 and max(sizes) <= 2000


@settings(max_examples=60, deadline=None, database=None)
@given(
    x=st.integers(-40, 60),
    y=st.integers(-40, 50),
    w=st.integers(0, 50),
    h=st.integers(0, 50),
)
def test_level0_reads_equal_padded_array_slice(x, y, w, h):
    """Any window at the level-0 mpp is the array slice, 255 outside (NumPy as oracle)."""
    img = _noise(30, 40)
    got = open_slide(img, mpp=0.5).read_region(x, y, w, h, 0.5)
    np.testing.assert_array_equal(got, padded_slice(img, x, y, w, h))


def test_thumbnail_and_read_at_mpp_sizes(pyramid_tif):
    """thumbnail keeps the aspect and uses the smallest level; read_at_mpp refuses > 64 Mpx."""
    path, stored = pyramid_tif
    with open_slide(path) as r:
        assert r.thumbnail(100).shape == (75, 100, 3)
        assert r.thumbnail(1000).shape == (384, 512, 3)  # never upsampled
        np.testing.assert_array_equal(r.thumbnail(128), stored[2])  # exactly level 2
        assert r.read_at_mpp(1.0).shape == (96, 128, 3)
        with pytest.raises(SlideError, match=r"pyramid\.tif: whole slide .* Mpx"):
            r.read_at_mpp(0.01)


def test_pickle_round_trip_reads_same_pixels(pyramid_tif, tmp_path):
    """A pickled reader reopens lazily and reads the same pixels; a closed one refuses."""
    path, _ = pyramid_tif
    png = tmp_path / "p.png"
    cv2.imwrite(str(png), _noise(20, 30))
    for reader in (open_slide(path), open_slide(png, mpp=0.5), open_slide(_noise(20, 30), mpp=0.5)):
        before = reader.read_region(3, 4, 17, 11, reader.mpp * 1.3)
        clone = pickle.loads(pickle.dumps(reader))
        assert clone._handle is None  # reopened lazily
        np.testing.assert_array_equal(clone.read_region(3, 4, 17, 11, reader.mpp * 1.3), before)
        assert clone.identity() == reader.identity()
        clone.close()
        reader.close()
        with pytest.raises(SlideError, match="closed"):
            reader.read_region(0, 0, 2, 2, reader.mpp)


def test_reader_reopens_its_file_after_fork(pyramid_tif, monkeypatch):
    """A handle inherited across fork (new pid) is not shared: the reader reopens the file."""
    path, stored = pyramid_tif
    with open_slide(path) as r:
        parent_handle = r._handle
        monkeypatch.setattr(io_base.os, "getpid", lambda: -1)
        np.testing.assert_array_equal(r.read_region(0, 0, 8, 8, r.mpp), stored[0][:8, :8])
        assert r._handle is not parent_handle
        parent_handle.close()


def test_changed_file_is_not_silently_reopened(pyramid_tif):
    """A pickled reader refuses to read a file that changed on disk since it was opened."""
    path, _ = pyramid_tif
    blob = pickle.dumps(open_slide(path))
    write_pyramid(path, _noise(384, 512))
    with pytest.raises(SlideError, match="changed on disk"):
        pickle.loads(blob).read_region(0, 0, 4, 4, 0.25)


# ---------------------------------------------------------------------------- colour
def test_rgba_png_is_composited_over_white_and_logged(tmp_path, caplog):
    """RGBA is composited over white and the conversion is logged once."""
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 2] = 200  # red in BGR order
    bgra[:2, ..., 3] = 255  # top half opaque, bottom half transparent
    path = tmp_path / "rgba.png"
    cv2.imwrite(str(path), bgra)
    with caplog.at_level(logging.INFO, logger="marrowseg.io.base"):
        r = open_slide(path, mpp=0.5)
        got = r.read_region(0, 0, 4, 4, 0.5)
        r.read_region(0, 0, 4, 4, 0.5)
    assert (got[:2] == [200, 0, 0]).all() and (got[2:] == 255).all()
    notes = [rec.getMessage() for rec in caplog.records if "colour converted" in rec.getMessage()]
    assert len(notes) == 1 and "RGBA composited over white" in notes[0] and "rgba.png" in notes[0]


@pytest.mark.parametrize(
    ("img", "expected"),
    [
        (np.full((5, 6), 77, np.uint8), 77),  # grey
        (np.full((5, 6, 3), 257 * 100, np.uint16), 100),  # 16-bit
        (np.full((5, 6, 3), 0.5, np.float32), 128),  # float in [0, 1]
        (np.full((5, 6), 200.0, np.float64), 200),  # float in [0, 255]
        (np.full((5, 6, 1), True), 255),  # bool mask
    ],
    ids=["grey", "uint16", "float01", "float255", "bool"],
)
def test_array_dtypes_and_layouts_become_rgb_uint8(img, expected):
    """Grey, 16-bit, float and bool arrays read as RGB uint8."""
    got = open_slide(img, mpp=0.5).read_region(0, 0, 6, 5, 0.5)
    assert got.dtype == np.uint8 and got.shape == (5, 6, 3)
    assert (got == expected).all()


def test_grey_16bit_and_cmyk_files_become_rgb(tmp_path):
    """Grey PNG, 16-bit TIFF, CMYK and RGB JPEG all read as RGB uint8."""
    from PIL import Image

    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((5, 6), 90, np.uint8))
    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, np.full((5, 6, 3), 257 * 40, np.uint16), photometric="rgb")
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(np.full((16, 16, 3), (200, 100, 50), np.uint8)).convert("CMYK").save(cmyk)
    np.testing.assert_allclose(
        open_slide(cmyk, mpp=1).read_region(0, 0, 4, 4, 1)[2, 2], [200, 100, 50], atol=3
    )
    jpg = tmp_path / "img.jpg"
    cv2.imwrite(str(jpg), np.full((16, 16, 3), (30, 60, 90), np.uint8))  # BGR
    assert (open_slide(grey, mpp=1).read_region(0, 0, 6, 5, 1) == 90).all()
    assert (open_slide(deep, mpp=1).read_region(0, 0, 6, 5, 1) == 40).all()
    np.testing.assert_allclose(
        open_slide(jpg, mpp=1).read_region(0, 0, 16, 16, 1)[8, 8], [90, 60, 30], atol=2
    )


# ---------------------------------------------------------------------------- bad inputs
def _truncated_tiff(tmp_path):
    path = tmp_path / "truncated.svs"
    write_svs(path, _noise(256, 256))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _text_svs(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n")
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    return path


def _zero_width(tmp_path):
    path = tmp_path / "zero.png"
    write_png_header_only(path, 0, 10)
    return path


def _bomb_png(tmp_path):
    path = tmp_path / "bomb.png"
    write_png_header_only(path, 100_000, 100_000)
    return path


def _bomb_tiff(tmp_path):
    """A one-strip TIFF whose ImageWidth/ImageLength tags are patched to 70000 x 70000."""
    path = tmp_path / "bomb.tif"
    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8), photometric="rgb", metadata=None)
    with tifffile.TiffFile(path) as tf:
        offsets = [tf.pages.first.tags[name].valueoffset for name in ("ImageWidth", "ImageLength")]
    data = bytearray(path.read_bytes())
    for off in offsets:
        data[off : off + 4] = struct.pack("<I", 70000)
    path.write_bytes(bytes(data))
    return path


def _bad_ifd(tmp_path):
    path = tmp_path / "badifd.tif"
    path.write_bytes(b"II*\x00" + bytes(range(256)) * 2)
    return path


def _directory(tmp_path):
    path = tmp_path / "folder.svs"
    path.mkdir()
    return path


def _missing(tmp_path):
    return tmp_path / "nope.svs"


def _mrxs(tmp_path):
    path = tmp_path / "slide.mrxs"
    path.write_text("[GENERAL]\n")
    return path


@pytest.mark.parametrize(
    ("make", "error", "reason"),
    [
        (_missing, SlideError, "no such file"),
        (_directory, SlideError, "is a directory"),
        (_text_svs, UnsupportedFormatError, "not a recognised slide"),
        (_truncated_tiff, SlideError, "truncated"),
        (_bad_ifd, SlideError, "corrupt or truncated TIFF"),
        (_empty, SlideError, "empty file"),
        (_zero_width, SlideError, "zero-size"),
        (_bomb_png, SlideError, "decompression bomb"),
        (_bomb_tiff, SlideError, "decompression bomb"),
        (_mrxs, UnsupportedFormatError, "OpenSlide"),
    ],
    ids=lambda v: getattr(v, "__name__", "").lstrip("_") or None,
)
def test_bad_inputs_raise_slide_error_naming_the_file(tmp_path, make, error, reason, monkeypatch):
    """Each bad input gives a SlideError (subclass) starting with the path and saying why."""
    monkeypatch.setitem(sys.modules, "openslide", None)  # as if not installed
    path = make(tmp_path)
    with pytest.raises(error) as info:
        open_slide(path, mpp=0.5)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert reason in message


def test_corrupt_jpeg_tile_raises_on_read(tmp_path):
    """Garbage in one tile: open works, reading that tile is a SlideError with its position."""
    path = tmp_path / "corrupt.svs"
    write_svs(path, _smooth(256, 256))
    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        offset, count = page.dataoffsets[5], page.databytecounts[5]  # tile row 1, col 1
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\x00" * count
    path.write_bytes(bytes(data))
    with open_slide(path) as r:
        r.read_region(0, 0, 64, 64, r.mpp)  # tile 0 is intact
        with pytest.raises(
            SlideError,
            match=r"corrupt\.svs: corrupt JPEG tile at x=64,y=64 of level 0: no start-of-image marker",
        ):
            r.read_region(64, 64, 64, 64, r.mpp)


def _cut_chunk(path: Path, index: int, keep_frac: float = 0.8) -> tuple[int, int]:
    """Shorten the byte count of one tile/strip of page 0 in place (a chunk cut short)."""
    with tifffile.TiffFile(path, mode="r+b") as tf:
        page = tf.pages.first
        tag = page.tags["TileByteCounts" if page.is_tiled else "StripByteCounts"]
        counts = list(tag.value)
        counts[index] = int(counts[index] * keep_frac)
        tag.overwrite(counts)
        return page.tilewidth or page.imagewidth, page.tilelength or page.rowsperstrip


def test_cut_short_jpeg_tile_raises_on_read_instead_of_grey(tmp_path):
    """libjpeg fills a cut-short tile with grey (128) and says nothing; the reader refuses it."""
    path = tmp_path / "short.svs"
    write_svs(path, _smooth(256, 256))
    tw, th = _cut_chunk(path, 5)  # tile row 1, col 1 (64-px tiles, 4 across)
    with tifffile.TiffFile(path) as tf:  # the failure this guards against
        assert (tf.pages.first.asarray()[th + 60, tw + 60] == 128).all()
    with open_slide(path) as r:
        r.read_region(0, 0, 64, 64, r.mpp)  # tile 0 is whole
        with pytest.raises(SlideError) as info:
            r.read_region(60, 60, 16, 16, r.mpp)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert "corrupt JPEG tile at x=64,y=64 of level 0: no end-of-image marker" in message


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_sparse_tile_reads_white_not_black(tmp_path, compression):
    """A tile never written (byte count 0) is unscanned glass: white, as OpenSlide composites it."""
    path = tmp_path / "sparse.tif"
    img = _smooth(256, 256)
    tifffile.imwrite(path, img, tile=(64, 64), compression=compression, photometric="rgb")
    with tifffile.TiffFile(path, mode="r+b") as tf:
        for name in ("TileByteCounts", "TileOffsets"):
            tag = tf.pages.first.tags[name]
            values = list(tag.value)
            values[6] = 0  # tile row 1, col 2: level-0 pixels [64:128, 128:192]
            tag.overwrite(values)
    with open_slide(path, mpp=0.5) as r:
        window = r.read_region(120, 60, 80, 80, 0.5)  # straddles the sparse tile and four others
    assert (window[4:68, 8:72] == 255).all()
    outside = np.ones(window.shape[:2], bool)
    outside[4:68, 8:72] = False
    ref = img[60:140, 120:200]
    assert np.abs(window[outside].astype(int) - ref[outside].astype(int)).mean() < 6


def test_cut_short_jpeg_strip_of_a_plain_tiff_is_refused(tmp_path):
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, _smooth(128, 96), compression="jpeg", photometric="rgb", rowsperstrip=32)
    _cut_chunk(path, 2)
    with pytest.raises(SlideError, match=r"strips\.tif: corrupt JPEG strip at x=0,y=64 of level 0"):
        open_slide(path, mpp=0.5)


def test_tiff_cut_before_its_directories_says_so(tmp_path, shared_data):
    """Aperio writes the directories after the pixels: a copy cut short has none left."""
    svs = shared_data("wsi/CMU-1-Small-Region.svs")
    cut = tmp_path / "cut.svs"
    cut.write_bytes(svs.read_bytes()[:1_000_000])
    with pytest.raises(SlideError) as info:
        open_slide(cut)
    message = str(info.value)
    assert message.startswith(f"{cut}: corrupt or truncated TIFF: its first image directory is at byte ")
    assert "but the file has 1000000 bytes" in message


@pytest.mark.parametrize("bigtiff", [False, True])
def test_tiff_whose_first_directory_lies_past_the_end_is_refused(tmp_path, bigtiff):
    path = tmp_path / "short.tif"
    tifffile.imwrite(path, _smooth(64, 64), bigtiff=bigtiff, photometric="rgb")
    data = bytearray(path.read_bytes())
    fmt, at = ("<Q", 8) if bigtiff else ("<I", 4)
    struct.pack_into(fmt, data, at, len(data) + 4096)
    path.write_bytes(bytes(data))
    with pytest.raises(SlideError, match=rf"short\.tif: corrupt or truncated TIFF: its first image directory is at byte {len(data) + 4096} "):
        open_slide(path, mpp=0.5)


def _jpeg_bytes(img: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def test_cut_short_jpeg_file_is_refused_and_padding_after_the_end_is_not(tmp_path):
    img = _smooth(120, 160)
    data = _jpeg_bytes(img)
    whole = tmp_path / "whole.jpg"
    whole.write_bytes(data + b"\x00" * 64)  # bytes after the end-of-image marker are allowed
    with open_slide(whole, mpp=0.5) as r:
        ref = r.read_region(0, 0, 160, 120, 0.5)
    assert np.abs(ref.astype(int) - img.astype(int)).mean() < 4
    short = tmp_path / "short.jpg"
    short.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match=r"short\.jpg: corrupt JPEG: no end-of-image marker"):
        open_slide(short, mpp=0.5)


def test_jpeg_check_steps_over_an_exif_thumbnail():
    """A thumbnail in APP1 is a whole JPEG stream; the main image cut short is still found."""
    from marrowseg.io._jpeg import jpeg_problem

    main = _jpeg_bytes(_smooth(64, 64))
    thumb = _jpeg_bytes(_smooth(8, 8))
    payload = b"Exif\x00\x00" + thumb
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    with_thumb = main[:2] + app1 + main[2:]
    assert jpeg_problem(with_thumb) is None
    assert jpeg_problem(with_thumb[:-200]) == "no end-of-image marker (cut short)"
    assert jpeg_problem(main[:2] + app1) == "no image data"
    assert jpeg_problem(b"\x00" * 16) == "no start-of-image marker"


@pytest.mark.parametrize("suffix", [".mrxs", ".czi", ".svslide"])
def test_openslide_backend_is_used_when_importable(tmp_path, monkeypatch, suffix):
    """A stand-in ``openslide`` module is picked up lazily for MIRAX, Zeiss CZI and Sakura SVSLIDE."""
    from PIL import Image

    img = _noise(40, 60)

    class FakeSlide:
        level_dimensions = ((60, 40),)
        level_downsamples = (1.0,)
        properties = {
            "openslide.mpp-x": "0.5",
            "openslide.mpp-y": "0.5",
            "openslide.vendor": "mirax",
        }

        def __init__(self, filename):
            self.filename = filename

        def read_region(self, location, level, size):
            (x, y), (w, h) = location, size
            rgba = np.dstack([padded_slice(img, x, y, w, h), np.full((h, w), 255, np.uint8)])
            return Image.fromarray(rgba, "RGBA")

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "openslide", types.SimpleNamespace(OpenSlide=FakeSlide))
    path = tmp_path / f"slide{suffix}"
    path.write_bytes(b"ZISRAWFILE" if suffix == ".czi" else b"SQLite format 3\0" if suffix == ".svslide" else b"[GENERAL]\n")
    with open_slide(path) as r:
        assert isinstance(r, SlideReader) and r.backend == "openslide"
        assert (r.mpp, r.mpp_source, r.vendor) == (0.5, "openslide", "mirax")
        np.testing.assert_array_equal(r.read_region(5, 6, 20, 10, 0.5), img[6:16, 5:25])


# ---------------------------------------------------------------------------- real slides
@pytest.mark.parametrize(
    ("name", "size", "mpp", "vendor"),
    [
        ("CMU-1-Small-Region.svs", (2220, 2967), 0.499, "aperio"),
        ("OS-1-detail.ome.tif", None, 0.227, "ome"),
        ("OS-2-ndpi.ome.tif", None, 0.227, "ome"),
    ],
)
def test_real_slides_open_read_and_thumbnail(shared_data, name, size, mpp, vendor):
    """The sample slides in ../shared/data/wsi: metadata, exact level-0 pixels, a 0.5 µm read."""
    path = shared_data(f"wsi/{name}")
    with open_slide(path) as r:
        if size is not None:
            assert r.dimensions == size
        assert r.mpp == pytest.approx(mpp, abs=5e-4)
        assert r.vendor == vendor
        w0, h0 = r.dimensions
        x, y = w0 // 2, h0 // 2
        with tifffile.TiffFile(path) as tf:  # tifffile's own decode as the oracle
            truth = tf.series[0].levels[0].asarray()[y : y + 50, x : x + 60]
        np.testing.assert_array_equal(r.read_region(x, y, 60, 50, r.mpp), truth)
        s = 0.5 / r.mpp
        tile = r.read_region(round(x / s), round(y / s), 128, 96, 0.5)
        assert tile.shape == (96, 128, 3) and tile.dtype == np.uint8
        assert tile.std() > 5  # tissue, not a blank fill
        thumb = r.thumbnail(256)
        assert max(thumb.shape[:2]) == 256


def test_openslide_backend_reads_a_real_slide_as_tiffslide_does(shared_data):
    """The real OpenSlide library (MIRAX, DICOM, ... go through it) reads CMU-1 to the bit as tiffslide."""
    from marrowseg.io.openslide import OpenSlideReader, openslide_available
    from marrowseg.io.tiff import TiffReader

    if not openslide_available():
        pytest.skip("OpenSlide is not installed (pip install 'marrowseg[openslide]')")
    path = shared_data("wsi/CMU-1-Small-Region.svs")
    with OpenSlideReader(path) as a, TiffReader(path) as b:
        assert (a.dimensions, a.mpp, a.vendor) == (b.dimensions, b.mpp, b.vendor)
        for x, y, mpp in [(1000, 1500, b.mpp), (300, 700, 1.0), (2000, 2800, 0.5)]:  # the last runs off the edge
            np.testing.assert_array_equal(a.read_region(x, y, 256, 192, mpp), b.read_region(x, y, 256, 192, mpp))
