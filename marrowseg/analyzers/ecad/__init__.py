"""E-cadherin IHC analyzer: erythroid left shift from membrane DAB on early precursors.

Modules: ``stain`` (haematoxylin-DAB vectors, counterstain scale, the dense torch step),
``dab_level`` (the slide's membrane DAB level and the DAB scale), ``membrane`` (ring scores and other per-cell DAB measurements), ``clusters`` (sheets of E-cad+
cells), ``readouts`` (the Wilson interval and verdicts) and ``analyzer`` (:class:`ECadAnalyzer`,
which runs them per tile and forms the slide readouts). The public names are importable from here.
"""

from __future__ import annotations

from marrowseg.analyzers.ecad.analyzer import CELL_CLASSES, ECadAnalyzer
from marrowseg.analyzers.ecad.clusters import count_clusters, sheet_members
from marrowseg.analyzers.ecad.dab_level import dab_scale, membrane_level
from marrowseg.analyzers.ecad.membrane import (
    inside_enclosure,
    membrane_enclosures,
    rim_density,
    ring_enclosed_cells,
    ring_scores,
    unstained_part,
)
from marrowseg.analyzers.ecad.readouts import wilson_interval
from marrowseg.analyzers.ecad.stain import (
    ECadModule,
    estimate_hdab_vectors,
    haematoxylin_scale,
    hdab_matrix,
)

__all__ = [
    "ECadAnalyzer",
    "dab_scale",
    "membrane_level",
    "ECadModule",
    "CELL_CLASSES",
    "inside_enclosure",
    "membrane_enclosures",
    "hdab_matrix",
    "estimate_hdab_vectors",
    "haematoxylin_scale",
    "ring_scores",
    "ring_enclosed_cells",
    "unstained_part",
    "rim_density",
    "count_clusters",
    "sheet_members",
    "wilson_interval",
]
