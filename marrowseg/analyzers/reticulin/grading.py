"""The measurement -> MF grade mapping (WHO 2016 / EUMNET, thresholds from ``configs/reticulin.yaml``), the
heterogeneity rule and the borderline margin.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["grade_index_array", "grade_from_measurements", "apply_grade_rule", "borderline_grade"]


MEASURES = ("fibre_length_um_per_1e4um2", "intersections_per_mm2", "thick_fibre_frac")


def _step_index(value: np.ndarray, thresholds: tuple[float, float, float]) -> np.ndarray:
    """Piecewise-linear 0..3 index of a measurement (any shape) against its MF-1..MF-3 bounds."""
    value = np.asarray(value, np.float64)
    idx = np.zeros(value.shape, np.float64)
    prev = 0.0
    prev_full = np.ones(value.shape, bool)
    for thr in thresholds:
        if thr <= prev:
            step = (value >= thr).astype(np.float64)
        else:
            step = np.clip((value - prev) / (thr - prev), 0.0, 1.0)
        # a grade's band only counts once every lower band is full
        step = np.where(prev_full, step, 0.0)
        idx += step
        prev_full = prev_full & (step >= 1.0)
        prev = thr
    return idx


def grade_index_array(measures: dict[str, np.ndarray], thresholds: Any) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise :func:`grade_from_measurements` over arrays of measurements.

    Parameters
    ----------
    measures : dict of str to ndarray
        ``fibre_length_um_per_1e4um2``, ``intersections_per_mm2``, ``thick_fibre_frac``, all
        of one shape.
    thresholds : GradeThresholds
        Lower bounds of MF-1..MF-3 per measurement.

    Returns
    -------
    grade : int8 ndarray
        0..3.
    index : float64 ndarray
        0..3.
    """
    idx = np.minimum.reduce([_step_index(measures[k], tuple(getattr(thresholds, k))) for k in MEASURES])
    idx = np.clip(idx, 0.0, 3.0)
    grade = np.minimum(3, np.floor(idx + 1e-9)).astype(np.int8)
    return grade, idx


def grade_from_measurements(measures: dict[str, float], thresholds: Any) -> tuple[int, float]:
    """MF grade and continuous fibrosis index from the three fibre measurements.

    Each measurement ``m`` gives a piecewise-linear index: 0 at 0, 1 at its MF-1 bound,
    2 at MF-2, 3 at MF-3 (a bound equal to the previous one is a step). The fibrosis index
    is the minimum over measurements (a grade needs all its criteria), so it is continuous
    in the length density, monotone in every measurement, and ``floor`` gives the grade.

    Parameters
    ----------
    measures : dict
        ``fibre_length_um_per_1e4um2``, ``intersections_per_mm2``, ``thick_fibre_frac``.
    thresholds : GradeThresholds
        Lower bounds of MF-1..MF-3 per measurement.

    Returns
    -------
    grade : int
        0..3.
    index : float
        0..3.
    """
    grade, idx = grade_index_array({k: np.float64(measures[k]) for k in MEASURES}, thresholds)
    return int(grade), float(idx)


def apply_grade_rule(area_by_grade: dict[int, float], rule: str, frac: float) -> int:
    """Slide grade from the haematopoietic area at each local grade.

    Parameters
    ----------
    area_by_grade : dict of int to float
        Haematopoietic area (any unit) graded 0..3.
    rule : {'eumnet_30pct', 'max', 'majority'}
        ``eumnet_30pct``: highest grade present in at least ``frac`` of the area (EUMNET:
        heterogeneous marrow is graded by the highest grade in >= 30 % of it); ``max``: the
        highest grade anywhere; ``majority``: the grade with the largest area (ties: higher).
    frac : float
        Share of area for ``eumnet_30pct``.

    Returns
    -------
    int
        0..3; 0 when no area was graded.
    """
    total = float(sum(area_by_grade.values()))
    if total <= 0:
        return 0
    present = [g for g in range(4) if area_by_grade.get(g, 0.0) > 0]
    if rule == "max":
        return max(present)
    if rule == "majority":
        return max(range(4), key=lambda g: (area_by_grade.get(g, 0.0), g))
    if rule == "eumnet_30pct":
        for g in range(3, -1, -1):
            if area_by_grade.get(g, 0.0) >= frac * total - 1e-9 * total:
                return g
        # no single grade reaches the share: fall to the grade reached cumulatively from the top
        acc = 0.0
        for g in range(3, -1, -1):
            acc += area_by_grade.get(g, 0.0)
            if acc >= frac * total:
                return g
        return 0
    raise ValueError(f"unknown grade rule {rule!r}; expected eumnet_30pct, max or majority")


def borderline_grade(area_by_grade: dict[int, float], frac: float, margin: float) -> int | None:
    """The other grade of a heterogeneous marrow whose ``eumnet_30pct`` grade hangs on a share near ``frac``.

    Parameters
    ----------
    area_by_grade : dict of int to float
        Haematopoietic area (any unit) graded 0..3.
    frac : float
        The rule's share (0.30).
    margin : float
        How close to ``frac`` a deciding share must lie, as a share of the area.

    Returns
    -------
    int or None
        The grade :func:`apply_grade_rule` would give if the deciding share nearest to ``frac``
        crossed it (a higher grade just short of it, or the graded one just over it), when that
        share lies within ``margin`` of ``frac``; None otherwise.
    """
    total = float(sum(area_by_grade.values()))
    if total <= 0 or margin <= 0:
        return None
    share = {g: area_by_grade.get(g, 0.0) / total for g in range(4)}
    grade = apply_grade_rule(area_by_grade, "eumnet_30pct", frac)
    nearest: tuple[float, int] | None = None
    for g in range(grade + 1, 4):  # a higher grade just short of the share
        d = frac - share[g]
        if 0 < d <= margin and share[g] > 0 and (nearest is None or d < nearest[0]):
            nearest = (d, g)
    d = share[grade] - frac  # the graded one just over it
    if 0 <= d <= margin and (nearest is None or d < nearest[0]):
        fewer = dict(area_by_grade)
        rest = total - area_by_grade.get(grade, 0.0)
        fewer[grade] = (1 - 1e-6) * frac * rest / (1 - frac)  # just under frac of the new total
        other = apply_grade_rule(fewer, "eumnet_30pct", frac)
        if other != grade:
            nearest = (d, other)
    return None if nearest is None else nearest[1]
