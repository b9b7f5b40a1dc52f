"""The command line: results on stdout, one-line errors on stderr, documented exit codes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile

from tests._cli import run_cli


def _main(argv, capsys):
    """Run ``marrowseg ARGV`` in-process; return (exit code, stdout, stderr)."""
    code = run_cli(*argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def tissue_tiff(tmp_path):
    """A small pyramidal TIFF at 0.5 µm/px: a purple core on glass."""
    img = np.full((1200, 1600, 3), 240, np.uint8)
    yy, xx = np.mgrid[:1200, :1600]
    img[((yy - 600) / 450) ** 2 + ((xx - 800) / 650) ** 2 < 1] = (170, 90, 160)
    path = tmp_path / "core.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, photometric="rgb", tile=(256, 256), subifds=1,
                 resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        tw.write(img[::2, ::2], photometric="rgb", tile=(256, 256), subfiletype=1)
    return path


def test_info_prints_levels_and_mpp_as_json(tissue_tiff, capsys):
    code, out, err = _main(["info", str(tissue_tiff), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["width"] == 1600 and doc["height"] == 1200
    assert doc["mpp"] == pytest.approx(0.5)
    assert len(doc["levels"]) == 2
    assert 0.3 < doc["tissue_frac"] < 0.7


def test_info_table_mentions_mpp(tissue_tiff, capsys):
    code, out, _ = _main(["info", str(tissue_tiff)], capsys)
    assert code == 0 and "0.5 µm/px" in out


def test_not_an_image_is_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "notes.svs"
    bad.write_text("this is not a slide\n")
    code, out, err = _main(["info", str(bad)], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("marrowseg: error:") and "notes.svs" in lines[0]
    assert "Traceback" not in err and out == ""


def test_missing_mpp_asks_for_the_flag(tmp_path, capsys):
    import cv2

    png = tmp_path / "field.png"
    cv2.imwrite(str(png), np.full((64, 64, 3), 128, np.uint8))
    code, _, err = _main(["info", str(png)], capsys)
    assert code == 1 and "--mpp" in err and "field.png" in err
    code, out, _ = _main(["info", str(png), "--mpp", "0.25", "--json"], capsys)
    assert code == 0 and json.loads(out)["mpp"] == 0.25


def test_bad_override_names_the_key(tissue_tiff, capsys):
    code, _, err = _main(["tiles", str(tissue_tiff), "--set", "tiling.tile_pz=3"], capsys)
    assert code == 1 and "tiling.tile_pz" in err


def test_tiles_counts_and_draws_the_grid(tissue_tiff, tmp_path, capsys):
    code, out, err = _main(["tiles", str(tissue_tiff), "--out", str(tmp_path / "t"),
                            "--set", "tiling.tile_px=1024"], capsys)
    assert code == 0, err
    assert "tiles of" in out
    assert (tmp_path / "t" / "tiles.png").stat().st_size > 1000


def test_unknown_command_is_usage_error(capsys):
    code, _, _ = _main(["frobnicate"], capsys)
    assert code == 2


def test_synth_writes_slide_and_truth(tmp_path, capsys):
    code, out, err = _main(["synth", str(tmp_path), "--stain", "he", "--size", "1024x768", "--seed", "3",
                            "--mpp", "0.5", "--name", "s3"], capsys)
    assert code == 0, err
    truth = json.loads((tmp_path / "s3.truth.json").read_text())
    assert truth["stain"] == "he" and "cellularity_pct" in truth["readouts"]
    code, out, _ = _main(["info", str(tmp_path / "s3.tiff"), "--json"], capsys)
    doc = json.loads(out)
    assert (doc["width"], doc["height"]) == (1024, 768) and doc["mpp"] == pytest.approx(0.5)


def test_synth_haemorrhage_option_reaches_the_truth(tmp_path, capsys):
    code, _, err = _main(["synth", str(tmp_path), "--size", "512x512", "--mpp", "1.0", "--seed", "3",
                          "--haemorrhage", "20", "--name", "b"], capsys)
    assert code == 0, err
    truth = json.loads((tmp_path / "b.truth.json").read_text())
    assert truth["params"]["haemorrhage_pct"] == 20 and truth["areas_um2"]["haemorrhage"] > 0


def test_synth_sheets_option_reaches_the_truth(tmp_path, capsys):
    code, _, err = _main(["synth", str(tmp_path), "--stain", "ecad", "--size", "2048x2048", "--mpp", "0.5",
                          "--seed", "3", "--sheets", "2", "--name", "s"], capsys)
    assert code == 0, err
    truth = json.loads((tmp_path / "s.truth.json").read_text())
    assert truth["params"]["sheets"] == 2 and truth["readouts"]["ecad_sheets"] == len(truth["sheets"]) == 2
    assert all(s["cells"] > 0 for s in truth["sheets"])


def test_synth_rejects_malformed_size(tmp_path, capsys):
    code, _, err = _main(["synth", str(tmp_path), "--size", "big"], capsys)
    assert code == 2 and "WIDTHxHEIGHT" in err


@pytest.mark.parametrize("stain", ["he", "ecad"])
def test_greyscale_image_is_refused_for_stains_told_apart_by_colour(tissue_tiff, tmp_path, capsys, stain):
    """A grey copy of a stained core is one clear error for H&E and E-cadherin, not a measurement."""
    with tifffile.TiffFile(tissue_tiff) as tf:
        img = tf.pages[0].asarray()
    grey = tmp_path / "grey core.tif"
    tifffile.imwrite(grey, np.repeat(img.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2),
                     photometric="rgb", tile=(256, 256), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    code, out, err = _main(["analyze", str(grey), "--stain", stain, "--out", str(tmp_path / "g"), "-q"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "grey core.tif: greyscale image" in lines[0], err
    assert not (tmp_path / "g" / "metrics.json").exists()
    # the colour original passes the same check and is measured
    code, _, err = _main(["analyze", str(tissue_tiff), "--stain", stain, "--out", str(tmp_path / "c"), "-q"], capsys)
    assert code == 0, err
    assert (tmp_path / "c" / "metrics.json").exists()


def _label_mask(side: int = 512) -> np.ndarray:
    """A DeepLIIF-style truth mask: nuclei filled blue (negative) or red (positive), outlined green, on black."""
    img = np.zeros((side, side, 3), np.uint8)
    yy, xx = np.mgrid[:side, :side]
    rng = np.random.default_rng(4)
    for k, (cy, cx) in enumerate(rng.uniform(20, side - 20, (60, 2))):
        d = np.hypot(yy - cy, xx - cx)
        img[d < 14] = (0, 255, 0)
        img[d < 12] = (255, 0, 0) if k % 7 == 0 else (0, 0, 255)
    return img


def _phantom_png(path, stain: str, side: int = 512) -> None:
    from PIL import Image

    from marrowseg.synth import make_phantom

    rgb = make_phantom(stain, seed=2, size_px=(side, side), mpp=0.25).render(0, 0, side, side)
    Image.fromarray(np.ascontiguousarray(rgb[..., :3])).save(path)


@pytest.mark.parametrize("stain", ["he", "ecad", "reticulin"])
def test_a_label_mask_is_refused_not_measured(tmp_path, capsys, stain):
    """A truth mask saved beside its image is one clear error, not a slide with cells in it.

    Before the check, the Ki67 truth masks of ../shared/data were measured as E-cadherin slides
    (23 E-cad+ per 100 nucleated cells, stain confidence 1.00); their black background passed as
    scanner fill and their saturated colours as stain."""
    from PIL import Image

    mask = tmp_path / "22_2_gt.png"
    Image.fromarray(_label_mask()).save(mask)
    out = tmp_path / "m"
    code, _, err = _main(["analyze", str(mask), "--stain", stain, "--mpp", "0.25", "--out", str(out), "-q"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "22_2_gt.png" in lines[0] and "label mask or drawing" in lines[0], err
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("stain", ["he", "ecad", "reticulin"])
def test_a_phantom_field_is_not_taken_for_a_drawing(tmp_path, capsys, stain):
    """The phantoms draw no sensor noise, so their colours are the flattest of any stained field here
    (the 8 commonest values 2-27 % of the stained pixels, none with a zero channel): still measured."""
    field = tmp_path / f"{stain}.png"
    _phantom_png(field, stain)
    code, _, err = _main(["analyze", str(field), "--stain", stain, "--mpp", "0.25", "--out", str(tmp_path / "o"), "-q"],
                         capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "metrics.json").exists()


def _fluorescence_field(side: int = 768) -> np.ndarray:
    """DAPI-blue nuclei and a few green spots on a dark, noisy background, as a fluorescence scan shows them."""
    rng = np.random.default_rng(0)
    img = rng.normal(12, 4, (side, side, 3))
    yy, xx = np.mgrid[:side, :side]
    for cy, cx in rng.uniform(20, side - 20, (150, 2)):
        m = np.hypot(yy - cy, xx - cx) < rng.uniform(10, 16)
        img[m] = np.array([15, 30, 170]) * rng.uniform(0.6, 1.2) + rng.normal(0, 12, (m.sum(), 3))
    for cy, cx in rng.uniform(20, side - 20, (40, 2)):
        m = np.hypot(yy - cy, xx - cx) < 5
        img[m] = np.array([20, 200, 30]) + rng.normal(0, 15, (m.sum(), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_a_fluorescence_image_is_refused_and_black_padding_is_not(tmp_path, capsys):
    """A dark-background image is not a brightfield slide: before the check, `grade --stain auto` read this field
    as a left-shifted E-cadherin slide (ratio 0.70). A brightfield crop padded with black past half its area
    (a converter's fill) keeps its fat and lumens bright and is measured."""
    from PIL import Image

    fluo = tmp_path / "dapi.png"
    Image.fromarray(_fluorescence_field()).save(fluo)
    for stain in ("he", "ecad", "reticulin"):
        code, _, err = _main(["analyze", str(fluo), "--stain", stain, "--mpp", "0.25", "--out", str(tmp_path / stain), "-q"],
                             capsys)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and "dapi.png" in lines[0] and "fluorescence" in lines[0], err
    field = tmp_path / "field.png"
    _phantom_png(field, "he", side=512)
    padded = np.zeros((768, 768, 3), np.uint8)
    padded[:512, :512] = np.asarray(Image.open(field))[..., :3]
    Image.fromarray(padded).save(tmp_path / "padded.png")
    code, _, err = _main(["analyze", str(tmp_path / "padded.png"), "--stain", "he", "--mpp", "0.25",
                          "--out", str(tmp_path / "p"), "-q"], capsys)
    assert code == 0, err


def test_a_label_mask_in_a_batch_fails_alone(tmp_path, capsys):
    """A folder that keeps truth masks beside the images (as ../shared/data/ihc-ki67 does): the masks are
    failures with the reason, the images are analysed."""
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    _phantom_png(src / "22_2.png", "ecad")
    Image.fromarray(_label_mask()).save(src / "22_2_gt.png")
    code, _, err = _main(["batch", str(src), str(tmp_path / "out"), "--stain", "ecad", "--mpp", "0.25", "-q"], capsys)
    assert code == 3, err
    with open(tmp_path / "out" / "summary.csv", newline="") as fh:
        status = {r["slide"]: r["status"] for r in csv.DictReader(fh)}
    assert status == {"22_2.png": "ok", "22_2_gt.png": "failed"}
    with open(tmp_path / "out" / "failures.csv", newline="") as fh:
        reasons = {r["slide"]: r["reason"] for r in csv.DictReader(fh)}
    assert "label mask" in reasons["22_2_gt.png"]


@pytest.mark.parametrize("side_px", [4096, 5120])  # 2 x 2 H&E tiles; overlay at full size / from a thumbnail
def test_grade_of_a_slide_with_a_cut_short_tile_reports_what_it_left_out(tmp_path, capsys, caplog, side_px):
    """One JPEG tile cut short: the slide is graded from the rest, and the report says what was left out."""
    rng = np.random.default_rng(0)
    img = np.full((side_px, side_px, 3), (215, 160, 200), np.uint8)  # pink marrow wash
    for r, c in rng.uniform(10, side_px - 10, size=(side_px * side_px // 4000, 2)):
        img[int(r) - 9 : int(r) + 9, int(c) - 9 : int(c) + 9] = (90, 50, 130)  # nuclei
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, img, tile=(256, 256), compression="jpeg", photometric="rgb",
                     resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(path, mode="r+b") as tf:
        tag = tf.pages.first.tags["TileByteCounts"]
        counts = list(tag.value)
        counts[1] //= 2  # the tile at level-0 pixels [0:256, 256:512]
        tag.overwrite(counts)
    out = tmp_path / "out"
    code, stdout, err = _main(["grade", str(path), "--stain", "he", "--out", str(out)], capsys)
    assert code == 0, err
    assert "Not assessed: 1 of " in stdout and "tiles could not be read" in stdout
    assert "corrupt JPEG tile at x=256,y=0 of level 0" in caplog.text
    metrics = json.loads(next(out.rglob("metrics.json")).read_text())
    assert metrics["tiles"]["missing"] == 1 and metrics["tiles"]["n"] > 1
    assert (next(out.rglob("overlay.png"))).exists()


@pytest.mark.parametrize("name", ["22_2", "34_3"])
def test_real_truth_masks_are_refused_and_their_images_are_not(shared_data, name):
    """The real DeepLIIF truth masks of ../shared/data/ihc-ki67 against their own Ki67 tiles."""
    from marrowseg.analyzers import get_analyzer
    from marrowseg.config import load_config
    from marrowseg.engine import plan_slide
    from marrowseg.errors import SlideError
    from marrowseg.io import open_slide

    cfg = load_config("ecad")
    image, mask = shared_data(f"ihc-ki67/{name}.png"), shared_data(f"ihc-ki67/{name}_gt.png")
    with open_slide(image, mpp=0.25) as reader:
        assert plan_slide(reader, get_analyzer("ecad", cfg), cfg).tiles
    with open_slide(mask, mpp=0.25) as reader, pytest.raises(SlideError, match="label mask or drawing"):
        plan_slide(reader, get_analyzer("ecad", cfg), cfg)


def test_an_mpp_that_looks_like_a_magnification_is_refused_with_a_hint(tmp_path, capsys):
    field = tmp_path / "field.png"
    _phantom_png(field, "ecad", side=256)
    code, _, err = _main(["analyze", str(field), "--stain", "ecad", "--mpp", "40", "--out", str(tmp_path / "o"), "-q"],
                         capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "field.png: 40 µm/px" in lines[0], err
    assert "is --mpp 40 a magnification?" in lines[0]


@pytest.mark.parametrize("command", ["analyze", "grade", "batch"])
def test_an_output_path_that_is_a_file_is_one_line(tmp_path, capsys, command):
    """--out (or batch's OUT) naming an existing file: the path and the reason, not a traceback."""
    field = tmp_path / "field.png"
    _phantom_png(field, "he", side=256)
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    argv = {"analyze": ["analyze", str(field), "--stain", "he", "--mpp", "0.25", "--out", str(taken), "-q"],
            "grade": ["grade", str(field), "--stain", "he", "--mpp", "0.25", "--out", str(taken)],
            "batch": ["batch", str(tmp_path), str(taken), "--stain", "he", "--mpp", "0.25", "-q"]}[command]
    code, _, err = _main(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("marrowseg: error:"), err
    assert str(taken) in lines[0] and "Traceback" not in err
