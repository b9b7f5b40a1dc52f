"""The learned nuclear mask (``he.nuclei.mask_net``): packaged weights, module output, detection."""

from __future__ import annotations

import numpy as np
import pytest

from marrowseg import synth
from marrowseg.analyzers import get_analyzer, nuclei
from marrowseg.analyzers.nuclei_model import WEIGHTS_DIR, load_mask_net
from marrowseg.config import load_config
from marrowseg.engine import analyze_array
from marrowseg.errors import ConfigError
from tests._scripts import load_script

ON = {"he": {"nuclei": {"mask_net": True}}}


def test_packaged_mask_net_loads_without_pickled_code():
    net = load_mask_net()  # weights_only=True inside: a state dict, no code
    assert (WEIGHTS_DIR / "nuclear_mask_monuseg.pt").stat().st_size < 1_000_000
    assert sum(p.numel() for p in net.parameters()) < 200_000


def test_mask_net_is_refused_off_its_training_resolution():
    cfg = load_config("he", overrides={"he": {"mpp": 0.25, "nuclei": {"mask_net": True}}})
    with pytest.raises(ConfigError, match="mask_net"):
        get_analyzer("he", cfg)


def test_module_gives_a_nuclear_probability_dark_on_nuclei():
    ph = synth.make_phantom("he", seed=4, size_px=(384, 384), mpp=0.5)
    rgb = ph.render(0, 0, 384, 384)
    cfg = load_config("he", overrides=ON)
    an = get_analyzer("he", cfg)
    import torch

    with torch.inference_mode():
        out = an.module(torch.from_numpy(rgb).permute(2, 0, 1)[None].float())
    prob = out["nuclear_prob"][0, 0].numpy()
    assert prob.shape == rgb.shape[:2] and prob.min() >= 0 and prob.max() <= 1
    h = out["h_od"][0, 0].numpy()
    # nuclei are where the haematoxylin is dense: the net must agree with that much
    assert prob[h > np.quantile(h, 0.95)].mean() > prob[h < np.quantile(h, 0.5)].mean() + 0.4


def test_detect_nuclei_takes_the_given_mask():
    ph = synth.make_phantom("he", seed=5, size_px=(256, 256), mpp=0.5)
    cfg = load_config("he")
    an = get_analyzer("he", cfg)
    dense = {k: v[0] for k, v in an.reference_dense(ph.render(0, 0, 256, 256)).items()}
    h = dense["h_od"]
    kw = {"peak_map": dense["peak"], "mask_map": dense["mask"]}
    _, base = nuclei.detect_nuclei(h, 0.5, cfg.he.nuclei, **kw)
    _, none = nuclei.detect_nuclei(h, 0.5, cfg.he.nuclei, mask=np.zeros(h.shape, bool), **kw)
    half = np.zeros(h.shape, bool)
    half[:, : h.shape[1] // 2] = True
    _, left = nuclei.detect_nuclei(h, 0.5, cfg.he.nuclei, mask=half, **kw)
    assert len(base["row"]) > 20 and len(none["row"]) == 0
    assert 0 < len(left["row"]) < len(base["row"]) and (left["col"] < h.shape[1] / 2).all()


def test_mask_net_finds_the_cells_of_real_marrow_it_never_saw(shared_data):
    # trained on MoNuSeg (other organs) only: bone marrow is held out entirely
    ev = load_script("eval_cell_detection")
    folder = shared_data("mbm-dev")
    img, dots = ev.mbm_pairs(folder)[0]
    rgb, truth = ev.read_rgb(img), ev.dots_rc(dots)
    pred = ev.detect(rgb, 0.25, ON)
    tp = ev.match(pred, truth, 8.0)
    f1 = 2 * tp / (len(pred) + len(truth))
    assert f1 > 0.85, (f1, len(pred), len(truth))


def test_engine_runs_he_with_the_mask_net():
    ev = load_script("eval_cell_detection")
    ph = synth.make_phantom("he", seed=6, size_px=(512, 512), mpp=0.5)
    cfg = load_config("he", overrides=ON)
    res = analyze_array(ph.render(0, 0, 512, 512), 0.5, get_analyzer("he", cfg), cfg, device="cpu")
    tc = ph.truth_region(0, 0, 512, 512)["cells"]
    truth = np.column_stack([np.asarray(tc["y_px"], float), np.asarray(tc["x_px"], float)])
    pred = np.column_stack([np.asarray(res.cells["y"], float), np.asarray(res.cells["x"], float)])
    tp = ev.match(pred, truth, 8.0)
    assert res.report["readouts"]["nucleated_cells"] == len(pred)
    # the phantom's nuclei are not MoNuSeg's, but their cells must still be found where they are
    assert 2 * tp / (len(pred) + len(truth)) > 0.7
    # and the regions are the net's, not the thresholds' (the same seeds, other outlines)
    cfg0 = load_config("he")
    classical = analyze_array(ph.render(0, 0, 512, 512), 0.5, get_analyzer("he", cfg0), cfg0, device="cpu")
    a0, a1 = np.sort(classical.cells["area_um2"]), np.sort(res.cells["area_um2"])
    assert len(a0) != len(a1) or not np.allclose(a0, a1)


def test_mask_net_with_distance_seeds_counts_phantom_cells_within_10_pct():
    # the pairing docs/validation.md measures: the net's mask keeps touching nuclei apart, so one
    # seed per distance maximum splits them (classical thresholds and peaks: about -13 %)
    ph = synth.make_phantom("he", seed=1009, size_px=(1024, 1024), mpp=0.5)
    cfg = load_config("he", overrides={"he": {"nuclei": {"mask_net": True, "seeds": "distance"}}})
    res = analyze_array(ph.render(0, 0, 1024, 1024), 0.5, get_analyzer("he", cfg), cfg, device="cpu")
    n_true = len(ph.truth_region(0, 0, 1024, 1024)["cells"]["id"])
    assert abs(res.report["readouts"]["nucleated_cells"] - n_true) / n_true < 0.10


def test_a_given_mask_gets_no_seeds_for_its_pale_components():
    # seed_unseeded was chosen for the thresholded mask; a learned mask marks pale bodies too,
    # and seeding them over-counted real marrow by 12 % (3,904 -> 4,355 calls for 3,805 cells)
    cfg = load_config("he").he.nuclei
    assert cfg.seed_unseeded and cfg.min_peak_od > 0.15
    yy, xx = np.mgrid[:96, :96]
    dark = (yy - 30) ** 2 + (xx - 30) ** 2 <= 7**2  # 7 px = 3.5 µm radius at 0.5 µm/px
    pale = (yy - 66) ** 2 + (xx - 66) ** 2 <= 7**2
    h = np.where(dark, 0.8, np.where(pale, 0.15, 0.0)).astype(np.float32)
    _, table = nuclei.detect_nuclei(h, 0.5, cfg, mask=dark | pale)
    assert len(table["row"]) == 1 and abs(table["row"][0] - 30) < 2 and abs(table["col"][0] - 30) < 2
    # the thresholded mask's own rule is still on: a pale-but-dense-enough body there is seeded
    assert len(nuclei.unseeded_components(dark | pale, dark | pale, h, np.array([[30, 30]]), 20)) == 1
