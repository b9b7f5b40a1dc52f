"""Fibre (reticulin) maths as pure functions: ridge filter, hysteresis, skeleton, junctions, widths.

The dense part (:func:`ridge_contrast_torch`) runs on batches in torch; the rest works on one
tile in NumPy/SciPy/scikit-image. Every threshold is in optical density (OD) or µm, never
relative to the tile.

Modules: ``ridge`` (the torch ridge filter and the fibre mask), ``skeleton`` (length, spurs,
junctions, crossings), ``overlap`` (crossing vs overlapping fibres) and ``width``. The public
names are importable from here.
"""

from __future__ import annotations

from marrowseg.analyzers.fibres.overlap import (
    boolean_factor,
    cover_without_own,
    crossing_overlap_factor,
    gaussian_zero_border,
    overlap_factor,
    overlap_fraction,
    own_cover,
)
from marrowseg.analyzers.fibres.ridge import (
    fibre_mask,
    gaussian_blur_torch,
    grey_dilation_torch,
    grey_opening_torch,
    ridge_contrast_torch,
)
from marrowseg.analyzers.fibres.skeleton import (
    branch_points,
    crossings,
    degree,
    label_sums,
    merge_points,
    prune_spurs,
    skeleton_length_weights,
)
from marrowseg.analyzers.fibres.width import (
    arm_width,
    branch_width_px,
    half_max_body,
    half_max_body_torch,
    half_max_rays,
    half_max_width_px,
    local_width_px,
)

__all__ = [
    "gaussian_blur_torch",
    "ridge_contrast_torch",
    "fibre_mask",
    "skeleton_length_weights",
    "branch_points",
    "merge_points",
    "crossings",
    "overlap_factor",
    "boolean_factor",
    "overlap_fraction",
    "crossing_overlap_factor",
    "own_cover",
    "cover_without_own",
    "arm_width",
    "prune_spurs",
    "grey_opening_torch",
    "grey_dilation_torch",
    "half_max_width_px",
    "local_width_px",
    "branch_width_px",
    "half_max_rays",
    "half_max_body_torch",
    "gaussian_zero_border",
    "half_max_body",
    "label_sums",
    "degree",
]
