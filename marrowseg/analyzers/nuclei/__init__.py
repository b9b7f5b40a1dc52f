"""Nuclear detection and morphology classes on a haematoxylin optical-density image.

Pure functions shared by the H&E analyzer and the E-cadherin analyzer (which passes the
haematoxylin counterstain channel). Nothing here sees RGB: the caller deconvolves.

Pipeline (classical detector)::

    peak_map = gaussian(h_od, peak_sigma_um)     # dense: torch, see NucleusMaps
    mask_map = gaussian(h_od, mask_sigma_um)
    mask     = mask_map > mask_od
    mask    &= mask_map > gaussian(h_od, mask_background_sigma_um) + mask_contrast_od   # optional
    centres  = local maxima of peak_map, >= min_peak_od, >= min_distance_um apart, inside mask
               (seeds: distance -- maxima of the distance to the mask's edge + a little peak_map,
               so touching nuclei sharing one haematoxylin maximum get a seed each; he.yaml)
    labels   = watershed(-peak_map (or that distance relief), centres, mask)
    labels   = split_by_shape(labels)                # optional: large, non-convex regions cut
                                                     # at their waists (overlapping nuclei)
    labels   = merge_megakaryocytes(labels)          # optional: the lobes and chromatin peaks of
                                                     # one very large nucleus made one again
    labels   = split_by_area(labels)                 # optional: a region round(area / nucleus
                                                     # area) >= 2 nuclei large is cut by k-means
    labels   = group_lobes(labels)                   # optional: small lobes (< min_area_um2) of one
                                                     # segmented nucleus made one cell; other
                                                     # regions < min_area_um2 dropped
    labels   = drop_thin(labels)                     # optional: strips narrower than min_width_um
    faint    = faint_nuclei(...)                     # optional, called by the analyzers: pale nuclei
                                                     # below the mask, by their local contrast
    centres  = core_centroids(labels)                # optional: centre of mass of each region's
                                                     # smoothed haematoxylin above
                                                     # centre_core_fraction x its maximum
    table    = per-label centroid, area_um2, eccentricity, solidity, h_od_mean, h_od_cv

The table is the stable interface (column names below); ``classify_nuclei`` turns it into
class names using sizes in µm² from the config.

Modules, in the order the pipeline uses them: ``maps`` (dense maps and the nuclear mask), ``seeds``
(maxima, centres, regions grown from seeds), ``watershed``, ``split`` (regions of several nuclei),
``lobes`` (lobes grouped, megakaryocytes merged, thin strips dropped), ``faint`` (pale nuclei),
``detect`` (the detector that runs them), ``table`` (measurements and classes). The public names
are all importable from here.
"""

from __future__ import annotations

from marrowseg.analyzers.nuclei.detect import detect_nuclei
from marrowseg.analyzers.nuclei.faint import faint_nuclei
from marrowseg.analyzers.nuclei.lobes import drop_thin, group_lobes, merge_megakaryocytes
from marrowseg.analyzers.nuclei.maps import (
    NucleusMaps,
    background_factor,
    fill_holes,
    gaussian_blur_torch,
    gaussian_reference,
    nuclear_mask,
    reference_maps,
    upsample_background,
)
from marrowseg.analyzers.nuclei.seeds import (
    core_centroids,
    detect_nuclei_from_centre_map,
    local_peaks,
    nuclei_from_centres,
    unseeded_components,
)
from marrowseg.analyzers.nuclei.split import split_by_area, split_by_shape
from marrowseg.analyzers.nuclei.table import (
    NUCLEUS_CLASSES,
    NUCLEUS_COLUMNS,
    classify_nuclei,
    ellipse_width_um,
    empty_table,
    label_measurements,
    measure_labels,
    nearest_pixels,
)

__all__ = [
    "NUCLEUS_COLUMNS",
    "NUCLEUS_CLASSES",
    "gaussian_blur_torch",
    "NucleusMaps",
    "detect_nuclei",
    "detect_nuclei_from_centre_map",
    "nuclei_from_centres",
    "unseeded_components",
    "nuclear_mask",
    "core_centroids",
    "background_factor",
    "upsample_background",
    "split_by_shape",
    "split_by_area",
    "merge_megakaryocytes",
    "group_lobes",
    "drop_thin",
    "ellipse_width_um",
    "classify_nuclei",
    "empty_table",
    "label_measurements",
    "measure_labels",
    "nearest_pixels",
    "fill_holes",
    "local_peaks",
    "gaussian_reference",
    "reference_maps",
    "faint_nuclei",
]
