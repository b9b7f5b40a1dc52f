"""The benchmark's scikit-image baseline: plain SciPy / scikit-image calls, the pipeline's figures."""

from __future__ import annotations

import pytest

from marrowseg import synth
from marrowseg.analyzers import distance, fibres, get_analyzer, reticulin, tissue
from marrowseg.analyzers.ecad import membrane
from marrowseg.analyzers.nuclei import faint, seeds, split
from marrowseg.config import load_config
from marrowseg.engine import analyze_array
from tests._scripts import load_script

MPP = 0.5


def _benchmark():
    return load_script("benchmark")


@pytest.mark.parametrize("stain", ["he", "ecad", "reticulin"])
def test_scikit_image_only_swaps_the_fast_paths_and_gives_the_same_totals(stain):
    bench = _benchmark()
    ph = synth.make_phantom(stain, seed=3, size_px=(640, 640), mpp=MPP)
    rgb = ph.render(0, 0, 640, 640)
    cfg = load_config(stain)
    fast = analyze_array(rgb, MPP, get_analyzer(stain, cfg), cfg, device="cpu")
    before = {(mod, name): getattr(mod, name) for mod, name in ((seeds, "_peak_candidates"), (seeds, "_watershed"),
                                                                 (split, "_watershed"), (split, "_split_boxes_packed"))}
    with bench.scikit_image_only():
        assert seeds._watershed is bench._plain_watershed is split._watershed
        assert split._split_boxes_packed is bench._plain_split and seeds._peak_candidates is bench._plain_peaks
        assert faint.distance_to_background is bench._plain_edt
        assert tissue.distance_to_background is bench._plain_edt and fibres.binary_dilation is bench._plain_dilation
        assert reticulin.distance_to_background is bench._plain_edt
        assert membrane.nearest_label_band is bench._whole_tile_band
        assert fibres.gaussian_zero_border is bench._plain_gaussian
        assert distance._SEPARABLE_MAX_PX == -1  # the ring band's distances by the precise whole-tile transform
        assert fibres.nearest_feature is bench._plain_nearest_feature is tissue.nearest_feature
        assert fibres.label_sums is bench._plain_label_sums
        plain = analyze_array(rgb, MPP, get_analyzer(stain, cfg), cfg, device="cpu")
    assert {(mod, name): getattr(mod, name) for mod, name in before} == before  # restored
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
