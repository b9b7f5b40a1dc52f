"""A pathologist's review of a batch: ``reviews.csv`` and agreement with the measurements.

``OUT_DIR/reviews.csv`` holds one row per (slide, reviewer): the verdict (``agree`` with the
readout, or ``override`` it), the pathologist's own grade, cellularity or E-cadherin+ share where
they override, and a comment. It sits beside the analysis outputs and never changes them: metrics stay what
the software measured; the review is a second opinion next to it.

Agreement statistics
    * grades (reticulin MF-0..3): Cohen's weighted kappa (quadratic weights by default; Cohen
      1968, Psychol Bull 70:213-220), the usual measure for ordinal grades;
    * cellularity (%) and E-cadherin+ cells per 100 nucleated cells: Bland-Altman bias and 95%
      limits of agreement (Bland & Altman 1986, Lancet 1:307-310);
    * the slides with the largest disagreement, in units a reader can compare (grade steps,
      percentage points).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from marrowseg.errors import MarrowsegError
from marrowseg.outputs.atomic import atomic_write_bytes

__all__ = [
    "REVIEW_COLUMNS",
    "REVIEWED",
    "VERDICTS",
    "reviews_path",
    "read_reviews",
    "write_reviews",
    "record_review",
    "import_reviews",
    "cohen_weighted_kappa",
    "bland_altman",
    "review_pairs",
    "agreement",
]

REVIEW_COLUMNS = ("slide_id", "stain", "reviewer", "verdict", "mf_grade", "cellularity_pct",
                  "ecad_pos_per_100_nucleated", "comment", "reviewed_at")
#: readouts a review may give its own value of (each is also a column of reviews.csv)
REVIEWED = ("mf_grade", "cellularity_pct", "ecad_pos_per_100_nucleated")
#: how far apart counts as one step of disagreement, per readout (one MF grade ~ 10 points of
#: cellularity ~ 2 E-cad+ cells per 100, about the normal share itself), for ranking the largest
_STEP = {"mf_grade": 1.0, "cellularity_pct": 10.0, "ecad_pos_per_100_nucleated": 2.0}
VERDICTS = ("agree", "override")
_FILE = "reviews.csv"


def reviews_path(out_dir: str | Path) -> Path:
    """``OUT_DIR/reviews.csv``."""
    return Path(out_dir) / _FILE


def _opt_float(value: Any, what: str, where: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise MarrowsegError(f"{where}: {what} {value!r} is not a number") from None
    if not math.isfinite(out):
        raise MarrowsegError(f"{where}: {what} {value!r} is not finite")
    return out


def _clean(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One review row in canonical form; raises MarrowsegError naming the problem."""
    slide = str(row.get("slide_id") or "").strip()
    if not slide:
        raise MarrowsegError(f"{where}: review without slide_id")
    verdict = str(row.get("verdict") or "").strip().lower()
    if verdict not in VERDICTS:
        raise MarrowsegError(f"{where}: slide {slide}: verdict {verdict!r}; expected agree or override")
    grade = _opt_float(row.get("mf_grade"), "mf_grade", where)
    if grade is not None and (grade not in (0, 1, 2, 3)):
        raise MarrowsegError(f"{where}: slide {slide}: mf_grade {row.get('mf_grade')!r}; expected 0, 1, 2 or 3")
    cell = _opt_float(row.get("cellularity_pct"), "cellularity_pct", where)
    if cell is not None and not 0 <= cell <= 100:
        raise MarrowsegError(f"{where}: slide {slide}: cellularity_pct {cell} outside 0-100")
    ecad = _opt_float(row.get("ecad_pos_per_100_nucleated"), "ecad_pos_per_100_nucleated", where)
    if ecad is not None and not 0 <= ecad <= 100:
        raise MarrowsegError(f"{where}: slide {slide}: ecad_pos_per_100_nucleated {ecad} outside 0-100")
    if (verdict == "override" and grade is None and cell is None and ecad is None
            and not str(row.get("comment") or "").strip()):
        raise MarrowsegError(f"{where}: slide {slide}: an override needs mf_grade, cellularity_pct, "
                             "ecad_pos_per_100_nucleated or a comment")
    return {
        "slide_id": slide,
        "stain": str(row.get("stain") or "").strip(),
        "reviewer": str(row.get("reviewer") or "").strip(),
        "verdict": verdict,
        "mf_grade": None if grade is None else int(grade),
        "cellularity_pct": cell,
        "ecad_pos_per_100_nucleated": ecad,
        "comment": str(row.get("comment") or "").strip(),
        "reviewed_at": str(row.get("reviewed_at") or "").strip(),
    }


def read_reviews(out_dir_or_csv: str | Path) -> list[dict[str, Any]]:
    """Reviews of a batch, one dict per row (empty list when there is no reviews.csv).

    Parameters
    ----------
    out_dir_or_csv : path-like
        A batch output folder (reads its ``reviews.csv``) or a CSV file.
    """
    path = Path(out_dir_or_csv)
    if path.is_dir():
        path = reviews_path(path)
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"slide_id", "verdict"} - set(reader.fieldnames or ())
        if missing:
            raise MarrowsegError(f"{path}: missing column(s) {', '.join(sorted(missing))}; "
                                 f"expected {', '.join(REVIEW_COLUMNS)}")
        return [_clean(r, f"{path} line {i + 2}") for i, r in enumerate(reader)]


def write_reviews(out_dir: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``reviews.csv`` atomically (rows validated; one per slide and reviewer, last wins)."""
    path = reviews_path(out_dir)
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        c = _clean(r, str(path))
        by_key[(c["slide_id"], c["reviewer"])] = c
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=REVIEW_COLUMNS, lineterminator="\n")
    w.writeheader()
    for c in by_key.values():
        w.writerow({k: ("" if c[k] is None else c[k]) for k in REVIEW_COLUMNS})
    return atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def record_review(
    out_dir: str | Path,
    slide_id: str,
    verdict: str,
    *,
    reviewer: str = "",
    stain: str = "",
    mf_grade: int | None = None,
    cellularity_pct: float | None = None,
    ecad_pos_per_100_nucleated: float | None = None,
    comment: str = "",
) -> Path:
    """Add or replace one review in ``OUT_DIR/reviews.csv``; metrics are not touched.

    Parameters
    ----------
    out_dir : path-like
        Batch output folder.
    slide_id : str
        The slide's folder name in the batch.
    verdict : {'agree', 'override'}
    mf_grade : int, optional
        The pathologist's MF grade (0-3) when overriding a reticulin slide.
    cellularity_pct : float, optional
        The pathologist's cellularity estimate, %, when overriding an H&E slide.
    ecad_pos_per_100_nucleated : float, optional
        The pathologist's estimate of E-cadherin+ cells per 100 nucleated cells, when
        overriding an E-cadherin slide.

    Raises
    ------
    MarrowsegError
        Unknown verdict, grade outside 0-3, cellularity or E-cad+ share outside 0-100, or an
        empty override.
    """
    rows = read_reviews(out_dir)
    rows.append({"slide_id": slide_id, "stain": stain, "reviewer": reviewer, "verdict": verdict,
                 "mf_grade": mf_grade, "cellularity_pct": cellularity_pct,
                 "ecad_pos_per_100_nucleated": ecad_pos_per_100_nucleated, "comment": comment,
                 "reviewed_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")})
    return write_reviews(out_dir, rows)


def import_reviews(out_dir: str | Path, csv_path: str | Path) -> Path:
    """Merge the reviews of another CSV (same columns) into ``OUT_DIR/reviews.csv``."""
    return write_reviews(out_dir, read_reviews(out_dir) + read_reviews(Path(csv_path)))


# ----------------------------------------------------------------------------- statistics
def cohen_weighted_kappa(a: Sequence[int], b: Sequence[int], *, n_categories: int = 4,
                         weights: str = "quadratic") -> float:
    """Cohen's weighted kappa of two raters' ordinal grades 0..n_categories-1.

    Parameters
    ----------
    a, b : sequence of int
        Grades of the same items by each rater.
    n_categories : int
        Number of ordered categories (4 for MF-0..MF-3).
    weights : {'quadratic', 'linear', 'none'}
        Disagreement weight of categories i, j: ((i-j)/(k-1))**2, |i-j|/(k-1) or (i != j).

    Returns
    -------
    float
        1 for perfect agreement, 0 for chance; nan when undefined (fewer than one item, or
        both raters used one and the same category only).

    References
    ----------
    Cohen J. Weighted kappa. Psychol Bull 1968;70:213-220.
    """
    x = np.asarray(a, dtype=np.int64)
    y = np.asarray(b, dtype=np.int64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"expected two 1-d sequences of equal length, got {x.shape} and {y.shape}")
    k = int(n_categories)
    if len(x) == 0:
        return float("nan")
    if x.min() < 0 or y.min() < 0 or x.max() >= k or y.max() >= k:
        raise ValueError(f"grades must lie in 0..{k - 1}")
    obs = np.zeros((k, k), np.float64)
    np.add.at(obs, (x, y), 1.0)
    obs /= obs.sum()
    exp = np.outer(obs.sum(1), obs.sum(0))
    i, j = np.indices((k, k))
    if weights == "quadratic":
        w = ((i - j) / (k - 1)) ** 2
    elif weights == "linear":
        w = np.abs(i - j) / (k - 1)
    elif weights == "none":
        w = (i != j).astype(np.float64)
    else:
        raise ValueError(f"weights {weights!r}; expected quadratic, linear or none")
    d_exp = float((w * exp).sum())
    if d_exp == 0:
        return float("nan")
    return float(1.0 - (w * obs).sum() / d_exp)


def bland_altman(measured: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Bland-Altman agreement of a measurement with a reference (differences measured - reference).

    Returns
    -------
    dict
        ``n``, ``bias`` (mean difference), ``sd`` (of the differences, ddof=1; nan for n < 2),
        ``loa_low``, ``loa_high`` (bias -/+ 1.96 sd), in the unit of the inputs.

    References
    ----------
    Bland JM, Altman DG. Statistical methods for assessing agreement between two methods of
    clinical measurement. Lancet 1986;1:307-310.
    """
    m = np.asarray(measured, np.float64)
    r = np.asarray(reference, np.float64)
    if m.shape != r.shape or m.ndim != 1:
        raise ValueError(f"expected two 1-d sequences of equal length, got {m.shape} and {r.shape}")
    d = m - r
    n = len(d)
    bias = float(d.mean()) if n else float("nan")
    sd = float(d.std(ddof=1)) if n >= 2 else float("nan")
    return {"n": n, "bias": bias, "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd}


def review_pairs(slides: Iterable[Mapping[str, Any]], reviews: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pair each review with the slide's measured readout.

    Parameters
    ----------
    slides : iterable of dict
        ``slide_id``, ``stain`` and ``readouts`` (as in metrics.json) of each analysed slide.
    reviews : iterable of dict
        From :func:`read_reviews`.

    Returns
    -------
    list of dict
        ``slide_id``, ``stain``, ``reviewer``, ``quantity`` (one of :data:`REVIEWED`),
        ``measured``, ``reviewed`` (the measured value where the verdict is agree and no own value
        was given), ``difference`` (measured - reviewed), ``verdict``, ``comment``. Reviews of
        slides without that readout are left out.
    """
    by_id = {str(s["slide_id"]): s for s in slides}
    out = []
    for rv in reviews:
        s = by_id.get(str(rv["slide_id"]))
        if s is None:
            continue
        ro = s.get("readouts") or {}
        for qty in REVIEWED:
            measured = ro.get(qty)
            if measured is None:
                continue
            own = rv.get(qty)
            if own is None and rv.get("verdict") != "agree":
                continue  # an override of something else (e.g. a comment only)
            reviewed = float(measured) if own is None else float(own)
            out.append({"slide_id": s["slide_id"], "stain": s.get("stain", ""), "reviewer": rv.get("reviewer", ""),
                        "quantity": qty, "measured": float(measured), "reviewed": reviewed,
                        "difference": float(measured) - reviewed, "verdict": rv.get("verdict"),
                        "comment": rv.get("comment", "")})
    return out


def agreement(slides: Iterable[Mapping[str, Any]], reviews: Iterable[Mapping[str, Any]], *,
              n_largest: int = 5) -> dict[str, Any]:
    """Agreement of the measurements with the pathologists' reviews.

    Returns
    -------
    dict
        ``n_reviews``; ``grade`` (``n``, ``kappa_quadratic``, ``kappa_linear``, ``exact_frac``);
        ``cellularity`` (Bland-Altman of measured - reviewed, percentage points); ``ecad_pos``
        (the same for E-cad+ cells per 100 nucleated cells); ``largest``: up to ``n_largest``
        pairs by disagreement (one MF step weighs like 10 points of cellularity and 2 E-cad+
        cells per 100), largest first, zero differences left out.
    """
    reviews = list(reviews)
    pairs = review_pairs(slides, reviews)
    g = [p for p in pairs if p["quantity"] == "mf_grade"]
    c = [p for p in pairs if p["quantity"] == "cellularity_pct"]
    gm = [int(p["measured"]) for p in g]
    gr = [int(p["reviewed"]) for p in g]
    grade = {
        "n": len(g),
        "kappa_quadratic": cohen_weighted_kappa(gm, gr, weights="quadratic"),
        "kappa_linear": cohen_weighted_kappa(gm, gr, weights="linear"),
        "exact_frac": float(np.mean([a == b for a, b in zip(gm, gr, strict=True)])) if g else float("nan"),
    }
    cell = bland_altman([p["measured"] for p in c], [p["reviewed"] for p in c])
    e = [p for p in pairs if p["quantity"] == "ecad_pos_per_100_nucleated"]
    ecad = bland_altman([p["measured"] for p in e], [p["reviewed"] for p in e])

    def weight(p: dict[str, Any]) -> float:
        return abs(p["difference"]) / _STEP[p["quantity"]]

    largest = sorted((p for p in pairs if p["difference"] != 0), key=weight, reverse=True)[:n_largest]
    return {"n_reviews": len(reviews), "grade": grade, "cellularity": cell, "ecad_pos": ecad, "largest": largest}
