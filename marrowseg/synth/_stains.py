"""The phantom's own optics: stain absorbance vectors and what each tissue part takes up.

Deliberately independent of ``marrowseg.stains``: the phantom must not share the
analyzers' idea of the stains, or a wrong vector would cancel out.

Every vector is an optical density (OD) direction over (R, G, B), normalised to unit length.
A pixel's OD is ``sum_i c_i * v_i`` (Beer-Lambert) and its intensity ``255 * 10**-OD``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["STAINS", "ROLES", "stain_spec"]


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


# H&E: the reference stain of Macenko M, Niethammer M, Marron JS, et al. A method for normalizing
# histology slides for quantitative analysis. Proc IEEE ISBI 2009:1107-1110 (the reference matrix of
# the authors' implementation, also QuPath's "H&E default" eosin). Not Ruifrok's, which the H&E
# analyzer deconvolves with: a phantom drawn with the analyzer's own vectors cannot show a hue error.
# The pink it draws (the OD direction of stained pixels with little haematoxylin) lies 8 degrees
# from real marrow's (mbm-dev) and 7.5 from three MoNuSeg labs', which lie within 4 of each other;
# Ruifrok's eosin drew it 20 degrees off. No published vector found lies nearer.
OD_HE_HAEMATOXYLIN = _unit([0.5626, 0.7201, 0.4062])
OD_HE_EOSIN = _unit([0.2159, 0.8012, 0.5581])
# Ruifrok AC, Johnston DA. Quantification of histochemical staining by color deconvolution.
# Anal Quant Cytol Histol 2001;23:291-299, Table 1 (H-DAB and Fast Red / Fast Blue / DAB).
OD_HAEMATOXYLIN = _unit([0.650, 0.704, 0.286])
OD_DAB = _unit([0.268, 0.570, 0.776])
# Fast Red, same table: stands in for the nuclear-fast-red (Kernechtrot) counterstain of
# Gomori reticulin, a pink-red dye of similar spectrum.
OD_FAST_RED = _unit([0.214, 0.851, 0.478])
# Metallic silver of reticulin fibres: near-neutral grey-black with a slight warm (brownish) tone,
# i.e. marginally more absorbance in blue than red. Chosen per the measured look of silver-
# impregnated fibres; the darkest 1 % of the BoMBR reticulin image (fig0) is consistent
# (its OD direction 0.44:0.64:0.63 also carries the pink counterstain).
OD_SILVER = _unit([0.555, 0.575, 0.600])
# Gold-toned bone matrix / collagen in Gomori: measured here as the mean OD over the
# bone ground-truth mask of the BoMBR reticulin image fig0 (~1 µm/px), OD (0.110, 0.289, 0.405).
OD_GOLD = _unit([0.110, 0.289, 0.405])

#: roles the object renderer composites (per-pixel maxima); each stain mixes them into dyes.
ROLES = ("nuc", "cyto", "cytb", "cov", "ring", "rbc", "fib", "col")
_R = {name: i for i, name in enumerate(ROLES)}


def _mix(dyes: dict[str, int], pairs: dict[str, dict[str, float]]) -> np.ndarray:
    m = np.zeros((len(ROLES), len(dyes)), np.float32)
    for role, row in pairs.items():
        for dye, val in row.items():
            m[_R[role], dyes[dye]] = val
    return m


def stain_spec(stain: str) -> dict:
    """Dye vectors, role->dye mixing and the tissue-wide (grid) uptakes of one stain."""
    if stain == "he":
        dyes = {"H": 0, "E": 1}
        vec = np.stack([OD_HE_HAEMATOXYLIN, OD_HE_EOSIN])
        mix = _mix(dyes, {
            # A full nucleus's haematoxylin; with the section-profile cells, real marrow (MBM
            # crops, shared data) reads a peak H OD within 1.75 µm of its annotated cell centres
            # of 0.47 / 0.52 / 0.65 / 0.81 (5th / 10th / 25th / 50th percentile) and this phantom
            # 0.38 / 0.46 / 0.62 / 0.78 (0.9 read 0.28 / 0.34 / 0.46 / 0.58: nuclei too pale); drawn in
            # Macenko's vectors and read through the analyzer's hue mapping, 0.38 / 0.47 / 0.64 / 0.81.
            "nuc": {"H": 1.25, "E": 0.10},
            # Real marrow's stained pixels read a median summed OD of 0.59 (mbm-dev at 0.5 µm/px, 27
            # crops without bone); cytoplasm at 0.75 made the phantom's marrow read 0.68 (0.56 at 0.55),
            # and its eosin as the analyzer separates it 0.30 against real 0.22 (0.25 at 0.55).
            "cyto": {"E": 0.55, "H": 0.03},
            "cytb": {"H": 1.0, "E": 0.25},   # basophilic cytoplasm of early erythroid cells
            "rbc": {"E": 0.95},
            "col": {"E": 0.6},
        })
        grid = {  # dye concentrations, OD units
            "stroma": {"E": 0.11, "H": 0.035},
            "membrane": {"E": 0.20, "H": 0.03},
            "fat": {"E": 0.01},
            "bone": {"E": 0.40, "H": 0.03},
            "sinus": {"E": 0.05},
            "glass": {"E": 0.004, "H": 0.004},
        }
    elif stain == "ecad":
        dyes = {"H": 0, "D": 1}
        vec = np.stack([OD_HAEMATOXYLIN, OD_DAB])
        mix = _mix(dyes, {
            "nuc": {"H": 0.62},
            "cyto": {"H": 0.03, "D": 0.015},
            "cytb": {"H": 0.06, "D": 0.02},
            "ring": {"D": 1.0},
            "rbc": {"H": 0.02, "D": 0.07},
            "col": {"H": 0.05},
        })
        grid = {
            "stroma": {"H": 0.06, "D": 0.03},
            "membrane": {"H": 0.14, "D": 0.05},
            "fat": {"H": 0.01, "D": 0.01},
            "bone": {"H": 0.16, "D": 0.06},
            "sinus": {"D": 0.02},
            "glass": {"H": 0.006, "D": 0.008},
        }
    elif stain == "reticulin":
        dyes = {"C": 0, "S": 1, "O": 2}
        vec = np.stack([OD_FAST_RED, OD_SILVER, OD_GOLD])
        mix = _mix(dyes, {
            "nuc": {"C": 0.42, "S": 0.06},
            "cyto": {"C": 0.10},
            "cytb": {"C": 0.12},
            "rbc": {"C": 0.08, "O": 0.10},
            "fib": {"S": 1.0},
            "col": {"S": 0.45, "O": 0.75},
        })
        grid = {
            "stroma": {"C": 0.15, "S": 0.05},
            "membrane": {"C": 0.22, "S": 0.10},
            "fat": {"C": 0.015},
            "bone": {"O": 0.55, "S": 0.03},
            "sinus": {"C": 0.05},
            "glass": {"C": 0.008, "S": 0.006},
        }
    else:  # pragma: no cover - guarded by make_phantom
        raise ValueError(stain)
    gridv = {k: np.array([row.get(d, 0.0) for d in dyes], np.float32) for k, row in grid.items()}
    return {"dyes": dyes, "vectors": vec.astype(np.float32), "mix": mix, "grid": gridv}


STAINS = ("he", "ecad", "reticulin")
