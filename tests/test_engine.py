"""The batched engine: exact sums, invariance to batching and workers, de-duplication, failures."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from marrowseg.config import load_config
from marrowseg.engine import plan_slide, run_slide
from marrowseg.errors import NoTissueError, SlideError
from marrowseg.io import open_slide
from marrowseg.outputs.sink import FileSink
from tests.toy_analyzer import DiscAnalyzer, disc_image


def _cfg(tile_px=128, overlap_px=0, **engine):
    over = {"tiling": {"tile_px": tile_px, "overlap_px": overlap_px},
            "engine": {"device": "cpu", "workers": 0, **engine}}
    return load_config(overrides=over)


def _run(img, mpp=1.0, analyzer=None, **kw):
    analyzer = analyzer or DiscAnalyzer()
    cfg = kw.pop("config", None) or _cfg()
    with open_slide(img, mpp=mpp) as reader:
        return run_slide(reader, analyzer, cfg, **kw)


def test_totals_are_exact_sums_over_the_whole_image():
    """Dark pixels summed over tile cores equal the count on the untiled image."""
    img, centres = disc_image()
    res = _run(img)
    whole = DiscAnalyzer().module(
        __import__("torch").from_numpy(img).permute(2, 0, 1)[None].float())["od"][0].numpy()
    assert res.totals["dark_px"] == int((whole > 0.3).sum())
    assert res.totals["core_px"] == img.shape[0] * img.shape[1]


def test_each_disc_is_counted_once_across_tile_overlaps():
    """Discs straddling tile borders appear in two tiles but are counted by one core."""
    img, centres = disc_image(n=60, seed=3)
    res = _run(img, config=_cfg(tile_px=96, overlap_px=40))
    assert res.totals["n_discs"] == len(centres)
    cells = res.cells
    assert len(cells["x"]) == len(centres)
    # every truth centre has a detection within a pixel (x, y are level-0 pixel indices)
    d = np.hypot(cells["y"][:, None] - centres[None, :, 0], cells["x"][:, None] - centres[None, :, 1])
    assert (d.min(axis=0) < 1.0).all()


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_results_do_not_depend_on_batch_size(batch_size):
    img, _ = disc_image(seed=5)
    ref = _run(img, batch_size=1)
    res = _run(img, batch_size=batch_size)
    assert res.totals == ref.totals
    assert res.windows == ref.windows
    np.testing.assert_array_equal(res.maps["labels"], ref.maps["labels"])
    np.testing.assert_array_equal(res.cells["x"], ref.cells["x"])


def test_results_do_not_depend_on_worker_processes(tmp_path):
    img, _ = disc_image(seed=6)
    path = tmp_path / "discs.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64), resolution=(1e4, 1e4),
                     resolutionunit="CENTIMETER")  # 1 µm/px
    cfg0 = _cfg(tile_px=128, overlap_px=16)
    with open_slide(path) as reader:
        r0 = run_slide(reader, DiscAnalyzer(), cfg0, workers=0)
        r2 = run_slide(reader, DiscAnalyzer(), cfg0, workers=2, batch_size=256)
    assert r2.provenance["device"]["workers"] == 2
    # a batch of tiles must not pin a slide to one worker: both take tiles
    per = r2.provenance["device"]["tiles_per_worker"]
    assert len(per) == 2 and min(per) > 0 and sum(per) == len(r2.tiles)
    assert r0.totals == r2.totals
    assert r0.windows == r2.windows
    np.testing.assert_array_equal(r0.maps["labels"], r2.maps["labels"])


def test_window_stats_sum_to_the_total():
    img, _ = disc_image(seed=8)
    res = _run(img)
    assert sum(w["dark_px"] for w in res.windows.values()) == res.totals["dark_px"]
    # windows are slide-aligned 40 µm squares
    assert max(k[0] for k in res.windows) <= img.shape[0] // 40


def test_maps_are_stitched_at_the_map_resolution():
    img, _ = disc_image(seed=9)
    res = _run(img, analyzer=DiscAnalyzer(downsample=2), config=_cfg(tile_px=100, overlap_px=10))
    full = _run(img).maps["labels"]
    assert res.maps["labels"].shape == ((img.shape[0] + 1) // 2, (img.shape[1] + 1) // 2)
    np.testing.assert_array_equal(res.maps["labels"], full[::2, ::2])


def test_analysis_at_coarser_mpp_reports_areas_in_um2():
    """The same field analysed at 1 and 2 µm/px gives the same dark area in µm² (within 10 %)."""
    img, _ = disc_image(n=30, radius_px=8, seed=10)
    a1 = _run(img, mpp=1.0, analyzer=DiscAnalyzer(mpp=1.0)).report["areas_um2"]["dark"]
    a2 = _run(img, mpp=1.0, analyzer=DiscAnalyzer(mpp=2.0)).report["areas_um2"]["dark"]
    assert a2 == pytest.approx(a1, rel=0.10)


class _FlakyReader:
    """Wraps a reader; reading one tile raises like a corrupt JPEG tile would."""

    def __init__(self, reader, bad_origin):
        self._r = reader
        self._bad = bad_origin

    def __getattr__(self, name):
        return getattr(self._r, name)

    def read_region(self, x_px, y_px, w_px, h_px, mpp):
        if (y_px, x_px) == self._bad:
            raise SlideError(f"{self._r.name}: cannot decode region x={x_px},y={y_px} (corrupt tile)")
        return self._r.read_region(x_px, y_px, w_px, h_px, mpp)


def test_corrupt_tile_is_reported_and_excluded_not_zero(caplog):
    img, _ = disc_image(seed=11)
    cfg = _cfg(tile_px=128)
    with open_slide(img, mpp=1.0) as reader:
        layout = plan_slide(reader, DiscAnalyzer(), cfg)
        bad = layout.tiles[3]
        flaky = _FlakyReader(reader, bad.origin_px)
        res = run_slide(flaky, DiscAnalyzer(), cfg)
    rows = {r["tile"]: r for r in res.tiles}
    assert rows[3]["status"] == "missing" and "corrupt tile" in rows[3]["error"]
    assert res.report["tiles"]["missing"] == 1
    core = bad.core_slide
    assert res.report["tiles"]["missing_area_um2"] == (core[0].stop - core[0].start) * (core[1].stop - core[1].start)
    assert res.totals["core_px"] == img.shape[0] * img.shape[1] - res.report["tiles"]["missing_area_um2"]
    assert "unreadable" in caplog.text


def _slide_with_a_cut_short_tile(tmp_path):
    """512 px JPEG-tiled TIFF whose tile at level-0 pixels [64:128, 64:128] is cut to a third."""
    img, _ = disc_image(shape=(512, 512), n=40, seed=12)
    path = tmp_path / "short.tif"
    tifffile.imwrite(path, img, tile=(64, 64), compression="jpeg", photometric="rgb")
    with tifffile.TiffFile(path, mode="r+b") as tf:
        tag = tf.pages.first.tags["TileByteCounts"]
        counts = list(tag.value)
        counts[9] //= 3  # tile row 1, col 1
        tag.overwrite(counts)
    return str(path), img


def test_cut_short_jpeg_tile_marks_its_tiles_missing_and_the_slide_goes_on(tmp_path, caplog):
    """One cut-short JPEG tile in a single-level slide: the overview is read around it, the
    analysis tiles over it are missing (area excluded), every other tile is analysed."""
    path, img = _slide_with_a_cut_short_tile(tmp_path)
    cfg = _cfg(tile_px=128)
    res = _run(path, config=cfg)
    missing = [r for r in res.tiles if r["status"] == "missing"]
    assert missing and len(missing) < len(res.tiles)
    assert all("corrupt JPEG tile at x=64,y=64" in r["error"] for r in missing)
    assert res.report["tiles"]["missing"] == len(missing)
    assert res.totals["core_px"] == img.shape[0] * img.shape[1] - res.report["tiles"]["missing_area_um2"]
    assert "will be reported missing" in caplog.text


def test_a_slide_whose_every_tile_fails_says_why(tmp_path):
    """One analysis tile over the cut-short chunk: the error names the file once and the reason."""
    from marrowseg.errors import AnalysisError

    path, _ = _slide_with_a_cut_short_tile(tmp_path)
    with pytest.raises(AnalysisError) as info:
        _run(path, config=_cfg(tile_px=1024))
    assert str(info.value).startswith(
        "short.tif: every tile failed to read (1 tiles; the first: corrupt JPEG tile at x=64,y=64 of level 0: "
    )


@pytest.mark.parametrize(("drawn", "analysed", "mismatch"), [
    ("he", "he", False), ("ecad", "ecad", False), ("reticulin", "he", True), ("he", "reticulin", True),
    ("he", "ecad", True), ("ecad", "he", True),
])
def test_plan_checks_the_stain_against_the_slide_colours(drawn, analysed, mismatch, caplog):
    """A slide analysed as another stain than its colours show is warned about and recorded."""
    from marrowseg import synth
    from marrowseg.analyzers import get_analyzer

    ph = synth.make_phantom(drawn, seed=3, size_px=(1024, 1024), mpp=1.0)
    cfg = load_config(analysed)
    with open_slide(ph.render(0, 0, 1024, 1024), mpp=1.0) as reader:
        check = plan_slide(reader, get_analyzer(analysed, cfg), cfg).tissue["stain_check"]
    assert check["looks_like"] == drawn and check["mismatch"] is mismatch
    assert ("is the stain right?" in caplog.text) is mismatch


@pytest.mark.parametrize(("stain", "scan_mpp", "too_coarse"), [("he", 1.0, False), ("he", 3.0, True),
                                                              ("ecad", 0.5, False), ("ecad", 1.0, True)])
def test_plan_flags_a_scan_coarser_than_the_analyzer_was_validated_at(stain, scan_mpp, too_coarse, caplog):
    """A 10x scan is upsampled for the E-cadherin membrane ring without a word otherwise."""
    from marrowseg import synth
    from marrowseg.analyzers import get_analyzer

    ph = synth.make_phantom(stain, seed=3, size_px=(512, 512), mpp=scan_mpp)
    cfg = load_config(stain)
    with open_slide(ph.render(0, 0, 512, 512), mpp=scan_mpp) as reader:
        check = plan_slide(reader, get_analyzer(stain, cfg), cfg).tissue["resolution_check"]
    assert check["scan_mpp"] == scan_mpp and check["too_coarse"] is too_coarse
    assert ("coarser than the" in caplog.text) is too_coarse


@pytest.mark.parametrize(("stain", "scan_mpp"), [("he", 4.5), ("ecad", 1.5), ("reticulin", 2.5)])
def test_plan_refuses_a_scan_far_coarser_than_the_analyzer_resolves(stain, scan_mpp):
    """Past twice the validated pixel size nothing the analyzer measures is resolved; the slide is
    refused before its upsampled tiles cost minutes (an --mpp of 50 given to a 512-px tile: 1,156 tiles)."""
    from marrowseg import synth
    from marrowseg.analyzers import get_analyzer
    from marrowseg.slide_checks import COARSE_SCAN_REFUSED

    cfg = load_config(stain)
    analyzer = get_analyzer(stain, cfg)
    assert scan_mpp > COARSE_SCAN_REFUSED * analyzer.max_scan_mpp
    ph = synth.make_phantom(stain, seed=3, size_px=(512, 512), mpp=scan_mpp)
    with open_slide(ph.render(0, 0, 512, 512), mpp=scan_mpp) as reader:
        with pytest.raises(SlideError, match="coarser than .* not resolved"):
            plan_slide(reader, analyzer, cfg)
    with open_slide(ph.render(0, 0, 512, 512), mpp=COARSE_SCAN_REFUSED * analyzer.max_scan_mpp) as reader:
        assert plan_slide(reader, analyzer, cfg).tissue["resolution_check"]["too_coarse"]


def test_blank_slide_raises_no_tissue():
    img = np.full((300, 300, 3), 246, np.uint8)
    with pytest.raises(NoTissueError, match="no tissue"):
        _run(img)


def test_file_sink_writes_the_same_maps_and_cells_as_memory(tmp_path):
    img, _ = disc_image(seed=12)
    cfg = _cfg(tile_px=128, overlap_px=16)
    mem = _run(img, config=cfg)
    sink = FileSink(tmp_path, chunk_px=64)
    with open_slide(img, mpp=1.0) as reader:
        run_slide(reader, DiscAnalyzer(), cfg, sink=sink)
    sink.commit()
    z = zarr.open_group(str(tmp_path / "labels.zarr"), mode="r")
    np.testing.assert_array_equal(np.asarray(z["labels"]), mem.maps["labels"])
    assert z.attrs["marrowseg"]["mpp"] == 1.0
    lines = (tmp_path / "cells.csv").read_text().splitlines()
    assert lines[0].split(",")[:6] == ["x", "y", "x_um", "y_um", "tile", "class"]
    assert len(lines) - 1 == len(mem.cells["x"])
    assert not list(tmp_path.glob(".*tmp*"))


def test_prepare_gets_a_pixel_sample():
    img, _ = disc_image(seed=13)
    an = DiscAnalyzer()
    res = _run(img, analyzer=an)
    assert an.prepared[1] == 3 and an.prepared[0] > 1000
    assert res.provenance["prepare"]["n_sample"] == an.prepared[0]


@pytest.mark.parametrize("post_threads", [0, 2])
def test_results_do_not_depend_on_post_threads(post_threads):
    """Post-processing in threads is consumed in tile order: identical sums, maps and cells."""
    img, _ = disc_image(seed=14)
    ref = _run(img, config=_cfg(post_threads=0))
    res = _run(img, config=_cfg(post_threads=post_threads), batch_size=3)
    assert res.totals == ref.totals and res.windows == ref.windows
    np.testing.assert_array_equal(res.maps["labels"], ref.maps["labels"])
    np.testing.assert_array_equal(res.cells["x"], ref.cells["x"])
    assert [r["tile"] for r in res.tiles] == [r["tile"] for r in ref.tiles]


def test_an_error_inside_post_propagates():
    """A bug in an analyzer is not a missing tile: it stops the slide with its traceback."""

    class Broken(DiscAnalyzer):
        def post(self, dense, rgb, ctx):
            raise RuntimeError("analyzer bug")

    img, _ = disc_image(seed=15)
    with pytest.raises(RuntimeError, match="analyzer bug"):
        _run(img, analyzer=Broken(), config=_cfg(post_threads=1))


class _SlowFirstTile(DiscAnalyzer):
    """Tile 0 takes long: the other worker must go on with the next tiles meanwhile."""

    def post(self, dense, rgb, ctx):
        if ctx.index == 0:
            import time

            time.sleep(1.5)
        return super().post(dense, rgb, ctx)


def test_a_free_worker_takes_the_next_tile_and_results_stay_in_tile_order(tmp_path):
    img, _ = disc_image(seed=8)
    path = tmp_path / "discs.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64), resolution=(1e4, 1e4),
                     resolutionunit="CENTIMETER")
    cfg = _cfg(tile_px=64, overlap_px=8, prefetch_batches=1)
    with open_slide(path) as reader:
        r0 = run_slide(reader, DiscAnalyzer(), cfg, workers=0)
        r2 = run_slide(reader, _SlowFirstTile(), cfg, workers=2)
    per = r2.provenance["device"]["tiles_per_worker"]
    assert len(r2.tiles) >= 8
    # in turn, each worker would take every other tile whatever the time they take
    assert max(per) > min(per) + 2, per
    assert [r["tile"] for r in r2.tiles] == [r["tile"] for r in r0.tiles]
    assert r0.totals == r2.totals and r0.windows == r2.windows
    np.testing.assert_array_equal(r0.cells["x"], r2.cells["x"])
    np.testing.assert_array_equal(r0.maps["labels"], r2.maps["labels"])


def test_an_error_inside_post_propagates_from_tile_workers(tmp_path):
    """On the CPU with worker processes each worker runs whole tiles: an analyzer bug still stops the slide."""

    class Broken(DiscAnalyzer):
        def post(self, dense, rgb, ctx):
            raise RuntimeError("analyzer bug")

    img, _ = disc_image(seed=16)
    path = tmp_path / "discs.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64), resolution=(1e4, 1e4),
                     resolutionunit="CENTIMETER")
    with open_slide(path) as reader, pytest.raises(RuntimeError, match="analyzer bug"):
        run_slide(reader, Broken(), _cfg(), workers=2)


def test_corrupt_tile_in_a_tile_worker_is_reported_and_excluded(tmp_path):
    """A read failure inside a worker that runs whole tiles marks the tile missing, as in-process."""
    img, _ = disc_image(seed=17)
    path = tmp_path / "discs.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64), resolution=(1e4, 1e4),
                     resolutionunit="CENTIMETER")
    cfg = _cfg(tile_px=128)
    with open_slide(path) as reader:
        layout = plan_slide(reader, DiscAnalyzer(), cfg)
        flaky = _FlakyReader(reader, layout.tiles[2].origin_px)
        r2 = run_slide(flaky, DiscAnalyzer(), cfg, workers=2)
        r0 = run_slide(flaky, DiscAnalyzer(), cfg, workers=0)
    assert r2.provenance["device"]["tile_workers"]
    assert r2.report["tiles"]["missing"] == 1
    assert r2.totals == r0.totals


@pytest.mark.parametrize("stain", ["he", "ecad", "reticulin"])
def test_module_maps_do_not_depend_on_threads_or_batch(stain):
    """The engine hands modules contiguous planes; on them each tile's maps are the same to the bit
    whatever the torch thread count (workers run one thread, the main process several) and
    whichever tiles share its batch."""
    import torch

    from marrowseg.analyzers import get_analyzer
    from marrowseg.engine import planar

    rng = np.random.default_rng(3)
    rgb = rng.integers(40, 250, size=(2, 160, 192, 3), dtype=np.uint8)
    rgb[0, 40:90, 50:120] //= 3  # a dark patch, so thresholds and filters see structure
    analyzer = get_analyzer(stain, load_config(stain))
    analyzer.prepare(np.zeros((0, 3), np.uint8))
    module = analyzer.module.eval()
    t = torch.from_numpy(rgb)
    x = planar(t)
    assert x.is_contiguous() and x.shape == (2, 3, 160, 192) and x.dtype == torch.float32
    assert torch.equal(x, t.permute(0, 3, 1, 2).float())
    threads = torch.get_num_threads()
    runs = []
    try:
        for n, batch in [(1, x), (2, x), (1, x[:1]), (2, x[:1])]:
            torch.set_num_threads(n)
            with torch.inference_mode():
                runs.append({k: v[:1] for k, v in module(batch).items()})
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for k in other:
            assert torch.equal(other[k], runs[0][k]), k


def test_post_threads_take_the_cores_the_decode_workers_leave_beside_a_gpu(monkeypatch):
    """Beside an accelerator post carries all the CPU work; on the CPU the module's threads share the cores."""
    from marrowseg import engine

    monkeypatch.setattr(engine, "_available_cores", lambda: 16)
    assert engine._resolve_post_threads("auto", "cuda", 4) == 11
    assert engine._resolve_post_threads("auto", "cpu", 0) == 1
    assert engine._resolve_post_threads(3, "cuda", 4) == 3
    monkeypatch.setattr(engine, "_available_cores", lambda: 2)
    assert engine._resolve_post_threads("auto", "cuda", 1) == 1


def test_auto_cpu_workers_stay_within_the_memory_budget(monkeypatch, tmp_path):
    """On many cores the automatic worker count stops where the analyzer's memory estimate meets the budget."""
    from types import SimpleNamespace

    from marrowseg import engine
    from marrowseg.analyzers.ecad import ECadAnalyzer

    monkeypatch.setattr(engine, "_available_cores", lambda: 16)
    reader = SimpleNamespace(path=tmp_path / "slide.tiff")
    analyzer = ECadAnalyzer(load_config("ecad").ecad)
    est = analyzer.memory_estimate_mb
    assert est(2048, 4) - est(2048, 3) == pytest.approx(est(2048, 1) - est(2048, 0))  # linear in workers
    assert est(2048, 1) > est(1024, 1)
    budget = est(2048, 5) + 1.0
    n = engine._resolve_workers("auto", reader, "cpu", analyzer=analyzer, tile_px=2048, memory_mb=budget)
    assert n == 5
    # unbounded: one per core up to 8; smaller tiles fit more workers in the same budget
    monkeypatch.setattr(engine, "_memory_budget_mb", lambda mb: mb)
    assert engine._resolve_workers("auto", reader, "cpu", analyzer=analyzer, tile_px=2048, memory_mb=None) == 8
    assert engine._resolve_workers("auto", reader, "cpu", analyzer=analyzer, tile_px=1024, memory_mb=budget) == 8
    # never below one worker, an explicit count is taken as given, and a GPU's decode workers are light
    assert engine._resolve_workers("auto", reader, "cpu", analyzer=analyzer, tile_px=2048, memory_mb=300) == 1
    assert engine._resolve_workers(12, reader, "cpu", analyzer=analyzer, tile_px=2048, memory_mb=300) == 12
    assert engine._resolve_workers("auto", reader, "cuda", analyzer=analyzer, tile_px=2048, memory_mb=300) == 4


def test_memory_budget_is_the_smaller_of_the_setting_and_the_available_memory():
    from marrowseg import engine

    avail = engine._memory_budget_mb(None)
    if avail is None:
        pytest.skip("no /proc/meminfo on this system: the configured budget is used alone")
    assert avail > 0
    assert engine._memory_budget_mb(avail * 2) == avail
    assert engine._memory_budget_mb(avail / 2) == avail / 2
