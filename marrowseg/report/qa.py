"""What the QA notebook shows, as library functions: slide flags, summary table, panels, agreement.

The notebook (``notebooks/qa.ipynb``) only calls these. Flags point a reviewer at slides to look
at first; they never change a measurement:

``failed``
    the analysis failed (``failures.csv`` / ``summary.csv``), with its reason;
``little tissue``
    less marrow than ``min_marrow_mm2`` was analysed (haematopoietic + fat; reticulin:
    haematopoietic, the area fibres are judged on);
``stain looks like another``
    the slide's colours name another stain than the one it was analysed as, confidently
    (``provenance.tissue.stain_check``; :func:`marrowseg.engine.plan_slide`);
``scan coarser than validated``
    the slide's pixel size is coarser than the analyzer's ``max_scan_mpp``: it was upsampled,
    and nuclei, membranes and fibres blur (``provenance.tissue.resolution_check``);
``pixel size?``
    the slide's nuclei measure outside the range marrow nuclei read at the right pixel size
    (``measurements.nuclear_scale``): every area and density scales with a wrong ``--mpp``;
``crush artefact``
    at least 2 % of the marrow space was left out as crushed (``measurements.crush``;
    :mod:`marrowseg.analyzers.crush`): worth a look, since streaming fibrosis can look the same;
``out of focus``
    at least 10 % of the tissue whose sharpness was judged lies in tiles below
    ``tissue.focus_min`` (:mod:`marrowseg.focus`; ``tiles.out_of_focus_frac``);
``unreadable tiles``
    some tiles could not be decoded (a corrupt or cut-short chunk of the file): every figure
    leaves their area out (``tiles.csv`` has each reason);
``stain estimate unreliable``
    the slide's stain vectors fell back to the standard ones, or its E-cadherin counterstain
    could not be scaled, or its H&E haematoxylin lay too far outside the floor-ceiling range to
    be brought into it (``provenance.prepare`` has a ``fallback_reason`` or
    ``h_scale_fallback_reason``; every reason is named), or an automatic stain recognition had
    low confidence;
``DAB run pale`` / ``DAB run heavy``
    the E-cadherin membranes were brought to the reference level by a factor of
    ``dab_scale_margin`` or more (or its inverse): the counts are comparable, but a run that far
    from the usual one deserves a look at its controls (``provenance.prepare.dab_scale``;
    :func:`marrowseg.analyzers.ecad.dab_level.dab_scale`);
``near a grade boundary``
    cellularity within ``cellularity_margin_pct`` points of the age-adjusted limits; fibrosis
    index within ``index_margin`` of a grade boundary (the grade is ``floor(index)``, so the
    boundaries are 1, 2 and 3; see :func:`marrowseg.analyzers.reticulin.grade_from_measurements`);
    a heterogeneous marrow the analyzer names borderline between two grades (readout
    ``mf_grade_borderline_with``: the share deciding the EUMNET grade within
    ``reticulin.grade_borderline_margin`` of 30 %); a left-shift 95% interval that contains the
    verdict threshold.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from marrowseg.outputs.metrics import (
    DAB_RUN_FLAG_SCALE,
    crushed,
    dab_run_off_reference,
    out_of_focus,
    pixel_size_suspect,
    scan_too_coarse,
    stain_fallbacks,
    stain_mismatch,
)
from marrowseg.report.slides import SlideOutput, load_batch, read_failures

__all__ = ["qa_dir", "slide_flags", "summary_rows", "summary_html", "slide_panel_html", "reviews_from_env",
           "agreement_html", "review_form_help"]

_REPO = Path(__file__).resolve().parents[2]


def qa_dir(default: str = "demo-out") -> Path:
    """The batch folder to review: ``$MARROWSEG_QA_DIR`` or ``default``, relative to the repository root."""
    p = Path(os.environ.get("MARROWSEG_QA_DIR") or default).expanduser()
    return p if p.is_absolute() else _REPO / p


def slide_flags(slide: SlideOutput, *, min_marrow_mm2: float = 0.5, cellularity_margin_pct: float = 5.0,
                index_margin: float = 0.15, min_stain_confidence: float = 0.5,
                dab_scale_margin: float = DAB_RUN_FLAG_SCALE) -> list[str]:
    """Review flags of one analysed slide (see the module docstring), each a short phrase."""
    m = slide.metrics
    ro = slide.readouts
    areas = m.get("areas_um2") or {}
    flags = []
    haem = float(areas.get("haematopoietic") or 0.0)
    marrow = haem if slide.stain == "reticulin" else haem + float(areas.get("fat") or 0.0)
    if marrow / 1e6 < min_marrow_mm2:
        flags.append(f"little tissue ({marrow / 1e6:.2f} mm² marrow)")
    check = stain_mismatch(m)
    if check:
        flags.append(f"stain looks like {check['looks_like']}, analysed as {slide.stain} "
                     f"(confidence {float(check.get('confidence', 0)):.2f})")
    coarse = scan_too_coarse(m)
    if coarse:
        flags.append(f"scan coarser than validated ({float(coarse['scan_mpp']):.2f} µm/px, "
                     f"limit {float(coarse['max_scan_mpp']):.2f})")
    scale = pixel_size_suspect(m)
    if scale:
        flags.append(f"pixel size? (nuclei {float(scale['geomean_area_um2']):.0f} µm², marrow "
                     f"{scale['expected_um2'][0]:g}-{scale['expected_um2'][1]:g} at {m.get('slide', {}).get('mpp', '?')} µm/px)")
    crush = crushed(m)
    if crush:
        flags.append(f"crush artefact ({float(crush['area_um2']) / 1e6:.2f} mm², "
                     f"{100 * float(crush['share_of_marrow']):.0f}% of the marrow left out)")
    blurred = out_of_focus(m)
    if blurred:
        flags.append(f"out of focus ({100 * float(blurred['out_of_focus_frac']):.0f}% of the tissue, "
                     f"{blurred['out_of_focus_tiles']} of {blurred['focus_judged_tiles']} tiles)")
    tiles = m.get("tiles") or {}
    if tiles.get("missing"):
        flags.append(f"unreadable tiles ({tiles['missing']} of {tiles.get('n', '?')}, "
                     f"{float(tiles.get('missing_area_um2') or 0.0) / 1e6:.2f} mm² left out)")
    reason = stain_fallbacks(m)
    if reason:
        flags.append(f"stain estimate unreliable ({reason})")
    ds = dab_run_off_reference(m, dab_scale_margin)
    if ds is not None:
        flags.append(f"DAB run {'pale' if ds > 1.0 else 'heavy'} (membranes scaled x{ds:.2f} to the reference level)")
    b = m.get("batch") or {}
    conf = b.get("stain_confidence")
    if conf is not None and str(b.get("stain_source", "")) not in ("", "given", "manifest", "cli", "option") \
            and float(conf) < min_stain_confidence:
        flags.append(f"stain recognised with low confidence ({float(conf):.2f})")
    if slide.stain == "he":
        cell, ref = ro.get("cellularity_pct"), ro.get("cellularity_reference")
        if cell is not None and ref:
            for lim in (ref["low"], ref["high"]):
                if abs(cell - lim) <= cellularity_margin_pct:
                    flags.append(f"near a grade boundary (cellularity {cell:.0f}% vs limit {lim:g}%)")
                    break
    elif slide.stain == "reticulin":
        idx = ro.get("fibrosis_index")
        if idx is not None:
            near = [b for b in (1, 2, 3) if abs(float(idx) - b) <= index_margin]
            if near:
                flags.append(f"near a grade boundary (fibrosis index {idx:.2f} vs MF-{near[0]} at {near[0]})")
        alt = ro.get("mf_grade_borderline_with")
        if alt is not None:  # the analyzer's own test: reticulin.borderline_grade
            flags.append(f"near a grade boundary (borderline between MF-{ro.get('mf_grade')} and MF-{alt}: "
                         "the share deciding the EUMNET grade lies near 30%)")
    elif slide.stain == "ecad":
        shift = ((m.get("interpretation") or {}).get("left_shift")) or {}
        ci, thr = ro.get("left_shift_ratio_ci95"), shift.get("threshold")
        if ci and thr is not None and ci[0] <= thr <= ci[1]:
            flags.append(f"near a grade boundary (left-shift 95% CI {ci[0]:.2f}-{ci[1]:.2f} contains {thr:g})")
    return flags


def _headline(slide: SlideOutput) -> tuple[str, str]:
    ro = slide.readouts
    if slide.stain == "he":
        v = ro.get("cellularity_pct")
        return ("-" if v is None else f"cellularity {v:.0f}%"), str(ro.get("cellularity_verdict") or "")
    if slide.stain == "ecad":
        v = ro.get("left_shift_ratio")
        verdict = (((slide.metrics.get("interpretation") or {}).get("left_shift")) or {}).get("verdict", "")
        return ("-" if v is None else f"left-shift ratio {v:.2f}"), str(verdict)
    if slide.stain == "reticulin":
        return f"MF-{ro.get('mf_grade')} (index {ro.get('fibrosis_index', float('nan')):.2f})", ""
    return "", ""


def summary_rows(out_dir: str | Path, **flag_kw: Any) -> list[dict[str, Any]]:
    """One row per slide of a batch (failed ones included): id, stain, headline, verdict, flags."""
    rows = []
    for s in load_batch(out_dir):
        head, verdict = _headline(s)
        rows.append({"slide_id": s.slide_id, "stain": s.stain, "status": "ok", "readout": head,
                     "verdict": verdict, "flags": slide_flags(s, **flag_kw)})
    done = {r["slide_id"] for r in rows}
    for f in read_failures(out_dir):
        if f["slide_id"] not in done:
            rows.append({"slide_id": f["slide_id"], "stain": f.get("stain", ""), "status": "failed", "readout": "",
                         "verdict": "", "flags": [f"failed: {f['reason']}"]})
    return rows


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def summary_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary rows as an HTML table (flags as badges)."""
    from marrowseg.report.html import CSS

    body = "".join(
        f"<tr><td><a href='#{_e(r['slide_id'])}'>{_e(r['slide_id'])}</a></td><td>{_e(r['stain'])}</td>"
        f"<td>{_e(r['status'])}</td><td>{_e(r['readout'])}</td><td>{_e(r['verdict'])}</td><td>"
        + "".join(f"<span class=flag>{_e(f)}</span>" for f in r["flags"]) + "</td></tr>"
        for r in rows)
    n_flag = sum(1 for r in rows if r["flags"])
    return (f"<style>{CSS}</style><p>{len(rows)} slides, {n_flag} flagged</p><table><tr><th>slide</th><th>stain</th>"
            f"<th>status</th><th>readout</th><th>verdict</th><th>flags</th></tr>{body}</table>")


def slide_panel_html(slide: SlideOutput, *, n_fields: int = 3, **flag_kw: Any) -> str:
    """Overview, fields, heatmap, metrics and provenance of one slide, with its flags and report lines."""
    from marrowseg.report.html import slide_section_html
    from marrowseg.report.wording import slide_report_lines

    return slide_section_html(slide, slide_report_lines(slide.metrics), n_fields=n_fields,
                              flags=slide_flags(slide, **flag_kw))


def reviews_from_env(out_dir: str | Path) -> Path | None:
    """Merge the reviews CSV named by ``$MARROWSEG_QA_REVIEWS`` into ``OUT/reviews.csv`` (None if unset)."""
    from marrowseg.review import import_reviews

    src = os.environ.get("MARROWSEG_QA_REVIEWS")
    return import_reviews(out_dir, src) if src else None


def review_form_help(out_dir: str | Path) -> str:
    """Plain-text lines to paste into the notebook's review cell, one per slide of the batch."""
    lines = []
    for s in load_batch(out_dir):
        extra = {"reticulin": ", mf_grade=None", "he": ", cellularity_pct=None",
                 "ecad": ", ecad_pos_per_100_nucleated=None"}.get(s.stain, "")
        lines.append(f'# review.record_review(OUT, "{s.slide_id}", "agree", reviewer=""{extra}, comment="")')
    return "\n".join(lines)


def agreement_html(out_dir: str | Path, *, n_largest: int = 5) -> str:
    """Agreement of measurements and reviews (weighted kappa, Bland-Altman, largest disagreements)."""
    from marrowseg.review import agreement, read_reviews

    reviews = read_reviews(out_dir)
    if not reviews:
        return "<p>No reviews yet: record some in the cell above (saved to reviews.csv).</p>"
    slides = [{"slide_id": s.slide_id, "stain": s.stain, "readouts": s.readouts} for s in load_batch(out_dir)]
    a = agreement(slides, reviews, n_largest=n_largest)

    def f(x: float, fmt: str = ".2f") -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    g, c, e = a["grade"], a["cellularity"], a["ecad_pos"]
    rows = "".join(
        f"<tr><td>{_e(p['slide_id'])}</td><td>{_e(p['quantity'])}</td><td>{f(p['measured'], '.1f')}</td>"
        f"<td>{f(p['reviewed'], '.1f')}</td><td>{f(p['difference'], '+.1f')}</td><td>{_e(p['reviewer'])}</td>"
        f"<td>{_e(p['comment'])}</td></tr>" for p in a["largest"])
    return (f"<p>{a['n_reviews']} reviews.</p><ul>"
            f"<li>MF grade: n = {g['n']}, Cohen's weighted kappa {f(g['kappa_quadratic'])} (quadratic), "
            f"{f(g['kappa_linear'])} (linear); exact agreement {f(100 * g['exact_frac'] if g['n'] else float('nan'), '.0f')}%</li>"
            f"<li>Cellularity (measured - pathologist): n = {c['n']}, bias {f(c['bias'], '+.1f')} points, "
            f"95% limits of agreement {f(c['loa_low'], '+.1f')} to {f(c['loa_high'], '+.1f')} points</li>"
            f"<li>E-cadherin+ cells per 100 nucleated (measured - pathologist): n = {e['n']}, bias {f(e['bias'], '+.1f')}, "
            f"95% limits of agreement {f(e['loa_low'], '+.1f')} to {f(e['loa_high'], '+.1f')}</li></ul>"
            "<p>Largest disagreements:</p><table><tr><th>slide</th><th>readout</th><th>measured</th><th>pathologist</th>"
            f"<th>difference</th><th>reviewer</th><th>comment</th></tr>{rows}</table>")
