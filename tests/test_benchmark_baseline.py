"""The benchmark's scikit-image baseline: plain SciPy / scikit-image calls, the pipeline's figures."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

from marrowseg import analyzers, synth
from marrowseg.analyzers import distance, get_analyzer
from marrowseg.analyzers.ecad import membrane
from marrowseg.analyzers.fibres import overlap, skeleton, width
from marrowseg.analyzers.nuclei import seeds, split
from marrowseg.config import load_config
from marrowseg.engine import analyze_array
from tests._scripts import load_script

MPP = 0.5


def _benchmark():
    return load_script("benchmark")


#: the fast paths the baseline replaces by plain SciPy / scikit-image calls
FAST = ("distance_to_background", "nearest_feature", "nearest_label_band", "binary_dilation", "binary_opening",
        "binary_closing", "label_sums", "gaussian_zero_border", "_peak_candidates", "_watershed", "_split_boxes_packed")


def _importers() -> list[tuple[object, str]]:
    """(module, name) of each analyzer module that imports a fast path of another marrowseg module by name."""
    out = []
    for info in pkgutil.walk_packages(analyzers.__path__, "marrowseg.analyzers."):
        mod = importlib.import_module(info.name)
        for name in FAST:
            fn = getattr(mod, name, None)
            where = getattr(fn, "__module__", "") or ""
            if callable(fn) and where.startswith("marrowseg.") and where != mod.__name__:
                out.append((mod, name))
    return out


@pytest.mark.parametrize("stain", ["he", "ecad", "reticulin"])
def test_scikit_image_only_swaps_the_fast_paths_and_gives_the_same_totals(stain):
    bench = _benchmark()
    ph = synth.make_phantom(stain, seed=3, size_px=(640, 640), mpp=MPP)
    rgb = ph.render(0, 0, 640, 640)
    cfg = load_config(stain)
    fast = analyze_array(rgb, MPP, get_analyzer(stain, cfg), cfg, device="cpu")
    # every module that calls a fast path by an imported name, and the modules that define and call one
    where = _importers() + [(skeleton, "label_sums"), (overlap, "gaussian_zero_border"),
                            (seeds, "_peak_candidates"), (split, "_split_boxes_packed")]
    assert len(where) >= 20 and (membrane, "nearest_label_band") in where and (width, "nearest_feature") in where
    before = {(mod, name): getattr(mod, name) for mod, name in where}
    with bench.scikit_image_only():
        for mod, name in where:
            assert getattr(mod, name) is not before[(mod, name)], f"{mod.__name__}.{name} not swapped"
        assert seeds._watershed is bench._plain_watershed is split._watershed
        assert split._split_boxes_packed is bench._plain_split and seeds._peak_candidates is bench._plain_peaks
        assert membrane.nearest_label_band is bench._whole_tile_band
        assert distance._SEPARABLE_MAX_PX == -1  # the ring band's distances by the precise whole-tile transform
        plain = analyze_array(rgb, MPP, get_analyzer(stain, cfg), cfg, device="cpu")
    assert {(mod, name): getattr(mod, name) for mod, name in where} == before  # restored
    assert distance._SEPARABLE_MAX_PX > 0
    assert len(fast.cells.get("x", [])) == len(plain.cells.get("x", []))
    # every fast path is exact but OpenCV's Gaussian (float rounding: 1e-9 of a fibre length)
    _same(fast.report["readouts"], plain.report["readouts"])
    for a, b in zip(fast.tiles, plain.tiles, strict=True):
        _same(a, b)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, float) and not float(v).is_integer():
            assert b[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
        else:
            assert b[k] == v, k
