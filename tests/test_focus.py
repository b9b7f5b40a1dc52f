"""Tile focus (marrowseg.focus) and the engine's out-of-focus summary."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from marrowseg import synth
from marrowseg.analyzers.he import HEAnalyzer
from marrowseg.config import load_config
from marrowseg.engine import analyze_array
from marrowseg.focus import tile_focus

MPP = 0.5


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    return synth.make_phantom("he", seed=1090, size_px=(3072, 3072), mpp=MPP).render(0, 0, 3072, 3072)


def test_focus_falls_with_blur_and_needs_tissue(field):
    core = (slice(0, 1024), slice(0, 1024))
    sharp, n = tile_focus(field[:1024, :1024], core, MPP, min_tissue_um2=10000)
    assert n > 0 and sharp > 0.3
    values = [tile_focus(cv2.GaussianBlur(field[:1024, :1024], (0, 0), s / MPP), core, MPP, min_tissue_um2=10000)[0]
              for s in (0.5, 1.5, 3.0)]
    assert sharp > values[0] > values[1] > values[2] and values[1] < 0.15
    glass = np.full((512, 512, 3), 240, np.uint8)
    assert tile_focus(glass, (slice(0, 512), slice(0, 512)), MPP, min_tissue_um2=10000) == (None, 0)


def test_a_half_blurred_field_reports_its_out_of_focus_share(field):
    """Tiles over the blurred half are flagged, the sharp half not; tiles.csv rows carry the value."""
    blurred = field.copy()
    blurred[:1536] = cv2.GaussianBlur(field[:1536], (0, 0), 1.5 / MPP)
    cfg = load_config("he")
    res = analyze_array(blurred, MPP, HEAnalyzer(cfg.he), cfg, device="cpu")
    t = res.report["tiles"]
    assert t["focus_judged_tiles"] == len(res.tiles)
    top = [r["out_of_focus"] for r in res.tiles if r["row_px"] < 1536]
    bottom = [r["out_of_focus"] for r in res.tiles if r["row_px"] >= 1536]
    assert all(top) and not any(bottom)
    assert 0.3 < t["out_of_focus_frac"] < 0.7
    sharp = analyze_array(field, MPP, HEAnalyzer(cfg.he), cfg, device="cpu").report["tiles"]
    assert sharp["out_of_focus_tiles"] == 0 and sharp["out_of_focus_frac"] == 0.0


def test_focus_is_the_same_from_tile_workers_and_in_process(field):
    cfg = load_config("he")
    img = np.ascontiguousarray(field[:2048, :2048])
    rows = [analyze_array(img, MPP, HEAnalyzer(cfg.he), cfg, device="cpu", workers=w).tiles for w in (0, 2)]
    assert [r["focus"] for r in rows[0]] == [r["focus"] for r in rows[1]]
    assert all(r["focus"] is not None for r in rows[0])
