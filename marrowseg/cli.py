"""The ``marrowseg`` command line (typer). Thin: every command calls library functions."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from marrowseg import __version__
from marrowseg.errors import MarrowsegError

app = typer.Typer(
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
    help="Quantify bone-marrow trephine biopsies: cellularity (H&E), erythroid left shift "
    "(E-cadherin), reticulin fibrosis grade (Gomori).",
)
err = Console(stderr=True)
out = Console()

# Options shared by several commands are defined once.
MppOpt = Annotated[float | None, typer.Option("--mpp", help="Pixel size override, µm/px (else read from the file).", min=0.01)]
StainOpt = Annotated[str, typer.Option("--stain", "-s", help="he | ecad | reticulin")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set tiling.tile_px=1024 (repeatable).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file overlaid on the packaged config.", exists=False)]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda[:i] | mps")]
AgeOpt = Annotated[float | None, typer.Option("--age", help="Patient age in years, for the age-adjusted cellularity range.", min=0, max=120)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs on stderr.")]


def _version(value: bool) -> None:
    if value:
        print(f"marrowseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at DEBUG level.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _config(stain: str | None, config: Path | None, sets: list[str] | None, device: str | None = None):
    from marrowseg.config import load_config

    overrides = list(sets or [])
    if device:
        overrides.append(f"engine.device={device}")
    return load_config(stain, path=config, overrides=overrides)


@contextmanager
def _progress(label: str, quiet: bool):
    """A tile progress bar on stderr; yields a ``(done, total, megapixels)`` callback."""
    if quiet:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("tiles  {task.fields[mp]:.0f} Mpx"), TimeElapsedColumn(),
        console=err, transient=True,
    ) as bar:
        task = bar.add_task(label, total=None, mp=0.0)

        def update(done: int, total: int, mp: float) -> None:
            bar.update(task, completed=done, total=total, mp=mp)

        yield update


# ----------------------------------------------------------------------------- info
@app.command()
def info(
    slide: Annotated[Path, typer.Argument(help="Slide or image file.")],
    mpp: MppOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Levels, sizes, pixel size, vendor and tissue fraction of a slide."""
    from marrowseg.config import load_config
    from marrowseg.io import open_slide
    from marrowseg.tiling import tissue_mask

    cfg = load_config().tissue
    with open_slide(slide, mpp=mpp) as reader:
        side_um = max(reader.shape) * reader.mpp
        mask_mpp = max(reader.mpp, min(cfg.mpp, side_um / 256))
        mask = tissue_mask(reader.read_at_mpp(mask_mpp), mask_mpp, min_od=cfg.min_od, max_od=cfg.max_od,
                           min_saturation=cfg.min_saturation, max_saturation=cfg.max_saturation, min_object_um2=cfg.min_object_um2,
                           max_hole_um2=cfg.max_hole_um2, margin_um=0,
                           keep_border_objects=max(reader.shape) <= 4096)
        doc = {
            "path": str(slide), "vendor": reader.vendor, "mpp": reader.mpp, "mpp_source": reader.mpp_source,
            "width": reader.dimensions[0], "height": reader.dimensions[1],
            "levels": [{"width": w, "height": h, "downsample": d}
                       for (w, h), d in zip(reader.level_dimensions, reader.level_downsamples, strict=True)],
            "tissue_frac": float(mask.mean()),
            "tissue_area_mm2": float(mask.sum() * mask_mpp**2 / 1e6),
        }
    if as_json:
        print(json.dumps(doc))
        return
    t = Table(title=f"{slide.name}", show_header=True)
    t.add_column("level")
    t.add_column("size (w x h)")
    t.add_column("downsample")
    for i, lv in enumerate(doc["levels"]):
        t.add_row(str(i), f"{lv['width']} x {lv['height']}", f"{lv['downsample']:.3g}")
    out.print(t)
    out.print(f"mpp {doc['mpp']:.4g} µm/px ({doc['mpp_source']}), vendor {doc['vendor'] or '-'}, "
              f"tissue {100 * doc['tissue_frac']:.1f}% of the slide ({doc['tissue_area_mm2']:.2f} mm²)")


# ----------------------------------------------------------------------------- tiles
@app.command()
def tiles(
    slide: Annotated[Path, typer.Argument(help="Slide or image file.")],
    stain: StainOpt = "he",
    mpp: MppOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Write tiles.png (grid and tissue mask) here.")] = None,
    sets: SetOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Tissue mask and tile grid of a slide at the analyzer's resolution."""
    from marrowseg.analyzers import get_analyzer
    from marrowseg.engine import plan_slide
    from marrowseg.io import open_slide
    from marrowseg.outputs.images import write_png
    from marrowseg.report.figures import grid_thumbnail

    cfg = _config(stain, config, sets)
    with open_slide(slide, mpp=mpp) as reader:
        layout = plan_slide(reader, get_analyzer(stain, cfg), cfg)
        out.print(f"{len(layout.tiles)} tiles of {layout.tile_px} px (overlap {layout.overlap_px} px) "
                  f"at {layout.mpp:g} µm/px; tissue {100 * layout.tissue['tissue_frac']:.1f}% of the slide")
        if out_dir is not None:
            thumb = reader.thumbnail(1024)
            png = write_png(Path(out_dir) / "tiles.png", grid_thumbnail(thumb, layout))
            out.print(f"wrote {png}")


# ----------------------------------------------------------------------------- synth
@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder for <name>.tiff and <name>.truth.json.")],
    stain: StainOpt = "he",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[str, typer.Option(help="WIDTHxHEIGHT in pixels.")] = "4096x4096",
    mpp: Annotated[float, typer.Option("--mpp", help="Pixel size, µm/px.", min=0.05)] = 0.25,
    cellularity: Annotated[float | None, typer.Option("--cellularity", help="Cellularity, %.", min=0, max=100)] = None,
    left_shift: Annotated[float | None, typer.Option("--left-shift", help="E-cad+ / erythroid precursors, 0..1.", min=0, max=1)] = None,
    grade: Annotated[int | None, typer.Option("--grade", help="Reticulin MF grade 0-3.", min=0, max=3)] = None,
    heterogeneous: Annotated[str | None, typer.Option("--heterogeneous", help="Heterogeneous reticulin layout, e.g. half-0-2.")] = None,
    haemorrhage: Annotated[float | None, typer.Option("--haemorrhage", help="Share of the marrow space taken by spilled blood, %.", min=0, max=99)] = None,
    sheets: Annotated[int | None, typer.Option("--sheets", help="Sheets of early erythroid (E-cadherin+) precursors to draw, 60-150 µm each.", min=0, max=100)] = None,
    name: Annotated[str | None, typer.Option(help="File stem (default from stain and seed).")] = None,
) -> None:
    """Write a synthetic phantom slide with exact ground truth."""
    from marrowseg.synth import write_phantom

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"--size {size!r}: expected WIDTHxHEIGHT, e.g. 4096x4096") from None
    kw: dict[str, Any] = {"seed": seed, "size_px": (w, h), "mpp": mpp}
    for key, val in (("cellularity_pct", cellularity), ("left_shift_ratio", left_shift),
                     ("grade", grade), ("heterogeneous", heterogeneous), ("haemorrhage_pct", haemorrhage),
                     ("sheets", sheets)):
        if val is not None:
            kw[key] = val
    with err.status(f"writing a {w} x {h} px {stain} phantom"):
        tiff, truth = write_phantom(out_dir, stain, name=name, **kw)
    out.print(f"wrote {tiff}\nwrote {truth}")


# ----------------------------------------------------------------------------- analyze
@app.command()
def analyze(
    slide: Annotated[Path, typer.Argument(help="Slide or image file.")],
    stain: StainOpt,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    mpp: MppOpt = None,
    age: AgeOpt = None,
    sets: SetOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics.json's readouts as one JSON document.")] = False,
) -> None:
    """Analyse one slide: metrics.json, cells.csv, tiles.csv, labels.zarr (+ PNGs for small inputs)."""
    from marrowseg.pipeline import analyze_slide

    cfg = _config(stain, config, sets, device)
    with _progress(f"{slide.name} [{stain}]", quiet or as_json) as cb:
        metrics, _ = analyze_slide(slide, stain, out_dir, mpp=mpp, age=age, config=cfg, progress=cb,
                                   command=sys.argv)
    if as_json:
        print(json.dumps({"readouts": metrics["readouts"], "out": str(out_dir)}))
        return
    t = Table(title=f"{slide.name} ({stain})", show_header=False)
    for k, v in metrics["readouts"].items():
        t.add_row(k, _fmt(v))
    out.print(t)
    out.print(f"outputs in {out_dir}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


# ----------------------------------------------------------------------------- demo
@app.command()
def demo(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the sample slides and their analyses.")] = Path("demo-out"),
    size: Annotated[int, typer.Option(help="Side of each sample slide, pixels at 0.25 µm/px.")] = 4096,
    quiet: QuietOpt = False,
) -> None:
    """Write one sample slide per stain and analyse each (batch layout under OUT)."""
    from marrowseg.demo import run_demo

    rows = run_demo(out_dir, size_px=size, progress=not quiet, console=err)
    t = Table(title="marrowseg demo", show_header=True)
    for col in ("slide", "stain", "readout", "measured", "truth"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["slide"], r["stain"], r["readout"], _fmt(r["measured"]), _fmt(r["truth"]))
    out.print(t)
    out.print(f"outputs in {out_dir}")


# ----------------------------------------------------------------------------- batch
@app.command()
def batch(
    in_dir: Annotated[Path, typer.Argument(help="Folder searched recursively for slides.")],
    out_dir: Annotated[Path, typer.Argument(help="Output folder: <slide-id>/ per slide, summary.csv, failures.csv.")],
    stain: Annotated[str, typer.Option("--stain", "-s", help="auto | he | ecad | reticulin (auto: manifest, file-name rules, then colour).")] = "auto",
    manifest: Annotated[Path | None, typer.Option("--manifest", help="CSV: slide,stain,age,patient,biopsy_date[,mpp,...]; slide relative to IN_DIR.")] = None,
    pattern: Annotated[str | None, typer.Option("--pattern", help="Glob on the relative path, e.g. '*.svs'.")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Worker processes of a local Dask cluster (> 1 implies --cluster local).", min=1)] = 1,
    cluster: Annotated[str | None, typer.Option("--cluster", help="local | tcp://HOST:PORT of a running dask scheduler (default: serial).")] = None,
    mpp: MppOpt = None,
    stain_rules: Annotated[Path | None, typer.Option("--stain-rules", help="YAML of file-name rules (default configs/stain_rules.yaml).")] = None,
    sets: SetOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary rows as one JSON document.")] = False,
) -> None:
    """Analyse every slide of a folder (resumable); exit code 3 when some slides failed."""
    from marrowseg.batch import run_batch

    if manifest is not None and not manifest.is_file():
        raise typer.BadParameter(f"{manifest}: no such file", param_hint="--manifest")
    show = not (quiet or as_json)
    with Progress(
        TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
        TextColumn("ok {task.fields[ok]}  failed {task.fields[failed]}  left {task.fields[left]}  "
                   "{task.fields[mpxs]:.2f} Mpx/s  {task.fields[slide]}"), TimeElapsedColumn(),
        console=err, transient=True, disable=not show,
    ) as bar:
        task = bar.add_task("batch", total=None, ok=0, failed=0, left=0, mpxs=0.0, slide="")

        def update(st: dict[str, Any]) -> None:
            bar.update(task, completed=st["done"] + st["failed"], total=st["total"], ok=st["done"],
                       failed=st["failed"], left=st["remaining"], mpxs=st["mpx_per_s"], slide=st["slide"])

        res = run_batch(in_dir, out_dir, stain=stain, manifest=manifest, pattern=pattern, workers=workers,
                        cluster=cluster, config=config, sets=sets or [], device=device, mpp=mpp,
                        stain_rules=stain_rules, progress=update, command=sys.argv)
    if as_json:
        keep = ("slide", "slide_id", "stain", "stain_source", "stain_confidence", "status", "reason", "readouts")
        print(json.dumps([{k: r[k] for k in keep} for r in res.rows]))
    else:
        t = Table(title=f"marrowseg batch: {res.n_ok} ok, {res.n_failed} failed", show_header=True)
        for col in ("slide", "stain", "status", "reason"):
            t.add_column(col)
        for r in res.rows:
            src = f"{r['stain'] or '?'} ({r['stain_source']})"
            t.add_row(r["slide"], src, r["status"], r["reason"])
        out.print(t)
        out.print(f"summary {res.summary_csv}")
    if res.exit_code:
        raise typer.Exit(code=res.exit_code)


# ----------------------------------------------------------------------------- grade
@app.command()
def grade(
    slides: Annotated[list[Path], typer.Argument(help="The slides of one biopsy (H&E, E-cadherin, reticulin).")],
    stain: Annotated[list[str] | None, typer.Option("--stain", "-s", help="auto | he | ecad | reticulin; once for all slides or once per slide, in order (default auto).")] = None,
    age: AgeOpt = None,
    mpp: MppOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Keep each slide's analysis in DIR/<slide>/ (default: a temporary folder, removed).")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write a self-contained HTML report of the case here.")] = None,
    quiet: QuietOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the case report as one JSON document.")] = False,
) -> None:
    """One combined report of a biopsy: cellularity (H&E), left shift (E-cadherin), fibrosis grade (reticulin)."""
    import tempfile

    from marrowseg.grade import case_text, grade_slides

    def bar(name: str, st: str):
        return _progress(f"{name} [{st}]", quiet or as_json)

    with tempfile.TemporaryDirectory(prefix="marrowseg-grade-") as tmp:
        doc, outputs = grade_slides(slides, stain, out_dir if out_dir is not None else Path(tmp), age=age, mpp=mpp,
                                    progress_for=bar, command=sys.argv)
        if report is not None:
            from marrowseg.report.html import write_case_report

            write_case_report(report, doc, outputs)
        if out_dir is None:
            doc["out"] = None
            for d in doc["slides"]:
                d["out_dir"] = None
    if report is not None:
        doc["html_report"] = str(report)
    if as_json:
        print(json.dumps(doc, default=str))
        return
    print(case_text(doc))
    if report is not None:
        print(f"HTML report {report}")


def main() -> None:
    """Console entry point: our errors become one line on stderr and exit code 1.

    So does a file-system error that names its path (an ``--out`` that is a file, a folder that
    cannot be written): the user can fix it, and a traceback would only hide the path.
    """
    try:
        app()
    except MarrowsegError as exc:
        _fail(str(exc))
    except OSError as exc:
        if exc.filename is None:
            raise
        _fail(f"{exc.filename}: {exc.strerror or exc}")


def _fail(message: str) -> None:
    print(f"marrowseg: error: {message}", file=sys.stderr)
    if os.environ.get("MARROWSEG_TRACEBACK"):
        raise
    sys.exit(1)


if __name__ == "__main__":
    main()
