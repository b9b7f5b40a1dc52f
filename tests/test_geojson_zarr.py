"""GeoJSON (QuPath) and OME-Zarr (NGFF 0.4) writers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from marrowseg.analyzers.base import LabelClass
from marrowseg.outputs.geojson import label_polygons, write_cells_geojson, write_regions_geojson
from marrowseg.outputs.ome_zarr import read_level, write_ome_zarr

CLASSES = (LabelClass(0, "excluded", (0, 0, 0)), LabelClass(1, "haematopoietic", (200, 40, 120)),
           LabelClass(2, "fat", (250, 230, 140)))


def test_square_with_hole_gives_outer_ring_and_hole():
    """A filled square with a hole: one polygon, two closed rings, area-consistent bounds."""
    m = np.zeros((20, 20), bool)
    m[2:18, 2:18] = True
    m[8:12, 8:12] = False
    polys = label_polygons(m)
    assert len(polys) == 1 and len(polys[0]) == 2
    outer, hole = polys[0]
    assert (outer[0] == outer[-1]).all() and (hole[0] == hole[-1]).all()
    assert outer[:, 0].min() == 2 and outer[:, 0].max() == 17
    assert 7 <= hole[:, 0].min() and hole[:, 0].max() <= 12


def test_empty_and_single_pixel_masks_give_no_polygons():
    """Nothing, or objects thinner than a ring, give no polygons (never invalid rings)."""
    assert label_polygons(np.zeros((5, 5), bool)) == []
    m = np.zeros((5, 5), bool)
    m[2, 2] = True
    assert label_polygons(m) == []


def test_regions_are_scaled_to_level0(tmp_path):
    """Map pixel centres are scaled to level-0 pixels; one annotation per class present."""
    lab = np.zeros((10, 10), np.uint8)
    lab[0:5, 0:5] = 1
    lab[5:10, 5:10] = 2
    n = write_regions_geojson(lab, tmp_path / "r.geojson", CLASSES, scale_px=4.0, area_um2_per_px=4.0)
    doc = json.loads((tmp_path / "r.geojson").read_text())
    assert n == 2 and doc["type"] == "FeatureCollection"
    f1 = doc["features"][0]
    assert f1["properties"]["classification"] == {"name": "haematopoietic", "color": [200, 40, 120]}
    xy = np.asarray(f1["geometry"]["coordinates"][0][0])
    assert xy.min() == 2.0 and xy.max() == 18.0  # (0 + 0.5) * 4, (4 + 0.5) * 4
    assert f1["properties"]["measurements"]["area_um2"] == 100.0


def test_cells_geojson_from_csv(tmp_path):
    """Each CSV row becomes a detection Point with class colour and numeric measurements."""
    (tmp_path / "cells.csv").write_text("x,y,x_um,y_um,tile,class,area_um2,flag\n"
                                        "10.5,20,5.25,10,0,fat,30.5,abc\n1,2,0.5,1,0,unknown,nan,1\n")
    n = write_cells_geojson(tmp_path / "cells.csv", tmp_path / "c.geojson", CLASSES)
    doc = json.loads((tmp_path / "c.geojson").read_text())
    assert n == 2
    a, b = doc["features"]
    assert a["geometry"] == {"type": "Point", "coordinates": [10.5, 20.0]}
    assert a["properties"]["objectType"] == "detection"
    assert a["properties"]["classification"] == {"name": "fat", "color": [250, 230, 140]}
    assert a["properties"]["measurements"] == {"area_um2": 30.5}
    assert b["properties"]["classification"]["color"] == [255, 255, 0] and "area_um2" not in b["properties"]["measurements"]


def test_empty_cells_csv_gives_empty_collection(tmp_path):
    """No cells: a valid, empty FeatureCollection."""
    (tmp_path / "cells.csv").write_text("x,y,x_um,y_um,tile,class\n")
    write_cells_geojson(tmp_path / "cells.csv", tmp_path / "c.geojson")
    assert json.loads((tmp_path / "c.geojson").read_text()) == {"type": "FeatureCollection", "features": []}


@pytest.mark.parametrize("shape", [(300, 517), (64, 64), (1000, 3)])
def test_ome_zarr_pyramid_and_metadata(tmp_path, shape):
    """Levels halve (nearest for labels, max for binary maps); scales double; labels/ lists the rest."""
    rng = np.random.default_rng(1)
    src = zarr.open_group(str(tmp_path / "labels.zarr"), mode="w", zarr_format=3)
    lab = rng.integers(0, 3, shape, dtype=np.uint8)
    fib = (rng.random(shape) > 0.97).astype(np.uint8)
    src.create_array("labels", shape=shape, chunks=(128, 128), dtype=np.uint8)[:] = lab
    src.create_array("fibres", shape=shape, chunks=(128, 128), dtype=np.uint8)[:] = fib
    dst = write_ome_zarr(tmp_path / "labels.zarr", tmp_path / "m.ome.zarr", mpp=2.0, label_classes=CLASSES,
                         chunk_px=64, min_side_px=32)
    g = zarr.open_group(str(dst), mode="r")
    ms = g.attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["unit"] for a in ms["axes"]] == ["micrometer"] * 2
    for k, ds in enumerate(ms["datasets"]):
        assert ds["coordinateTransformations"][0]["scale"] == [2.0 * 2**k] * 2
        want = lab[:: 2**k, :: 2**k]
        np.testing.assert_array_equal(g[ds["path"]][:], want)
    assert max(g[ms["datasets"][-1]["path"]].shape) <= 32
    assert g["labels"].attrs["labels"] == ["fibres"]
    f1 = g["labels/fibres/1"][:]
    h, w = shape
    pad = np.pad(fib, ((0, h % 2), (0, w % 2)))
    np.testing.assert_array_equal(f1, pad.reshape(pad.shape[0] // 2, 2, pad.shape[1] // 2, 2).max(axis=(1, 3)))
    assert g["labels/fibres"].attrs["image-label"]["source"]["image"] == "../../"
    arr, mpp = read_level(dst, max_side_px=(max(shape) + 1) // 2)
    assert mpp == 4.0 and arr.shape == g["1"].shape
    assert (dst / "0" / ".zarray").is_file()  # zarr v2 with '/' chunk keys, as NGFF 0.4 requires
    assert json.loads((dst / "0" / ".zarray").read_text())["dimension_separator"] == "/"
