"""Reticulin (Gomori silver) analyzer: fibre length density, intersections, thick fibres, MF grade.

Modules: ``grading`` (measurements -> MF grade, the heterogeneity rule), ``local`` (grades of
slide-aligned windows), ``dense`` (the torch step) and ``analyzer`` (:class:`ReticulinAnalyzer`).
The fibre geometry itself is :mod:`marrowseg.analyzers.fibres`. The public names are importable
from here.
"""

from __future__ import annotations

from marrowseg.analyzers.reticulin.analyzer import (
    BONE,
    EXCLUDED,
    FAT,
    GRADE_NAMES,
    GRADE_RGB,
    HAEM,
    ReticulinAnalyzer,
)
from marrowseg.analyzers.reticulin.grading import (
    MEASURES,
    apply_grade_rule,
    borderline_grade,
    grade_from_measurements,
    grade_index_array,
)
from marrowseg.analyzers.reticulin.local import (
    absorb_small_foci,
    local_grades,
    local_grades_from_config,
    window_readouts,
)

__all__ = [
    "ReticulinAnalyzer",
    "grade_from_measurements",
    "grade_index_array",
    "absorb_small_foci",
    "apply_grade_rule",
    "borderline_grade",
    "window_readouts",
    "local_grades",
    "local_grades_from_config",
    "EXCLUDED",
    "HAEM",
    "FAT",
    "BONE",
    "GRADE_NAMES",
    "GRADE_RGB",
    "MEASURES",
]
