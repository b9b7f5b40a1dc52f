"""A slide's readouts in a pathologist's words: one report line per figure, with the reference it is judged
against, and the checks a reader must see (stain, scan resolution, focus, tiles not read).

Used by ``marrowseg grade`` (:mod:`marrowseg.grade`), the HTML report and the QA notebook.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from marrowseg.outputs.metrics import (
    crushed,
    dab_run_off_reference,
    out_of_focus,
    pixel_size_suspect,
    scan_too_coarse,
    stain_fallbacks,
    stain_mismatch,
)

__all__ = ["STAINS", "STAIN_NAMES", "slide_report_lines"]

STAINS = ("he", "ecad", "reticulin")
STAIN_NAMES = {"he": "H&E", "ecad": "E-cadherin", "reticulin": "Gomori reticulin"}
_GRADING_REFERENCE = "WHO 2016 / EUMNET, Thiele et al. 2005"


def _cite(source: str | None, rule: str | None = None) -> str:
    """Short citation: 'Wong et al. 2023' from a rule name like ``wong2023``, else from the source text."""
    m = re.fullmatch(r"([a-z]+)(\d{4})", rule or "")
    if m:
        return f"{m.group(1).capitalize()} et al. {m.group(2)}"
    if not source:
        return "reference in config"
    author = re.match(r"\s*([A-Z][A-Za-z'\-]+)", source)
    year = re.search(r"\b(19|20)\d{2}\b", source)
    if author and year:
        return f"{author.group(1)} et al. {year.group(0)}"
    return source.split(".")[0][:60]


def _pct(frac: float | None) -> str:
    return "n/a" if frac is None else f"{100 * frac:.0f}%"


def _num(v: Any, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _he_lines(m: Mapping[str, Any]) -> list[str]:
    ro = m.get("readouts") or {}
    cell = ro.get("cellularity_pct")
    ref = ro.get("cellularity_reference")
    if cell is None:
        first = "Cellularity not assessable: no marrow space (haematopoietic tissue or fat) found"
    elif ref:
        age = m.get("age")
        if age is None:
            age = (m.get("interpretation") or {}).get("age_years")
        first = (f"Cellularity {cell:.0f}% (age-adjusted reference {ref['low']:.0f}-{ref['high']:.0f}% "
                 f"for {age:g} years, {_cite(ref.get('source'), ref.get('rule'))}): {ro.get('cellularity_verdict')}")
    else:
        first = f"Cellularity {cell:.0f}% (no age given, so no age-adjusted reference)"
    second = (f"Bone {_pct(ro.get('bone_area_frac'))} of the core; marrow space {_num(ro.get('marrow_area_mm2'), '.2f')} mm²; "
              # a lower bound on real sections: docs/validation.md, "megakaryocytes on real marrow"
              f"megakaryocytes {_num(ro.get('megakaryocytes_per_mm2'), '.0f')} per mm² (a lower bound: those "
              f"whose nuclear lobes lie apart are missed); late erythroid precursors "
              f"{_num(ro.get('late_erythroid_per_100'), '.1f')} per 100 nucleated cells (by nuclear "
              f"morphology alone, which small lymphocytes share; {_num(ro.get('nucleated_cells'), ',')} "
              f"nucleated cells counted)")
    return [first, second]


def _ecad_lines(m: Mapping[str, Any]) -> list[str]:
    ro = m.get("readouts") or {}
    it = m.get("interpretation") or {}
    per100 = ro.get("ecad_pos_per_100_nucleated")
    lsr = ro.get("left_shift_ratio")
    ci = ro.get("left_shift_ratio_ci95")
    r100 = it.get("ecad_pos_per_100_nucleated") or {}
    shift = it.get("left_shift") or {}
    ref = ""
    if r100.get("low") is not None and r100.get("high") is not None:
        ref = f" (expected about {r100['low']:g}-{r100['high']:g}, derived from aspirate differentials)"
    ratio = "left-shift ratio n/a (no erythroid precursors found)" if lsr is None else f"left-shift ratio {lsr:.2f}"
    if lsr is not None and ci:
        ratio += f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})"
    orient = shift.get("orientation") or {}
    if lsr is not None and orient.get("low") is not None and orient.get("high") is not None:
        ratio += f" [normal marrow about {orient['low']:.2f}-{orient['high']:.2f}, for orientation only]"
    verdict = shift.get("verdict")
    if verdict:
        n_ery = shift.get("erythroid_cells")
        ratio += f": {verdict}" + (f" ({n_ery} erythroid precursors counted)" if n_ery is not None else "")
    lines = [f"E-cadherin+ erythroid precursors {_num(per100, '.1f')} per 100 nucleated cells{ref}; {ratio}"]
    clusters = it.get("clusters") or {}
    if clusters.get("flag"):
        lines.append(f"Clusters of E-cadherin+ precursors: {clusters.get('value')} "
                     "(sheets of early erythroid cells; consider an erythroid neoplasm rather than a reactive shift; "
                     "their cells are marked ecad_cluster in cells.csv)")
    return lines


def _reticulin_lines(m: Mapping[str, Any]) -> list[str]:
    ro = m.get("readouts") or {}
    grade = ro.get("mf_grade")
    local = ro.get("local_grade_frac") or {}
    local_txt = ", ".join(f"{k} {100 * float(v):.0f}%" for k, v in local.items())
    rule = ro.get("grade_rule")
    frac = (m.get("provenance", {}).get("config", {}).get("reticulin", {}) or {}).get("grade_rule_frac")
    rule_txt = {"eumnet_30pct": f"highest grade in at least {100 * (frac or 0.3):.0f}% of the haematopoietic area",
                "max": "highest local grade", "majority": "grade of the largest area"}.get(rule, str(rule))
    first = (f"Reticulin fibrosis MF-{grade} (fibrosis index {_num(ro.get('fibrosis_index'), '.1f')}; fibre length density "
             f"{_num(ro.get('fibre_length_um_per_1e4um2'), ',.0f')} µm per 10,000 µm²; "
             f"{_num(ro.get('intersections_per_mm2'), ',.0f')} intersections per mm²); local grades: {local_txt} "
             f"({_GRADING_REFERENCE}; slide grade = {rule_txt})")
    alt = ro.get("mf_grade_borderline_with")
    if alt is not None:
        margin = (m.get("provenance", {}).get("config", {}).get("reticulin", {}) or {}).get("grade_borderline_margin")
        first += (f"; borderline between MF-{grade} and MF-{alt}: the deciding share lies within "
                  f"{100 * (margin or 0):.0f} points of the rule's {100 * (frac or 0.3):.0f}%")
    second = (f"Thick fibres {_pct(ro.get('thick_fibre_frac'))} of fibre length; collagen "
              f"{_num(None if ro.get('collagen_area_frac') is None else 100 * ro['collagen_area_frac'], '.1f')}% "
              f"of haematopoietic area; bone {_pct(ro.get('bone_area_frac'))} of the core")
    return [first, second]


_LINES: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "he": _he_lines, "ecad": _ecad_lines, "reticulin": _reticulin_lines,
}


# what reads low first when the tissue is blurred: scanned too coarsely (max_scan_mpp) or out of focus
_BLUR_LOSES = {"he": "the cell counts", "ecad": "the cell counts and membrane scores",
               "reticulin": "the fibre measurements"}


def slide_report_lines(metrics: Mapping[str, Any]) -> list[str]:
    """Report lines of one slide's ``metrics.json``, in haematopathology wording.

    Each line gives the figure and the reference it is judged against. Unknown stains give
    no lines.
    """
    fn = _LINES.get(str(metrics.get("stain")))
    if not fn:
        return []
    lines = fn(metrics)
    check = stain_mismatch(metrics)
    if check:
        looks = STAIN_NAMES.get(check["looks_like"], check["looks_like"])
        lines.append(f"Check the stain: analysed as {STAIN_NAMES.get(metrics.get('stain'), metrics.get('stain'))}, "
                     f"but its colours look like {looks} (confidence {float(check.get('confidence', 0)):.2f})")
    fallback = stain_fallbacks(metrics)
    if fallback:
        lines.append(f"Check the stain (its per-slide estimate fell back): {fallback}")
    ds = dab_run_off_reference(metrics)
    if ds is not None:
        lines.append(f"Check the staining run: its E-cadherin membranes were {'paler' if ds > 1 else 'heavier'} than "
                     f"the reference run (brought to it by x{ds:.2f} before positivity was judged, so the counts are "
                     "comparable); its controls deserve a look")
    coarse = scan_too_coarse(metrics)
    if coarse:
        what = _BLUR_LOSES.get(str(metrics.get("stain")), "the figures")
        lines.append(f"Check the scan: {float(coarse['scan_mpp']):.2f} µm/px is coarser than the "
                     f"{float(coarse['max_scan_mpp']):.2f} µm/px these figures were validated at; {what} may read low")
    scale = pixel_size_suspect(metrics)
    if scale:
        slide = metrics.get("slide") or {}
        lines.append(f"Check the pixel size: the nuclei measure {float(scale['geomean_area_um2']):.0f} µm² on average, "
                     f"outside the {scale['expected_um2'][0]:g}-{scale['expected_um2'][1]:g} µm² of marrow nuclei at "
                     f"{slide.get('mpp', '?')} µm/px; if that pixel size is wrong, so is every area and density above")
    crush = crushed(metrics)
    if crush:
        lines.append(f"Left out as crush artefact: {_num(float(crush['area_um2']) / 1e6, '.2f')} mm² "
                     f"({100 * float(crush['share_of_marrow']):.0f}% of the marrow), where the haematoxylin runs in "
                     "parallel strands; check it by eye (streaming fibrosis can look the same)")
    blurred = out_of_focus(metrics)
    if blurred:
        lines.append(f"Check the focus: {100 * float(blurred['out_of_focus_frac']):.0f}% of the tissue looked at is "
                     f"out of focus ({blurred['out_of_focus_tiles']} of {blurred['focus_judged_tiles']} tiles, "
                     f"{_num(float(blurred['out_of_focus_area_um2']) / 1e6, '.2f')} mm²); "
                     f"{_BLUR_LOSES.get(str(metrics.get('stain')), 'the figures')} there may read low")
    tiles = metrics.get("tiles") or {}
    if tiles.get("missing"):
        # every figure above leaves that area out: the reader must know the slide was not read whole
        lines.append(f"Not assessed: {tiles['missing']} of {tiles.get('n', '?')} tiles could not be read "
                     f"({_num((tiles.get('missing_area_um2') or 0) / 1e6, '.2f')} mm² left out of every figure; "
                     "tiles.csv gives each one's reason)")
    return lines
