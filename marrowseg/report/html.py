"""A self-contained HTML report of one case: images inlined as base64 PNG, no external assets.

Sections: the case report lines; then per slide the overview (tissue classes), zoomed fields
at full resolution (cells coloured by class, or fibres and skeleton), the local-grade heatmap
(reticulin), the metrics table and the provenance (versions, config hash, config).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from marrowseg.outputs.atomic import atomic_write_text
from marrowseg.outputs.images import encode_png
from marrowseg.report.figures import cell_class_colours
from marrowseg.report.slides import SlideOutput
from marrowseg.report.views import Figure, grade_legend, slide_figures

__all__ = ["png_data_uri", "figure_html", "metrics_table_html", "provenance_html", "slide_section_html",
           "case_report_html", "write_case_report", "CSS"]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;padding:24px 32px;
     color:#1d2330;background:#fff;line-height:1.45;max-width:1150px}
h1{font-size:1.5em;margin:0 0 .2em} h2{font-size:1.25em;margin:1.6em 0 .4em;border-bottom:2px solid #d8dde6;padding-bottom:.2em}
h3{font-size:1.05em;margin:1.2em 0 .4em;color:#354055}
.meta{color:#5b6578;font-size:.9em}
ol.report{background:#f4f6fa;border-left:4px solid #5a6fd6;padding:.8em 1em .8em 2.2em;margin:.8em 0}
ol.report li{margin:.25em 0}
.missing{color:#9a4a00}
figure{margin:.5em 0 1em;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #c9cfda;image-rendering:auto}
figcaption{font-size:.85em;color:#4b5567;max-width:600px}
.fields figure{max-width:340px;margin-right:12px}
.legend span{display:inline-block;margin:0 14px 4px 0;font-size:.85em}
.legend i{display:inline-block;width:14px;height:14px;border:1px solid #888;vertical-align:-2px;margin-right:5px}
table{border-collapse:collapse;font-size:.88em;margin:.4em 0 1em}
th,td{border:1px solid #d3d8e2;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
details{margin:.4em 0 1em} summary{cursor:pointer;color:#354055}
pre{background:#f6f7f9;padding:8px;font-size:.8em;overflow-x:auto;max-height:420px}
.flag{display:inline-block;background:#fde8c8;color:#7a4200;border-radius:3px;padding:0 6px;margin:0 4px 2px 0;font-size:.85em}
"""


def png_data_uri(rgb: np.ndarray) -> str:
    """``data:image/png;base64,...`` of an (H, W) or (H, W, 3) uint8 array."""
    return "data:image/png;base64," + base64.b64encode(encode_png(rgb)).decode("ascii")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def figure_html(fig: Figure | None, *, alt: str = "") -> str:
    """One ``<figure>`` with its image inlined (empty string for None)."""
    if fig is None:
        return ""
    return (f'<figure><img alt="{_e(alt or fig.title)}" src="{png_data_uri(fig.rgb)}" '
            f'width="{fig.rgb.shape[1]}" height="{fig.rgb.shape[0]}">'
            f"<figcaption><b>{_e(fig.title)}</b>: {_e(fig.caption)}</figcaption></figure>")


def _legend(items: Sequence[tuple[str, Sequence[int]]]) -> str:
    spans = "".join(f'<span><i style="background:rgb({c[0]},{c[1]},{c[2]})"></i>{_e(n)}</span>' for n, c in items)
    return f'<div class="legend">{spans}</div>'


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, Mapping):
        return "; ".join(f"{k}: {_fmt(x)}" for k, x in v.items() if k != "source")
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def metrics_table_html(metrics: Mapping[str, Any]) -> str:
    """Readouts (with units), areas and counts of one slide as HTML tables."""
    units = metrics.get("units") or {}
    rows = "".join(f"<tr><td>{_e(k)}</td><td class=num>{_e(_fmt(v))}</td><td>{_e(units.get(k, ''))}</td></tr>"
                   for k, v in (metrics.get("readouts") or {}).items())
    out = f"<table><tr><th>readout</th><th>value</th><th>unit</th></tr>{rows}</table>"
    for key, unit in (("areas_um2", "µm²"), ("counts", "")):
        sec = metrics.get(key) or {}
        if sec:
            cells = "".join(f"<tr><td>{_e(k)}</td><td class=num>{_e(_fmt(v))}</td></tr>" for k, v in sec.items())
            out += f"<details><summary>{_e(key)} {unit}</summary><table>{cells}</table></details>"
    return out


def provenance_html(metrics: Mapping[str, Any]) -> str:
    """Slide identity, versions, config hash, device, timings and the full config."""
    prov = metrics.get("provenance") or {}
    slide = metrics.get("slide") or {}
    ident = {k: slide.get(k) for k in ("path", "sha256", "width", "height", "mpp", "mpp_source", "vendor")}
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_fmt(v))}</td></tr>" for k, v in ident.items())
    rows += f"<tr><td>config_hash</td><td>{_e(prov.get('config_hash', '-'))}</td></tr>"
    rows += f"<tr><td>created</td><td>{_e(prov.get('created', '-'))}</td></tr>"
    rows += f"<tr><td>device</td><td>{_e(_fmt(prov.get('device', {})))}</td></tr>"
    rows += f"<tr><td>stain estimate</td><td>{_e(_fmt(prov.get('prepare', {})))}</td></tr>"
    rows += f"<tr><td>timings, s</td><td>{_e(_fmt(prov.get('timings_s', {})))}</td></tr>"
    vers = ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items())
    rows += f"<tr><td>versions</td><td>{_e(vers)}</td></tr>"
    cfg = json.dumps(prov.get("config", {}), indent=1, sort_keys=True)
    return (f"<table>{rows}</table><details><summary>configuration (config_hash {_e(prov.get('config_hash', '-'))})"
            f"</summary><pre>{_e(cfg)}</pre></details>")


def slide_section_html(slide: SlideOutput, lines: Sequence[str] = (), *, n_fields: int = 3,
                       flags: Sequence[str] = (), figures: Mapping[str, Any] | None = None) -> str:
    """The section of one slide: report lines, figures, metrics and provenance."""
    from marrowseg.report.wording import STAIN_NAMES

    m = slide.metrics
    figs = figures if figures is not None else slide_figures(slide, n_fields=n_fields)
    classes = [(c["name"], c["rgb"]) for c in
               _label_classes(slide) if c["name"] != "excluded"]
    parts = [f'<h2 id="{_e(slide.slide_id)}">{_e(STAIN_NAMES.get(slide.stain, slide.stain))}: {_e(slide.slide_id)}</h2>',
             f'<div class="meta">{_e(m.get("slide", {}).get("path", ""))}; '
             f'{_e(m.get("slide", {}).get("width"))} x {_e(m.get("slide", {}).get("height"))} px at '
             f'{_fmt(m.get("slide", {}).get("mpp"))} µm/px</div>']
    if flags:
        parts.append("<div>" + "".join(f'<span class="flag">{_e(f)}</span>' for f in flags) + "</div>")
    if lines:
        parts.append('<ol class="report">' + "".join(f"<li>{_e(x)}</li>" for x in lines) + "</ol>")
    parts.append("<h3>Overview</h3>" + figure_html(figs.get("overview")) + _legend(classes))
    if figs.get("fields"):
        cells = cell_class_colours(slide.stain)
        legend = _legend(list(cells.items())) if cells else _legend([("fibre", (0, 200, 230)), ("skeleton", (230, 0, 200))])
        parts.append("<h3>Fields at full resolution</h3>" + legend + '<div class="fields">' +
                     "".join(figure_html(f) for f in figs["fields"]) + "</div>")
    if figs.get("heatmap") is not None:
        parts.append("<h3>Local fibrosis grades</h3>" + figure_html(figs["heatmap"]) + _legend(grade_legend()))
    parts.append("<h3>Metrics</h3>" + metrics_table_html(m))
    parts.append("<h3>Provenance</h3>" + provenance_html(m))
    return "<section>" + "".join(parts) + "</section>"


def _label_classes(slide: SlideOutput) -> list[dict[str, Any]]:
    try:
        import zarr

        g = zarr.open_group(str(slide.out_dir / "labels.zarr"), mode="r")
        return list(g.attrs.get("marrowseg", {}).get("label_classes", []))
    except Exception:  # noqa: BLE001 - a legend only; the overview still shows
        return []


def case_report_html(doc: Mapping[str, Any], slides: Sequence[SlideOutput], *, title: str | None = None,
                     n_fields: int = 3) -> str:
    """The whole page of one case.

    Parameters
    ----------
    doc : dict
        From :func:`marrowseg.grade.case_document`.
    slides : sequence of SlideOutput
        The same slides, for their figures.
    """
    from marrowseg import __version__
    from marrowseg.report.wording import STAIN_NAMES

    by_id = {s.slide_id: s for s in slides}
    case = doc.get("case") or {}
    title = title or "Bone marrow trephine: " + (", ".join(str(v) for v in case.values() if v) or
                                                  ", ".join(d["slide_id"] for d in doc["slides"]))
    head = ['<h1>' + _e(title) + '</h1>',
            f'<div class="meta">marrowseg {_e(__version__)}; {len(doc["slides"])} slide(s); '
            "measurements are software estimates for review by a pathologist</div>",
            '<ol class="report">' + "".join(f"<li>{_e(x)}</li>" for x in doc["report"]) + "</ol>"]
    if doc.get("missing_stains"):
        head.append('<p class="missing">Not assessed (no slide): ' +
                    _e(", ".join(STAIN_NAMES[s] for s in doc["missing_stains"])) + "</p>")
    body = [slide_section_html(by_id[d["slide_id"]], d["report"], n_fields=n_fields)
            for d in doc["slides"] if d["slide_id"] in by_id]
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>" + "".join(head) + "".join(body) + "</body></html>")


def write_case_report(path: str | Path, doc: Mapping[str, Any], slides: Sequence[SlideOutput], **kw: Any) -> Path:
    """Write :func:`case_report_html` to ``path`` (atomically); returns the path."""
    return atomic_write_text(path, case_report_html(doc, slides, **kw))
