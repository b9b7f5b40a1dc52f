"""One report per biopsy: the H&E, E-cadherin and reticulin readouts in a pathologist's words.

A haematopathologist reports a trephine biopsy, not a slide: cellularity from the H&E,
erythroid left shift from the E-cadherin, fibrosis grade from the reticulin. This module puts
the report lines of each slide (:func:`marrowseg.report.wording.slide_report_lines`: "Cellularity
55% (age-adjusted reference 30-75% for 45 years, Wong et al. 2023): normocellular") into one case
document, groups a batch's slides into cases by the manifest's ``patient`` and ``biopsy_date``
(``cases.csv``), and runs ``marrowseg grade``: analyse each slide for its stain, then report the case.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from marrowseg.errors import MarrowsegError
from marrowseg.outputs.atomic import atomic_write_bytes
from marrowseg.report.slides import SlideOutput, load_slide_output, write_windows_csv
from marrowseg.report.wording import STAIN_NAMES, STAINS, slide_report_lines

__all__ = [
    "STAINS",
    "STAIN_NAMES",
    "slide_report_lines",
    "case_document",
    "case_text",
    "resolve_stains",
    "recognise_stain",
    "grade_slides",
    "CASES_COLUMNS",
    "group_cases",
    "write_cases_csv",
]

log = logging.getLogger(__name__)

def case_document(slides: Sequence[SlideOutput], *, stain_sources: Mapping[str, str] | None = None,
                  out_dir: str | Path | None = None, case: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document of one case: per-slide readouts and report lines, in stain order.

    Parameters
    ----------
    slides : sequence of SlideOutput
        The analysed slides of one biopsy.
    stain_sources : dict, optional
        slide_id -> how its stain was chosen ('given', 'auto: ... confidence ...').
    out_dir : path-like, optional
        Where the analyses are kept (None when they were written to a temporary folder).
    case : dict, optional
        ``patient``, ``biopsy_date`` and the like.

    Returns
    -------
    dict
        ``case``, ``report`` (all lines), ``slides`` (``slide_id``, ``path``, ``stain``,
        ``stain_source``, ``out_dir``, ``readouts``, ``interpretation``, ``report``), ``missing_stains``, ``out``.
    """
    order = {s: i for i, s in enumerate(STAINS)}
    ordered = sorted(slides, key=lambda s: (order.get(s.stain, 9), s.slide_id))
    docs = []
    for s in ordered:
        docs.append({
            "slide_id": s.slide_id,
            "path": str(s.metrics.get("slide", {}).get("path", "")),
            "stain": s.stain,
            "stain_source": (stain_sources or {}).get(s.slide_id, "given"),
            "out_dir": None if out_dir is None else str(s.out_dir),
            "age": s.metrics.get("age"),
            "readouts": s.readouts,
            "interpretation": s.metrics.get("interpretation"),
            "report": slide_report_lines(s.metrics),
        })
    return {
        "case": dict(case or {}),
        "report": [line for d in docs for line in d["report"]],
        "slides": docs,
        "missing_stains": [st for st in STAINS if st not in {s.stain for s in slides}],
        "out": None if out_dir is None else str(out_dir),
    }


def case_text(doc: Mapping[str, Any]) -> str:
    """The case report as plain text: one heading, then each slide's lines."""
    n = len(doc["slides"])
    head = "Bone marrow trephine" + (f", {doc['case'].get('patient')}" if doc["case"].get("patient") else "") + \
        (f", {doc['case'].get('biopsy_date')}" if doc["case"].get("biopsy_date") else "") + \
        f": {n} slide{'s' if n != 1 else ''}"
    out = [head]
    for d in doc["slides"]:
        src = "" if d["stain_source"] == "given" else f"; stain {d['stain_source']}"
        out.append(f"{STAIN_NAMES.get(d['stain'], d['stain'])} ({Path(d['path']).name}{src}):")
        out.extend(f"  {line}" for line in d["report"])
    if doc.get("missing_stains"):
        out.append("Not assessed (no slide): " + ", ".join(STAIN_NAMES[s] for s in doc["missing_stains"]))
    if doc.get("out"):
        out.append(f"Analyses in {doc['out']}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- grading slides
def resolve_stains(n_slides: int, stains: Sequence[str] | None) -> list[str]:
    """One stain per slide from ``--stain`` given none (auto), once for all, or once per slide.

    Raises
    ------
    MarrowsegError
        Wrong number of stains, or an unknown stain.
    """
    given = [s.strip().lower() for s in (stains or ["auto"])]
    for s in given:
        if s not in (*STAINS, "auto"):
            raise MarrowsegError(f"--stain {s!r}: expected auto, he, ecad or reticulin")
    if len(given) == 1:
        return given * n_slides
    if len(given) != n_slides:
        raise MarrowsegError(f"--stain given {len(given)} times for {n_slides} slides; "
                             "give it once for all slides or once per slide, in the same order")
    return given


def recognise_stain(path: str | Path, *, mpp: float | None = None) -> tuple[str, str]:
    """Recognise a slide's stain from its colour (``--stain auto``).

    Returns
    -------
    stain : str
    source : str
        How it was found, e.g. ``'auto: silver stain, confidence 0.62'``.

    Raises
    ------
    MarrowsegError
        No stain recogniser in this installation, or its confidence is too low.
    """
    try:
        from marrowseg.stain_id import identify_slide
    except ImportError:
        raise MarrowsegError(f"{path}: --stain auto needs marrowseg.stain_id, which this installation "
                             "lacks; pass --stain he|ecad|reticulin") from None
    from marrowseg.io import open_slide

    with open_slide(path, mpp=mpp) as reader:
        guess = identify_slide(reader)
    if guess.stain is None:
        raise MarrowsegError(f"{path}: cannot recognise the stain from colour (best guess {guess.colour_class}, "
                             f"confidence {guess.confidence:.2f}); pass --stain he|ecad|reticulin")
    return guess.stain, f"auto: {guess.colour_class} colours, confidence {guess.confidence:.2f}"


def _unique_ids(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = p.name.split(".")[0] or p.name
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return out


def grade_slides(
    slides: Sequence[str | Path],
    stains: Sequence[str] | None = None,
    out_dir: str | Path = ".",
    *,
    age: float | None = None,
    mpp: float | None = None,
    progress_for: Callable[[str, str], Any] | None = None,
    command: list[str] | None = None,
) -> tuple[dict[str, Any], list[SlideOutput]]:
    """Analyse the slides of one biopsy (each for its stain) and build the case document.

    Parameters
    ----------
    slides : sequence of path-like
    stains : sequence of str, optional
        None or ``['auto']``: recognise each slide's stain; one stain for all; or one per slide.
    out_dir : path-like
        Each slide's analysis goes to ``out_dir/<slide stem>/`` (plus ``windows.csv``).
    age : float, optional
        Patient age, years (age-adjusted cellularity reference).
    mpp : float, optional
        Pixel size override, µm/px, for every slide.
    progress_for : callable, optional
        ``progress_for(slide_name, stain)`` returns a context manager yielding a
        ``(done, total, megapixels)`` callback (or None).

    Returns
    -------
    doc : dict
        See :func:`case_document` (``out`` set to ``out_dir``).
    outputs : list of SlideOutput

    Raises
    ------
    MarrowsegError
        A missing slide, a stain that cannot be resolved, or any analysis error.
    """
    from contextlib import nullcontext

    from marrowseg.config import load_config
    from marrowseg.pipeline import analyze_slide

    if not slides:
        raise MarrowsegError("no slides given")
    paths = [Path(p) for p in slides]
    for p in paths:
        if not p.exists():
            raise MarrowsegError(f"{p}: no such file")
    wanted = resolve_stains(len(paths), stains)
    out_root = Path(out_dir)
    sources: dict[str, str] = {}
    outputs = []
    for path, sid, stain in zip(paths, _unique_ids(paths), wanted, strict=True):
        if stain == "auto":
            stain, sources[sid] = recognise_stain(path, mpp=mpp)
            log.info("%s: stain %s (%s)", path, stain, sources[sid])
        else:
            sources[sid] = "given"
        ctx = progress_for(path.name, stain) if progress_for else nullcontext(None)
        with ctx as cb:
            _, result = analyze_slide(path, stain, out_root / sid, mpp=mpp, age=age, config=load_config(stain),
                                      progress=cb, command=command)
        write_windows_csv(out_root / sid, result)
        outputs.append(load_slide_output(out_root / sid))
    return case_document(outputs, stain_sources=sources, out_dir=out_root), outputs


# ----------------------------------------------------------------------------- cases.csv
CASES_COLUMNS = (
    "patient", "biopsy_date", "n_slides", "slides", "failed_slides", "age",
    "he_slide", "cellularity_pct", "cellularity_reference_low_pct", "cellularity_reference_high_pct",
    "cellularity_verdict",
    "ecad_slide", "ecad_pos_per_100_nucleated", "left_shift_ratio", "left_shift_ratio_ci95_low",
    "left_shift_ratio_ci95_high", "left_shift_verdict",
    "reticulin_slide", "mf_grade", "fibrosis_index", "fibre_length_um_per_1e4um2", "intersections_per_mm2",
    "local_mf0_frac", "local_mf1_frac", "local_mf2_frac", "local_mf3_frac",
    "notes", "report",
)


def _row_id(row: Mapping[str, Any]) -> str:
    for k in ("slide_id", "id", "slide", "name"):
        if row.get(k) not in (None, ""):
            return str(row[k])
    p = row.get("path") or row.get("slide_path")
    return Path(str(p)).name.split(".")[0] if p else ""


def group_cases(out_dir: str | Path, rows: Iterable[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Group a batch's slides into biopsies (cases) by the manifest's ``patient`` and ``biopsy_date``.

    Parameters
    ----------
    out_dir : path-like
        Batch output folder (``OUT/<slide-id>/metrics.json``).
    rows : iterable of dict, optional
        Summary or manifest rows, each naming its slide by ``slide_id`` (or ``id``, ``slide``,
        ``name``, or a ``path`` whose stem is the slide id), optionally with ``status``,
        ``reason``, ``patient`` and ``biopsy_date``. Default: ``OUT/summary.csv``; without it,
        every ``OUT/*/metrics.json``.

    Returns
    -------
    list of dict
        ``patient``, ``biopsy_date``, ``slides`` (SlideOutput list) and ``failed`` (dicts with
        ``slide_id`` and ``reason``), sorted by patient and date. The case key comes from the
        slide's ``metrics.json`` ``manifest`` first, then from the row; a slide without a
        patient is a case of its own.
    """
    root = Path(out_dir)
    if rows is None:
        summary = root / "summary.csv"
        if summary.exists():
            with summary.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        else:
            rows = [{"slide_id": p.parent.name} for p in sorted(root.glob("*/metrics.json"))]
    cases: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        sid = _row_id(row)
        if not sid:
            continue
        failed = str(row.get("status", "")).lower() == "failed"
        slide = None
        if not failed and (root / sid / "metrics.json").exists():
            slide = load_slide_output(root / sid)
        elif not failed:
            failed, row = True, {**row, "reason": row.get("reason") or "no metrics.json in the output folder"}
        man = slide.manifest if slide is not None else {}
        patient = str(man.get("patient") or row.get("patient") or row.get("manifest.patient") or "").strip()
        date = str(man.get("biopsy_date") or row.get("biopsy_date") or row.get("manifest.biopsy_date") or "").strip()
        key = (patient, date) if patient else (f"slide:{sid}", "")
        case = cases.setdefault(key, {"patient": patient or sid, "biopsy_date": date, "slides": [], "failed": []})
        if failed:
            case["failed"].append({"slide_id": sid, "reason": str(row.get("reason") or row.get("error") or "")})
        else:
            case["slides"].append(slide)
    return [cases[k] for k in sorted(cases)]


def _case_row(case: Mapping[str, Any]) -> dict[str, Any]:
    slides: list[SlideOutput] = case["slides"]
    row: dict[str, Any] = {k: "" for k in CASES_COLUMNS}
    row.update(patient=case["patient"], biopsy_date=case["biopsy_date"],
               n_slides=len(slides) + len(case["failed"]),
               slides=";".join(s.slide_id for s in slides),
               failed_slides=";".join(f"{f['slide_id']} ({f['reason']})" for f in case["failed"]))
    notes = []
    by_stain: dict[str, SlideOutput] = {}
    for s in sorted(slides, key=lambda s: s.slide_id):
        if s.stain in by_stain:
            notes.append(f"several {s.stain} slides; {by_stain[s.stain].slide_id} reported")
            continue
        by_stain[s.stain] = s
    ages = {s.metrics.get("age") for s in slides if s.metrics.get("age") is not None}
    row["age"] = ";".join(f"{a:g}" for a in sorted(ages))
    if he := by_stain.get("he"):
        ro = he.readouts
        ref = ro.get("cellularity_reference") or {}
        row.update(he_slide=he.slide_id, cellularity_pct=ro.get("cellularity_pct"),
                   cellularity_reference_low_pct=ref.get("low"), cellularity_reference_high_pct=ref.get("high"),
                   cellularity_verdict=ro.get("cellularity_verdict"))
    if ec := by_stain.get("ecad"):
        ro = ec.readouts
        ci = ro.get("left_shift_ratio_ci95") or [None, None]
        row.update(ecad_slide=ec.slide_id, ecad_pos_per_100_nucleated=ro.get("ecad_pos_per_100_nucleated"),
                   left_shift_ratio=ro.get("left_shift_ratio"), left_shift_ratio_ci95_low=ci[0],
                   left_shift_ratio_ci95_high=ci[1],
                   left_shift_verdict=((ec.metrics.get("interpretation") or {}).get("left_shift") or {}).get("verdict"))
    if rt := by_stain.get("reticulin"):
        ro = rt.readouts
        local = ro.get("local_grade_frac") or {}
        row.update(reticulin_slide=rt.slide_id, mf_grade=ro.get("mf_grade"), fibrosis_index=ro.get("fibrosis_index"),
                   fibre_length_um_per_1e4um2=ro.get("fibre_length_um_per_1e4um2"),
                   intersections_per_mm2=ro.get("intersections_per_mm2"),
                   **{f"local_mf{g}_frac": local.get(f"MF-{g}") for g in range(4)})
    missing = [STAIN_NAMES[s] for s in STAINS if s not in by_stain]
    if missing:
        notes.append("no " + ", ".join(missing) + " result")
    row["notes"] = "; ".join(notes)
    row["report"] = " | ".join(line for s in by_stain.values() for line in slide_report_lines(s.metrics))
    return {k: ("" if v is None else v) for k, v in row.items()}


def write_cases_csv(batch_out_dir: str | Path, rows: Iterable[Mapping[str, Any]] | None = None) -> Path:
    """Write ``OUT/cases.csv``: one row per biopsy with its H&E, E-cadherin and reticulin readouts.

    Parameters
    ----------
    batch_out_dir : path-like
        The batch output folder (``OUT/<slide-id>/metrics.json``; ``OUT/summary.csv``).
    rows : iterable of dict, optional
        Summary or manifest rows (see :func:`group_cases`); default ``OUT/summary.csv``.

    Returns
    -------
    Path
        The CSV written (atomically); columns :data:`CASES_COLUMNS`.
    """
    root = Path(batch_out_dir)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CASES_COLUMNS, lineterminator="\n")
    w.writeheader()
    for case in group_cases(root, rows):
        w.writerow({k: (json.dumps(v) if isinstance(v, list | dict) else v) for k, v in _case_row(case).items()})
    return atomic_write_bytes(root / "cases.csv", buf.getvalue().encode("utf-8"))
