"""The resolution-independent world model of one phantom trephine.

Two layers:

* a coarse **layout** (core outline, bone ridge field, fat propensity, local fibrosis
  grade) kept as small arrays at ``layout_mpp`` (2-8 µm per node) plus analytic curves;
* **objects** (adipocytes, nucleated cells, red cells, osteocytes, reticulin fibres)
  generated per square spatial block from a generator seeded by ``(seed, kind, block)``,
  so any tile needs only the blocks around it and an object straddling a block edge is
  the same object seen from either side.

Coordinates are µm from the slide's top-left corner, ``x`` to the right, ``y`` down.
Labels: 0 glass, 1 haematopoietic, 2 fat (adipocyte spaces incl. membranes), 3 bone.

Literature ranges used for sizes (diameters unless stated):

* adipocytes 50-100 µm (marrow adipocytes; Gimble JM et al., Bone 1996;19:421-428);
  membranes 1-2 µm.
* trabecular bone area ~20-25 % of the core in normal adults (iliac crest histomorphometry,
  Parfitt AM et al., J Bone Miner Res 1987;2:595-610); osteosclerosis in MF-3 (Thiele J et al.,
  Haematologica 2005;90:1128-1132).
* myeloid cells 10-18 µm, nuclei 7-12 µm (myeloblast to segmented neutrophil); proerythroblast
  cell 12-16 µm (nucleus 9-11), basophilic erythroblast 10-13 µm (nucleus 7-9),
  polychromatic 8-10 µm (nucleus 5.5-7), orthochromatic 7-9 µm with a pyknotic 5-6 µm nucleus;
  lymphocytes 7-9 µm with a 6-8 µm nucleus; megakaryocytes 30-100 µm with a lobulated nucleus
  (Bain BJ, Clark DM, Wilkins BS. Bone Marrow Pathology, 5th ed., Wiley 2019, ch. 1).
* differential of nucleated marrow cells: myeloid ~60 %, erythroid ~25 %, lymphocytes ~10-15 %,
  erythroid islands (same source); megakaryocytes ~10-25 per mm² of marrow (Thiele J et al.,
  Leuk Lymphoma 1999).
* reticulin fibres 0.5-2 µm wide, collagen bundles 3-8 µm; fibre length density anchors
  242 / 713 / 1828 µm per 10,000 µm² for grades I / II / III of a three-grade scale,
  mapped here to MF-1 / MF-2 / MF-3 (EUMNET grading: Thiele J et al., Haematologica 2005).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scipy.spatial import cKDTree

from marrowseg.synth import _noise as nz

# Block sizes, µm.
ADIPO_BLOCK_UM = 256.0
CELL_BLOCK_UM = 64.0
FIBRE_BLOCK_UM = 128.0

ADIPO_SPACING_UM = 64.0          # jittered grid: 4 x 4 seeds per block
ADIPO_R_UM = (25.0, 45.0)        # "radius" (power weight) -> 50-90 µm spaces
ADIPO_REACH = 1.25               # a space reaches at most 1.25 * r from its seed
# A fatty marrow (aplastic, or the elderly) leaves only scattered cells between the spaces; the
# gaps a 1.25 r reach leaves are ~10-15 % of the marrow, so a request below that widens the reach
# (up to this) until the spaces can fill the marrow to the requested fraction.
ADIPO_REACH_MAX = 3.0
MEMBRANE_UM = 1.5
CELL_SPACING_UM = 8.0
# Jitter of a cell centre in its 8-µm grid square, as a fraction of the spacing. 0.30 keeps the
# nearest-neighbour distances of cell centres near those of real marrow sections (MBM dots at
# 0.25 µm/px: 1st / 5th / 10th percentile 3.7 / 4.6 / 5.0 µm; this grid: 3.8 / 4.3 / 4.6 µm).
# 0.42 put 18 % of cells within 4 µm of another (2 % in real marrow): nuclei 7-12 µm across
# cannot sit that close in a 3-4 µm section.
CELL_JITTER = 0.30
# Trephine sections are cut at 2-3 µm (Bain BJ et al., Bone Marrow Pathology, 5th ed., ch. 1);
# a cell is seen as the profile the section cuts from it (see _cell_geometry).
SECTION_UM = 3.0
# A nuclear cap crossed over less than this (a third of the section) is too faint to be seen as
# a nucleus: it is neither drawn nor listed.
NUC_MIN_PATH_UM = 1.0
RBC_SPACING_UM = 4.6
RBC_RADIUS_UM = (3.4, 3.9)       # erythrocytes 6.8-7.8 µm across, ~2 µm thick
RBC_THICKNESS_UM = 2.0
RBC_AMP = (0.38, 0.6)
# haemorrhage (biopsy-induced bleeding into the marrow): lakes of packed erythrocytes, the blood of
# the sinusoids spilled into the tissue; their outline follows a smooth random field of this scale
HAEMORRHAGE_SIGMA_UM = 120.0
# sheets of early erythroid precursors (a neoplastic erythroid proliferation: pure erythroid leukaemia,
# MDS with erythroid predominance) replace the marrow, fat included, in discs of 5-10 proerythroblasts
# across (cells 12-16 µm; Bain, Clark & Wilkins ch. 1); distinct sheets lie at least this far apart
SHEET_DIAMETER_UM = (60.0, 150.0)
SHEET_GAP_UM = 60.0
THICK_FIBRE_UM = 2.5             # fibres at least this wide count as thick (collagen bundles)
FIBRE_STEP_UM = 1.5

# Per MF grade: target length density (µm / 1e4 µm²), length range, width range (µm),
# thick-bundle fraction of fibres, bundle width range and turning s.d. per step (rad).
FIBRE_GRADES = {
    0: dict(density=60.0, length=(8.0, 28.0), width=(0.5, 0.8), thick=0.0, angle_sd=0.07),
    1: dict(density=242.0, length=(15.0, 60.0), width=(0.5, 1.0), thick=0.0, angle_sd=0.10),
    2: dict(density=713.0, length=(20.0, 80.0), width=(0.6, 1.5), thick=0.05, angle_sd=0.10),
    3: dict(density=1828.0, length=(20.0, 100.0), width=(0.7, 2.0), thick=0.16, angle_sd=0.08),
}
BUNDLE_WIDTH_UM = (3.0, 8.0)
BUNDLE_LENGTH_UM = (40.0, 110.0)
FIBRE_REACH_UM = 112.0           # no fibre point lies further than this from its seed

# Cell classes used for counts and truth.
CLASSES = ("myeloid", "early_erythroid", "late_erythroid", "lymphocyte", "megakaryocyte")
STAGES = ("myeloblast", "myelocyte", "metamyelocyte", "band", "segmented",
          "proerythroblast", "basophilic_erythroblast", "polychromatic_erythroblast",
          "orthochromatic_erythroblast", "lymphocyte", "megakaryocyte")
_STAGE_CLASS = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 4])

# Keys for the noise / generator streams.
K_CORE, K_BONE, K_FAT, K_ADIPO, K_CELL, K_MK, K_SINUS, K_SINUS2, K_ERY, K_FIB, K_GRADE, K_HAEM, K_SHEET = range(13)
_BLOCK_OFF = 1 << 20


@dataclass(frozen=True)
class Params:
    """Resolved phantom parameters (see :func:`marrowseg.synth.make_phantom`)."""

    stain: str
    seed: int
    size_px: tuple[int, int]
    mpp: float
    cellularity_pct: float
    left_shift_ratio: float
    grade: int
    heterogeneous: str | None
    stain_jitter: float
    haemorrhage_pct: float = 0.0
    sheets: int = 0


def in_disc(x: np.ndarray, y: np.ndarray, disc: np.ndarray) -> np.ndarray:
    """Whether points (µm) lie in the disc ``(centre x, centre y, radius)``, its edge included."""
    sx, sy, r = disc
    return (x - sx) ** 2 + (y - sy) ** 2 <= r * r


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, *[int(p) + _BLOCK_OFF for p in parts]])


def _smooth_field(rng: np.random.Generator, nx: int, ny: int, lm: float, sigma_um: float) -> np.ndarray:
    """Unit-variance Gaussian random field on the layout grid (made coarse, then cubic-upsampled)."""
    step = sigma_um / 4.0
    cx = int(math.ceil(nx * lm / step)) + 4
    cy = int(math.ceil(ny * lm / step)) + 4
    f = gaussian_filter(rng.standard_normal((cy, cx)), 4.0, mode="wrap")
    f = (f - f.mean()) / f.std()
    out = cv2.resize(f.astype(np.float32), (int(round(cx * step / lm)), int(round(cy * step / lm))),
                     interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(out[:ny, :nx])


def _bilinear_grid(field: np.ndarray, lm: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Sample a layout field on a pixel grid (separable bilinear, edges clamped)."""
    ny, nx = field.shape
    gx = np.clip(xs / lm, 0.0, nx - 1.000001)
    gy = np.clip(ys / lm, 0.0, ny - 1.000001)
    ix = gx.astype(np.int64)
    iy = gy.astype(np.int64)
    tx = (gx - ix).astype(np.float32)
    ty = (gy - iy).astype(np.float32)
    x0, x1 = int(ix.min()), int(ix.max()) + 2
    y0, y1 = int(iy.min()), int(iy.max()) + 2
    sub = field[y0:y1, x0:x1]
    jx, jy = ix - x0, iy - y0
    rows = sub[jy] * (1 - ty)[:, None] + sub[jy + 1] * ty[:, None]
    return rows[:, jx] * (1 - tx)[None, :] + rows[:, jx + 1] * tx[None, :]


def _bilinear_pts(field: np.ndarray, lm: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    ny, nx = field.shape
    gx = np.clip(np.asarray(x, np.float64) / lm, 0.0, nx - 1.000001)
    gy = np.clip(np.asarray(y, np.float64) / lm, 0.0, ny - 1.000001)
    ix = gx.astype(np.int64)
    iy = gy.astype(np.int64)
    tx = gx - ix
    ty = gy - iy
    f = field.astype(np.float64, copy=False)
    return ((f[iy, ix] * (1 - tx) + f[iy, ix + 1] * tx) * (1 - ty)
            + (f[iy + 1, ix] * (1 - tx) + f[iy + 1, ix + 1] * tx) * ty)


def parse_heterogeneous(spec: str | None, grade: int) -> tuple[str, int, int, float] | None:
    """``half-A-B`` (long axis split) or ``patch-A-B[-PCT]`` (PCT % of the core at grade B in A)."""
    if spec is None:
        return None
    parts = spec.lower().replace(":", "-").replace("/", "-").split("-")
    kind = parts[0]
    if kind not in ("half", "patch"):
        raise ValueError(f"heterogeneous={spec!r}: expected 'half-A-B' or 'patch-A-B[-PCT]'")
    defaults = {"half": (0, 2, 50.0), "patch": (1, 3, 25.0)}[kind]
    try:
        a = int(parts[1]) if len(parts) > 1 else defaults[0]
        b = int(parts[2]) if len(parts) > 2 else defaults[1]
        pct = float(parts[3]) if len(parts) > 3 else defaults[2]
    except ValueError:
        raise ValueError(f"heterogeneous={spec!r}: grades must be integers 0-3") from None
    if not (0 <= a <= 3 and 0 <= b <= 3 and 0 < pct < 100):
        raise ValueError(f"heterogeneous={spec!r}: grades must be 0-3 and PCT in (0, 100)")
    return kind, a, b, pct


class World:
    """Layout and object generators of one phantom; all queries are pure functions of position."""

    def __init__(self, p: Params):
        self.p = p
        self.width_um = p.size_px[0] * p.mpp
        self.height_um = p.size_px[1] * p.mpp
        long_um, short_um = max(self.width_um, self.height_um), min(self.width_um, self.height_um)
        self.long_x = self.width_um >= self.height_um
        rng = _rng(p.seed, K_CORE)
        # --- core: a band along the long axis with rounded ends ----------------------------
        self.core_w_um = min(rng.uniform(1500.0, 2000.0), 0.72 * short_um)
        # a whole core on slides of 4 mm and more; on smaller fields a band crossing the field
        self.core_len_um = 0.92 * long_um if long_um >= 4000 else 3.0 * long_um
        self.u_mid = long_um / 2
        self.v_mid = short_um / 2
        self.bend_amp = 0.04 * short_um * rng.uniform(0.3, 1.0)
        self.bend_per = long_um * rng.uniform(0.9, 1.8)
        self.bend_ph = rng.uniform(0, 2 * np.pi)
        self.w_per = long_um * rng.uniform(0.4, 0.8)
        self.w_ph = rng.uniform(0, 2 * np.pi)
        # --- layout grid ------------------------------------------------------------------
        self.lm = float(np.clip(long_um / 2500.0, 2.0, 8.0))
        self.nx = int(math.ceil(self.width_um / self.lm)) + 2
        self.ny = int(math.ceil(self.height_um / self.lm)) + 2
        gx = np.arange(self.nx) * self.lm
        gy = np.arange(self.ny) * self.lm
        core_nodes = self.core_grid(gx, gy)
        self.grade_map = self._make_grade_map(gx, gy, core_nodes)
        self.bone_n = _smooth_field(_rng(p.seed, K_BONE), self.nx, self.ny, self.lm, 200.0)
        self.fat_n = _smooth_field(_rng(p.seed, K_FAT), self.nx, self.ny, self.lm, 110.0)
        # bone: |n| < t * widen, widen > 1 where the local grade is 3 (osteosclerosis)
        widen = np.where(self.grade_map == 3, 1.6, 1.0).astype(np.float32)
        target = float(np.where(self.grade_map[core_nodes] == 3, 0.34, 0.22).mean()) if core_nodes.any() else 0.22
        ratio = np.abs(self.bone_n[core_nodes]) / widen[core_nodes]
        t = float(np.quantile(ratio, target)) if ratio.size else 0.3
        self.bone_t = (t * widen).astype(np.float32)
        marrow_nodes = core_nodes & ~(np.abs(self.bone_n) < self.bone_t)
        # haemorrhage replaces marrow (never bone) in the top haemorrhage_pct % of a smooth field
        self.hmr_n: np.ndarray | None = None
        self.hmr_t = np.inf
        if p.haemorrhage_pct > 0:
            self.hmr_n = _smooth_field(_rng(p.seed, K_HAEM), self.nx, self.ny, self.lm, HAEMORRHAGE_SIGMA_UM)
            if marrow_nodes.any():
                self.hmr_t = float(np.quantile(self.hmr_n[marrow_nodes], 1.0 - p.haemorrhage_pct / 100.0))
            marrow_nodes &= ~(self.hmr_n > self.hmr_t)
        # sheets: (n, 3) centre x, y and radius, µm
        self.sheet_xyr = self._place_sheets(gx, gy, marrow_nodes) if p.sheets > 0 else np.zeros((0, 3))
        self.fat_thr = 0.0
        self.adipo_reach = ADIPO_REACH
        self.fat_thr = self._calibrate_fat(p.cellularity_pct)

    def _place_sheets(self, gx: np.ndarray, gy: np.ndarray, marrow: np.ndarray) -> np.ndarray:
        """Centres and radii (µm) of up to ``p.sheets`` discs wholly inside the marrow (layout nodes
        in the core, not bone or blood) and the slide, apart."""
        rng = _rng(self.p.seed, K_SHEET)
        room = distance_transform_edt(marrow) * self.lm  # µm from a node to the nearest non-marrow node
        gxx, gyy = np.meshgrid(gx, gy)
        out: list[tuple[float, float, float]] = []
        for _ in range(int(self.p.sheets)):
            r = rng.uniform(*SHEET_DIAMETER_UM) / 2
            ok = (room >= r + self.lm) & (gxx >= r) & (gxx <= self.width_um - r) & (gyy >= r) & (gyy <= self.height_um - r)
            for x, y, rr in out:
                ok &= np.hypot(gxx - x, gyy - y) >= r + rr + SHEET_GAP_UM
            idx = np.flatnonzero(ok)
            if idx.size == 0:
                break  # no room left: the truth lists the sheets placed
            k = int(idx[rng.integers(idx.size)])
            out.append((float(gxx.flat[k]), float(gyy.flat[k]), float(r)))
        return np.array(out, np.float64).reshape(-1, 3)

    def sheet_pts(self, x, y) -> np.ndarray:
        """Inside a sheet of early erythroid precursors; ``x`` and ``y`` (µm) broadcast together."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        out = np.zeros(np.broadcast_shapes(x.shape, y.shape), bool)
        for disc in self.sheet_xyr:
            out |= in_disc(x, y, disc)
        return out

    def sheet_grid(self, xs, ys) -> np.ndarray:
        """Inside a sheet, on the grid ``ys`` x ``xs``."""
        return self.sheet_pts(np.asarray(xs)[None, :], np.asarray(ys)[:, None])

    # ------------------------------------------------------------------ layout pieces
    def _uv(self, x, y):
        return (x, y) if self.long_x else (y, x)

    def _core_centre_halfwidth(self, u: np.ndarray):
        c = self.v_mid + self.bend_amp * np.sin(2 * np.pi * u / self.bend_per + self.bend_ph)
        hw0 = self.core_w_um / 2
        hw = hw0 * (1 + 0.04 * np.sin(2 * np.pi * u / self.w_per + self.w_ph))
        du = np.abs(u - self.u_mid) - (self.core_len_um / 2 - hw0)
        cap = np.sqrt(np.clip(1 - (np.maximum(du, 0) / hw0) ** 2, 0, 1))
        return c, hw * cap

    def core_bbox_um(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) box that contains the whole core."""
        m = 40.0
        u0, u1 = self.u_mid - self.core_len_um / 2 - m, self.u_mid + self.core_len_um / 2 + m
        hv = self.bend_amp + self.core_w_um / 2 * 1.05 + m
        v0, v1 = self.v_mid - hv, self.v_mid + hv
        return (u0, v0, u1, v1) if self.long_x else (v0, u0, v1, u1)

    def core_grid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        rough = nz.value_noise_grid(xs, ys, 25.0, nz.key_of(self.p.seed, K_CORE)) * 6.0
        if self.long_x:
            c, hw = self._core_centre_halfwidth(xs)
            return np.abs(ys[:, None] - c[None, :]) < hw[None, :] + rough
        c, hw = self._core_centre_halfwidth(ys)
        return np.abs(xs[None, :] - c[:, None]) < hw[:, None] + rough

    def core_pts(self, x, y) -> np.ndarray:
        rough = nz.value_noise_pts(x, y, 25.0, nz.key_of(self.p.seed, K_CORE)) * 6.0
        u, v = self._uv(x, y)
        c, hw = self._core_centre_halfwidth(u)
        return np.abs(v - c) < hw + rough

    def _make_grade_map(self, gx, gy, core_nodes) -> np.ndarray:
        het = parse_heterogeneous(self.p.heterogeneous, self.p.grade)
        gm = np.full((self.ny, self.nx), self.p.grade, np.uint8)
        if het is None:
            return gm
        kind, a, b, pct = het
        if kind == "half":
            u = gx[None, :] if self.long_x else gy[:, None]
            gm = np.where(np.broadcast_to(u, gm.shape) < self.u_mid, a, b).astype(np.uint8)
        else:
            f = _smooth_field(_rng(self.p.seed, K_GRADE), self.nx, self.ny, self.lm, 220.0)
            thr = np.quantile(f[core_nodes], 1 - pct / 100.0) if core_nodes.any() else np.inf
            gm = np.where(f > thr, b, a).astype(np.uint8)
        return gm

    def grade_grid(self, xs, ys) -> np.ndarray:
        ix = np.clip(np.rint(xs / self.lm).astype(np.int64), 0, self.nx - 1)
        iy = np.clip(np.rint(ys / self.lm).astype(np.int64), 0, self.ny - 1)
        return self.grade_map[iy][:, ix]

    def grade_pts(self, x, y) -> np.ndarray:
        ix = np.clip(np.rint(np.asarray(x) / self.lm).astype(np.int64), 0, self.nx - 1)
        iy = np.clip(np.rint(np.asarray(y) / self.lm).astype(np.int64), 0, self.ny - 1)
        return self.grade_map[iy, ix]

    def bone_value_grid(self, xs, ys):
        """(signed ridge value n, threshold t) on a grid: bone where |n| < t."""
        n = _bilinear_grid(self.bone_n, self.lm, xs, ys)
        n += 0.02 * nz.value_noise_grid(xs, ys, 9.0, nz.key_of(self.p.seed, K_BONE))
        return n, _bilinear_grid(self.bone_t, self.lm, xs, ys)

    def bone_pts(self, x, y) -> np.ndarray:
        n = _bilinear_pts(self.bone_n, self.lm, x, y)
        n = n + 0.02 * nz.value_noise_pts(x, y, 9.0, nz.key_of(self.p.seed, K_BONE))
        return np.abs(n) < _bilinear_pts(self.bone_t, self.lm, x, y)

    def haemorrhage_grid(self, xs, ys) -> np.ndarray:
        """Where blood has spilled (outside the core and in bone it is not drawn)."""
        if self.hmr_n is None:
            return np.zeros((np.size(ys), np.size(xs)), bool)
        return _bilinear_grid(self.hmr_n, self.lm, xs, ys) > self.hmr_t

    def haemorrhage_pts(self, x, y) -> np.ndarray:
        if self.hmr_n is None:
            return np.zeros(np.shape(x), bool)
        return _bilinear_pts(self.hmr_n, self.lm, x, y) > self.hmr_t

    def sinus_grid(self, xs, ys) -> np.ndarray:
        a = nz.value_noise_grid(xs, ys, 55.0, nz.key_of(self.p.seed, K_SINUS))
        b = nz.value_noise_grid(xs, ys, 140.0, nz.key_of(self.p.seed, K_SINUS2))
        return (np.abs(a) < 0.07) & (b > 0.05)

    def sinus_pts(self, x, y) -> np.ndarray:
        a = nz.value_noise_pts(x, y, 55.0, nz.key_of(self.p.seed, K_SINUS))
        b = nz.value_noise_pts(x, y, 140.0, nz.key_of(self.p.seed, K_SINUS2))
        return (np.abs(a) < 0.07) & (b > 0.05)

    # ------------------------------------------------------------------ adipocytes
    @lru_cache(maxsize=4096)  # noqa: B019 - the world lives as long as its cache should
    def adipo_block(self, bx: int, by: int):
        """Seeds of one adipocyte block: x, y, radius (µm), score (fat propensity)."""
        rng = _rng(self.p.seed, K_ADIPO, bx, by)
        n = int(ADIPO_BLOCK_UM / ADIPO_SPACING_UM)
        j, i = np.mgrid[0:n, 0:n]
        x = bx * ADIPO_BLOCK_UM + (i.ravel() + 0.5 + rng.uniform(-0.38, 0.38, n * n)) * ADIPO_SPACING_UM
        y = by * ADIPO_BLOCK_UM + (j.ravel() + 0.5 + rng.uniform(-0.38, 0.38, n * n)) * ADIPO_SPACING_UM
        r = rng.uniform(*ADIPO_R_UM, n * n)
        score = _bilinear_pts(self.fat_n, self.lm, x, y) + 0.6 * rng.standard_normal(n * n)
        core = self.core_pts(x, y)
        score = np.where(core, score, -np.inf)
        return x, y, r, score

    def adipo_seeds(self, x0, y0, x1, y1, thr=None):
        """Alive adipocyte seeds whose reach can touch the box: arrays x, y, r."""
        thr = self.fat_thr if thr is None else thr
        m = ADIPO_R_UM[1] * self.adipo_reach
        bxs = range(int(math.floor((x0 - m) / ADIPO_BLOCK_UM)), int(math.floor((x1 + m) / ADIPO_BLOCK_UM)) + 1)
        bys = range(int(math.floor((y0 - m) / ADIPO_BLOCK_UM)), int(math.floor((y1 + m) / ADIPO_BLOCK_UM)) + 1)
        parts = [self.adipo_block(bx, by) for by in bys for bx in bxs]
        x, y, r, s = (np.concatenate([q[k] for q in parts]) for k in range(4))
        keep = s > thr
        return x[keep], y[keep], r[keep]

    def _fat_pts_with(self, x, y, sx, sy, sr) -> np.ndarray:
        if sx.size == 0:
            return np.zeros(np.shape(x), bool)
        tree = cKDTree(np.column_stack([sx, sy]))
        k = min(8, sx.size)
        d, idx = tree.query(np.column_stack([x, y]), k=k, distance_upper_bound=ADIPO_R_UM[1] * self.adipo_reach)
        d = d.reshape(len(x), k)
        idx = idx.reshape(len(x), k)
        ok = np.isfinite(d)
        idc = np.where(ok, idx, 0)
        within = ok & (d <= self.adipo_reach * sr[idc])
        return within.any(axis=1)

    def fat_pts(self, x, y) -> np.ndarray:
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        if x.size == 0:
            return np.zeros(0, bool)
        sx, sy, sr = self.adipo_seeds(x.min(), y.min(), x.max(), y.max())
        return self._fat_pts_with(x, y, sx, sy, sr)

    def _calibrate_fat(self, cellularity_pct: float) -> float:
        """Threshold on seed scores so that fat / (fat + haem) matches the request (sampled)."""
        x0, y0, x1, y1 = self.core_bbox_um()
        x0, y0 = max(x0, 0.0), max(y0, 0.0)
        x1, y1 = min(x1, self.width_um), min(y1, self.height_um)
        rng = _rng(self.p.seed, K_FAT, 99)
        n = 40000
        x = rng.uniform(x0, x1, n)
        y = rng.uniform(y0, y1, n)
        keep = self.core_pts(x, y) & ~self.bone_pts(x, y)
        x, y = x[keep], y[keep]
        if x.size < 100:
            return 0.0
        return self._bisect_fat(x, y, cellularity_pct)

    def _bisect_fat(self, x, y, cellularity_pct):
        want_fat = 1.0 - cellularity_pct / 100.0
        if want_fat <= 0:
            return float(np.inf)
        q = 1.0 - want_fat
        while True:
            best = self._best_fat_score(x, y)
            unreached = int(np.count_nonzero(~np.isfinite(best)))
            # the quantile interpolates from sorted index floor((n - 1) q): it must be a reached point
            if math.floor((best.size - 1) * q) >= unreached:
                return float(np.quantile(best, q))
            if self.adipo_reach >= ADIPO_REACH_MAX:  # even the widest reach cannot: all that reaches is fat
                return float(-np.inf)
            self.adipo_reach = min(self.adipo_reach * 1.1, ADIPO_REACH_MAX)

    def _best_fat_score(self, x, y) -> np.ndarray:
        """Highest score among the seeds whose reach covers each point (-inf: none reaches)."""
        x0, y0, x1, y1 = x.min(), y.min(), x.max(), y.max()
        m = ADIPO_R_UM[1] * self.adipo_reach
        bxs = range(int(math.floor((x0 - m) / ADIPO_BLOCK_UM)), int(math.floor((x1 + m) / ADIPO_BLOCK_UM)) + 1)
        bys = range(int(math.floor((y0 - m) / ADIPO_BLOCK_UM)), int(math.floor((y1 + m) / ADIPO_BLOCK_UM)) + 1)
        parts = [self.adipo_block(bx, by) for by in bys for bx in bxs]
        sx, sy, sr, ss = (np.concatenate([q[k] for q in parts]) for k in range(4))
        fin = np.isfinite(ss)
        sx, sy, sr, ss = sx[fin], sy[fin], sr[fin], ss[fin]
        tree = cKDTree(np.column_stack([sx, sy]))
        k = min(12, sx.size)
        d, idx = tree.query(np.column_stack([x, y]), k=k, distance_upper_bound=m)
        d = d.reshape(len(x), k)
        idx = idx.reshape(len(x), k)
        ok = np.isfinite(d)
        idc = np.where(ok, idx, 0)
        within = ok & (d <= self.adipo_reach * sr[idc])
        # a point is fat iff max score among seeds that reach it exceeds the threshold
        return np.where(within, ss[idc], -np.inf).max(axis=1)

    # ------------------------------------------------------------------ point labels
    def labels_pts(self, x, y) -> np.ndarray:
        """Label (0 glass, 1 haem, 2 fat, 3 bone, 4 haemorrhage) at scattered points."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        lab = np.zeros(x.shape, np.uint8)
        core = self.core_pts(x, y)
        if not core.any():
            return lab
        bone = core & self.bone_pts(x, y)
        rest = core & ~bone
        hmr = np.zeros(x.shape, bool)
        if self.hmr_n is not None and rest.any():
            hmr[rest] = self.haemorrhage_pts(x[rest], y[rest])
            rest &= ~hmr
        if self.sheet_xyr.size and rest.any():
            rest &= ~self.sheet_pts(x, y)  # a sheet replaces the fat
        fat = np.zeros(x.shape, bool)
        if rest.any():
            fat[rest] = self.fat_pts(x[rest], y[rest])
        lab[core] = 1
        lab[fat] = 2
        lab[bone] = 3
        lab[hmr] = 4
        return lab

    # ------------------------------------------------------------------ megakaryocytes
    @lru_cache(maxsize=4096)  # noqa: B019
    def mk_block(self, bx: int, by: int):
        """Megakaryocytes of one 256-µm block: x, y, diameter (µm), rng-drawn shape numbers."""
        rng = _rng(self.p.seed, K_MK, bx, by)
        per_mm2 = 30.0 * (1.8 if (self.p.stain == "reticulin" and self.p.grade >= 2) else 1.0)
        n = rng.poisson(per_mm2 * (ADIPO_BLOCK_UM / 1000.0) ** 2)
        x = bx * ADIPO_BLOCK_UM + rng.uniform(0, ADIPO_BLOCK_UM, n)
        y = by * ADIPO_BLOCK_UM + rng.uniform(0, ADIPO_BLOCK_UM, n)
        d = 30.0 + 70.0 * rng.beta(1.6, 3.5, n)
        shape = rng.uniform(size=(n, 7, 4))
        if n:
            ang = np.linspace(0, 2 * np.pi, 8, endpoint=False)
            px = x[:, None] + 0.4 * d[:, None] * np.cos(ang)[None, :]
            py = y[:, None] + 0.4 * d[:, None] * np.sin(ang)[None, :]
            ok = (self.labels_pts(x, y) == 1) & ~self.sinus_pts(x, y)
            ok &= (self.labels_pts(px.ravel(), py.ravel()).reshape(n, 8) == 1).all(axis=1)
            x, y, d, shape = x[ok], y[ok], d[ok], shape[ok]
        return x, y, d, shape

    def mks_in(self, x0, y0, x1, y1, margin=0.0):
        bxs = range(int(math.floor((x0 - margin) / ADIPO_BLOCK_UM)), int(math.floor((x1 + margin) / ADIPO_BLOCK_UM)) + 1)
        bys = range(int(math.floor((y0 - margin) / ADIPO_BLOCK_UM)), int(math.floor((y1 + margin) / ADIPO_BLOCK_UM)) + 1)
        parts = [(bx, by, self.mk_block(bx, by)) for by in bys for bx in bxs]
        return parts

    # ------------------------------------------------------------------ nucleated cells
    @lru_cache(maxsize=2048)  # noqa: B019
    def cell_block(self, bx: int, by: int) -> dict:
        """Small nucleated cells, red cells and osteocytes of one 64-µm block (cells table + primitives)."""
        p = self.p
        rng = _rng(p.seed, K_CELL, bx, by)
        n = int(CELL_BLOCK_UM / CELL_SPACING_UM)
        j, i = np.mgrid[0:n, 0:n]
        m = n * n
        x = bx * CELL_BLOCK_UM + (i.ravel() + 0.5 + rng.uniform(-CELL_JITTER, CELL_JITTER, m)) * CELL_SPACING_UM
        y = by * CELL_BLOCK_UM + (j.ravel() + 0.5 + rng.uniform(-CELL_JITTER, CELL_JITTER, m)) * CELL_SPACING_UM
        u = rng.uniform(size=(m, 13))  # drawn whatever the parameters: coupled phantoms
        lab = self.labels_pts(x, y)
        keep = (lab == 1) & ~self.sinus_pts(x, y)
        x0, y0 = bx * CELL_BLOCK_UM, by * CELL_BLOCK_UM
        x1, y1 = x0 + CELL_BLOCK_UM, y0 + CELL_BLOCK_UM
        for _, _, (mx, my, md, _) in self.mks_in(x0, y0, x1, y1, margin=60.0):
            for k in range(mx.size):
                keep &= np.hypot(x - mx[k], y - my[k]) > md[k] / 2 + 2.0
        x, y, u = x[keep], y[keep], u[keep]
        # lineage and stage from coupled uniforms
        p_ery = np.clip(0.26 * (1 + 0.9 * nz.value_noise_pts(x, y, 40.0, nz.key_of(p.seed, K_ERY))), 0.03, 0.7)
        p_lym = 0.11
        stage = np.empty(x.size, np.int64)
        ery = u[:, 0] < p_ery
        lym = ~ery & (u[:, 0] < p_ery + p_lym)
        mye = ~ery & ~lym
        early = ery & (u[:, 1] < p.left_shift_ratio)
        late = ery & ~early
        stage[early] = np.where(u[early, 2] < 0.35, 5, 6)
        stage[late] = np.where(u[late, 2] < 0.62, 7, 8)
        stage[lym] = 9
        cuts = np.array([0.10, 0.45, 0.65, 0.80])
        stage[mye] = np.searchsorted(cuts, u[mye, 2])
        if self.sheet_xyr.size:
            ins = self.sheet_pts(x, y)  # every cell of a sheet is an early erythroid precursor
            stage[ins] = np.where(u[ins, 2] < 0.35, 5, 6)
        cells, prims = _cell_geometry(x, y, stage, u)
        cells["id"] = (np.int64(bx + _BLOCK_OFF) << 40) | (np.int64(by + _BLOCK_OFF) << 16) | cells.pop("k")
        # red cells in sinusoids
        nr = int(CELL_BLOCK_UM / RBC_SPACING_UM)
        jr, ir = np.mgrid[0:nr, 0:nr]
        rx = x0 + (ir.ravel() + 0.5 + rng.uniform(-0.3, 0.3, nr * nr)) * RBC_SPACING_UM
        ry = y0 + (jr.ravel() + 0.5 + rng.uniform(-0.3, 0.3, nr * nr)) * RBC_SPACING_UM
        rr = rng.uniform(*RBC_RADIUS_UM, nr * nr)
        ra = rng.uniform(0, np.pi, nr * nr)
        ramp = rng.uniform(*RBC_AMP, nr * nr)
        sel = self.sinus_pts(rx, ry)
        if sel.any():
            sel[sel] = self.labels_pts(rx[sel], ry[sel]) == 1
        rbc = _prims(rx[sel], ry[sel], rr[sel], rr[sel] * 0.92, ra[sel], "rbc", ramp[sel])
        if self.hmr_n is not None:
            rbc = _cat([rbc, self._spilled_rbcs(bx, by)])
        # osteocytes in bone
        no = rng.poisson(CELL_BLOCK_UM**2 / 2200.0)
        ox = x0 + rng.uniform(0, CELL_BLOCK_UM, no)
        oy = y0 + rng.uniform(0, CELL_BLOCK_UM, no)
        oth = rng.uniform(0, np.pi, no)
        osel = self.labels_pts(ox, oy) == 3
        ost = _prims(ox[osel], oy[osel], np.full(osel.sum(), 3.2), np.full(osel.sum(), 1.3), oth[osel],
                     "ost", np.full(osel.sum(), 0.55))
        return {"cells": cells, "prims": _cat([prims, rbc, ost])}

    def _spilled_rbcs(self, bx: int, by: int) -> dict:
        """Red cells packed edge to edge in the haemorrhage of one cell block, at every tilt: a
        3-µm section shows discs seen flat and, tilted, ellipses down to bars seen edge-on."""
        rng = _rng(self.p.seed, K_HAEM, bx, by)  # a stream of its own: the block's cells stay as they were
        # packed as in a sinusoid, on a step that fits the block whole: no seam of plasma between blocks
        n = int(round(CELL_BLOCK_UM / RBC_SPACING_UM))
        step = CELL_BLOCK_UM / n
        j, i = np.mgrid[0:n, 0:n]
        m = n * n
        x = bx * CELL_BLOCK_UM + (i.ravel() + 0.5 + rng.uniform(-0.3, 0.3, m)) * step
        y = by * CELL_BLOCK_UM + (j.ravel() + 0.5 + rng.uniform(-0.3, 0.3, m)) * step
        a = rng.uniform(*RBC_RADIUS_UM, m)
        b = a * np.maximum(np.cos(rng.uniform(0, np.pi / 2, m)), RBC_THICKNESS_UM / (2 * RBC_RADIUS_UM[1]))
        th = rng.uniform(0, np.pi, m)
        amp = rng.uniform(*RBC_AMP, m)
        sel = self.labels_pts(x, y) == 4
        return _prims(x[sel], y[sel], a[sel], b[sel], th[sel], "rbc", amp[sel])

    def cells_in(self, x0, y0, x1, y1, margin=0.0) -> tuple[dict, dict]:
        """(cells table, primitives) of all blocks near the box (cells not yet filtered by centre)."""
        bxs = range(int(math.floor((x0 - margin) / CELL_BLOCK_UM)), int(math.floor((x1 + margin) / CELL_BLOCK_UM)) + 1)
        bys = range(int(math.floor((y0 - margin) / CELL_BLOCK_UM)), int(math.floor((y1 + margin) / CELL_BLOCK_UM)) + 1)
        blocks = [self.cell_block(bx, by) for by in bys for bx in bxs]
        tables = [b["cells"] for b in blocks]
        prims = [b["prims"] for b in blocks]
        for bx, by, (mx, my, md, shape) in self.mks_in(x0, y0, x1, y1, margin=margin + 50.0):
            if mx.size:
                c, pr = _mk_geometry(mx, my, md, shape)
                c["id"] = (np.int64(bx + _BLOCK_OFF) << 40) | (np.int64(by + _BLOCK_OFF) << 16) | (
                    np.int64(0x8000) + np.arange(mx.size))
                tables.append(c)
                prims.append(pr)
        return _cat(tables), _cat(prims)


# ---------------------------------------------------------------------- primitives
# A primitive is a filled (or ring) ellipse written into one role map by per-pixel maximum.
_ROLE_IDS = {"nuc": 0, "cyto": 1, "cytb": 2, "cov": 3, "ring": 4, "rbc": 5, "fib": 6, "col": 7, "ost": 8}
PRIM_FIELDS = ("x", "y", "a", "b", "th", "role", "amp", "tex", "inner", "role2", "amp2", "line")


def _prims(x, y, a, b, th, role, amp, tex=0.0, inner=0.0, role2=None, amp2=0.0, line=False) -> dict:
    n = np.size(x)
    out = {
        "x": np.asarray(x, np.float64), "y": np.asarray(y, np.float64),
        "a": np.broadcast_to(np.asarray(a, np.float64), (n,)).copy(),
        "b": np.broadcast_to(np.asarray(b, np.float64), (n,)).copy(),
        "th": np.broadcast_to(np.asarray(th, np.float64), (n,)).copy(),
        "role": np.full(n, _ROLE_IDS[role], np.int64),
        "amp": np.broadcast_to(np.asarray(amp, np.float32), (n,)).copy(),
        "tex": np.broadcast_to(np.asarray(tex, np.float32), (n,)).copy(),
        "inner": np.broadcast_to(np.asarray(inner, np.float64), (n,)).copy(),
        "role2": np.full(n, -1 if role2 is None else _ROLE_IDS[role2], np.int64),
        "amp2": np.broadcast_to(np.asarray(amp2, np.float32), (n,)).copy(),
        "line": np.full(n, bool(line)),
    }
    return out


def _cat(parts: list[dict]) -> dict:
    parts = [q for q in parts if q]
    if not parts:
        return {}
    return {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}


# Per stage: nucleus diameter range (µm), cytoplasm rim (µm), nucleus OD amount, chromatin
# texture, cytoplasm role and amount, nucleus aspect ratio range, shape.
_STAGE_GEOM = {
    0: dict(nuc=(9.0, 12.0), rim=(1.5, 2.5), amp=0.52, tex=0.38, cyto=("cyto", 0.22), shape="round"),
    1: dict(nuc=(8.0, 11.0), rim=(1.8, 3.0), amp=0.62, tex=0.32, cyto=("cyto", 0.36), shape="oval"),
    2: dict(nuc=(8.5, 11.0), rim=(1.5, 2.5), amp=0.70, tex=0.28, cyto=("cyto", 0.38), shape="kidney"),
    3: dict(nuc=(9.0, 11.0), rim=(1.0, 2.0), amp=0.80, tex=0.22, cyto=("cyto", 0.38), shape="band"),
    4: dict(nuc=(9.0, 11.5), rim=(0.8, 1.8), amp=0.92, tex=0.18, cyto=("cyto", 0.40), shape="seg"),
    5: dict(nuc=(9.0, 11.0), rim=None, amp=0.62, tex=0.42, cyto=("cytb", 0.40), shape="round"),
    6: dict(nuc=(7.0, 9.0), rim=None, amp=0.78, tex=0.34, cyto=("cytb", 0.34), shape="round"),
    7: dict(nuc=(5.5, 7.0), rim=(1.2, 1.8), amp=1.02, tex=0.10, cyto=("cyto", 0.05), shape="round"),
    8: dict(nuc=(5.0, 6.0), rim=(1.0, 1.6), amp=1.25, tex=0.03, cyto=("cyto", 0.12), shape="round"),
    9: dict(nuc=(6.0, 8.0), rim=(0.4, 0.9), amp=0.95, tex=0.16, cyto=("cytb", 0.14), shape="round"),
}
# lobe layouts, in units of the nucleus radius: (dx, dy, a, b, local angle)
_LOBES = {
    "round": [(0.0, 0.0, 1.0, 1.0, 0.0)],
    "oval": [(0.0, 0.0, 1.0, 1.0, 0.0)],
    "kidney": [(-0.32, 0.10, 0.70, 0.62, 0.5), (0.32, 0.10, 0.70, 0.62, -0.5)],
    "band": [(-0.62, 0.05, 0.42, 0.26, 1.1), (0.0, -0.48, 0.42, 0.26, 0.0), (0.62, 0.05, 0.42, 0.26, -1.1)],
    "seg": [(-0.55, -0.25, 0.34, 0.30, 0.3), (0.0, 0.42, 0.34, 0.30, 0.0), (0.55, -0.22, 0.34, 0.30, -0.3),
            (0.05, -0.55, 0.30, 0.27, 0.0)],
}


def _cell_geometry(x, y, stage, u) -> tuple[dict, dict]:
    """Cells table and primitives of small nucleated cells, as cut by the section (vectorised per stage).

    Sizes in ``_STAGE_GEOM`` are whole cells; the section shows a profile of each. A cell whose
    centre lies ``z`` from the section's mid-plane (``z`` uniform over the depths at which the
    section meets the cell) shows a disc of radius ``sqrt(R**2 - d**2)``, ``d = max(0, z - T/2)``,
    for every spherical part of radius ``R`` (cell, nucleus, membrane). Light crosses
    ``min(T, r_n - d)`` µm of nucleus at the profile's centre, so a nuclear cap is fainter as well
    as smaller (Beer-Lambert). Caps crossed over less than ``NUC_MIN_PATH_UM`` are not drawn and the
    cell is left out of the table: an anucleate profile, as a pathologist would not count it.
    """
    n = x.size
    diam = np.zeros(n)
    nuc_area = np.zeros(n)
    seen = np.zeros(n, bool)
    prims = []
    for st, g in _STAGE_GEOM.items():
        sel = np.flatnonzero(stage == st)
        if sel.size == 0:
            continue
        uu = u[sel]
        cx, cy = x[sel], y[sel]
        dn = g["nuc"][0] + (g["nuc"][1] - g["nuc"][0]) * uu[:, 3]
        rn = dn / 2
        asp = 0.9 + 0.1 * uu[:, 4] if g["shape"] in ("round",) else 0.72 + 0.22 * uu[:, 4]
        th = uu[:, 5] * np.pi * 2
        if g["rim"] is None:  # early erythroid: E-cadherin ring 1.0-1.5 µm just outside the nucleus
            ring_t = 1.0 + 0.5 * uu[:, 6]
            rc = rn + ring_t + 0.2 + 0.4 * uu[:, 7]
        else:
            rc = rn + g["rim"][0] + (g["rim"][1] - g["rim"][0]) * uu[:, 6]
        d = np.maximum(0.0, uu[:, 12] * (rc + SECTION_UM / 2) - SECTION_UM / 2)
        rc_p = _profile(rc, d)
        rn_p = _profile(rn, d)
        path = np.clip(rn - d, 0.0, SECTION_UM)
        vis = path >= NUC_MIN_PATH_UM
        seen[sel] = vis
        if g["rim"] is None:
            rr = _profile(rn + ring_t, d)
            prims.append(_prims(cx, cy, rr, rr * asp, th, "ring", 0.55 + 0.4 * uu[:, 8],
                                inner=np.clip(rr - ring_t, 0.0, None) / np.maximum(rr, 1e-6)))
        diam[sel] = 2 * rc_p
        role, camp = g["cyto"]
        prims.append(_prims(cx, cy, rc_p, rc_p * (0.85 + 0.15 * uu[:, 9]), th, role,
                            camp * (0.8 + 0.4 * uu[:, 10]), tex=0.25, role2="cov", amp2=1.0))
        lobes = _LOBES[g["shape"]]
        if g["shape"] == "seg":
            nl = 2 + (uu[:, 11] * 3).astype(int)  # 2-4 lobes
        else:
            nl = np.full(sel.size, len(lobes))
        c, s = np.cos(th), np.sin(th)
        amp = g["amp"] * (0.88 + 0.24 * uu[:, 11]) * path / SECTION_UM
        for k, (dx, dy, la, lb, lth) in enumerate(lobes):
            on = (nl > k) & vis
            if not on.any():
                continue
            ox = (dx * c - dy * s) * rn_p
            oy = (dx * s + dy * c) * rn_p
            a = la * rn_p
            b = lb * rn_p * (asp if len(lobes) == 1 else 1.0)
            prims.append(_prims((cx + ox)[on], (cy + oy)[on], a[on], b[on], (th + lth)[on], "nuc",
                                amp[on], tex=g["tex"]))
        if len(lobes) == 1:
            nuc_area[sel] = np.pi * rn_p * rn_p * asp
        else:
            nuc_area[sel] = _union_area(cx, cy, rn_p, th, lobes, nl)
    cls = _STAGE_CLASS[stage]
    cells = {"x_um": x, "y_um": y, "stage": stage, "cls": cls, "ecad_pos": (stage == 5) | (stage == 6),
             "nuc_area_um2": nuc_area, "diameter_um": diam, "k": np.arange(n)}
    return {key: v[seen] for key, v in cells.items()}, _cat(prims)


def _profile(r: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Radius of the disc a sphere of radius ``r`` shows when the section's near face is ``d`` from its centre (µm)."""
    return np.sqrt(np.clip(r * r - d * d, 0.0, None))


def _union_area(cx, cy, rn, th, lobes, nl, k=24) -> np.ndarray:
    """Area of the union of lobe ellipses per cell, on a k x k sample grid over 2.2 rn (µm²)."""
    t = (np.arange(k) + 0.5) / k * 2.2 - 1.1
    gx, gy = np.meshgrid(t, t)
    inside = np.zeros((cx.size, k * k), bool)
    c, s = np.cos(th)[:, None], np.sin(th)[:, None]
    for li, (dx, dy, la, lb, lth) in enumerate(lobes):
        px = gx.ravel()[None, :] - (dx * c - dy * s)
        py = gy.ravel()[None, :] - (dx * s + dy * c)
        cl, sl = np.cos(th + lth)[:, None], np.sin(th + lth)[:, None]
        uu = px * cl + py * sl
        vv = -px * sl + py * cl
        hit = (uu / la) ** 2 + (vv / lb) ** 2 <= 1.0
        inside |= hit & (nl > li)[:, None]
    return inside.mean(axis=1) * (2.2 * rn) ** 2


def _mk_geometry(x, y, d, shape) -> tuple[dict, dict]:
    """Megakaryocytes: abundant pink cytoplasm, 4-7 nuclear lobes in a central cluster."""
    n = x.size
    th = shape[:, 0, 0] * 2 * np.pi
    rc = d / 2
    prims = [_prims(x, y, rc, rc * (0.82 + 0.15 * shape[:, 0, 1]), th, "cyto", 0.5 + 0.1 * shape[:, 0, 2],
                    tex=0.3, role2="cov", amp2=1.0)]
    nlob = 4 + (shape[:, 0, 3] * 4).astype(int)
    k = 28
    t = (np.arange(k) + 0.5) / k * 2 - 1
    gx, gy = np.meshgrid(t, t)
    inside = np.zeros((n, k * k), bool)
    for li in range(7):
        on = nlob > li
        ang = shape[:, li, 0] * 2 * np.pi
        dist = 0.16 * d * np.sqrt(shape[:, li, 1])
        lr = (0.15 + 0.08 * shape[:, li, 2]) * d
        lx, ly = x + dist * np.cos(ang), y + dist * np.sin(ang)
        prims.append(_prims(lx[on], ly[on], lr[on], (lr * (0.7 + 0.3 * shape[:, li, 3]))[on],
                            ang[on], "nuc", np.full(on.sum(), 0.78), tex=0.25))
        # sample-grid area over the box [-0.45 d, 0.45 d]
        px = gx.ravel()[None, :] * 0.45 * d[:, None] - (lx - x)[:, None]
        py = gy.ravel()[None, :] * 0.45 * d[:, None] - (ly - y)[:, None]
        ca, sa = np.cos(ang)[:, None], np.sin(ang)[:, None]
        uu = px * ca + py * sa
        vv = -px * sa + py * ca
        hit = (uu / lr[:, None]) ** 2 + (vv / (lr * (0.7 + 0.3 * shape[:, li, 3]))[:, None]) ** 2 <= 1
        inside |= hit & on[:, None]
    area = inside.mean(axis=1) * (0.9 * d) ** 2
    cells = {"x_um": x, "y_um": y, "stage": np.full(n, 10), "cls": np.full(n, 4), "ecad_pos": np.zeros(n, bool),
             "nuc_area_um2": area, "diameter_um": d}
    return cells, _cat(prims)


# ---------------------------------------------------------------------- fibres
def _segments(f: dict) -> tuple[np.ndarray, np.ndarray]:
    """(S, 4) segments x0, y0, x1, y1 and their piece index."""
    v, off = f["verts"], f["off"]
    if off.size < 2 or v.shape[0] < 2:
        return np.zeros((0, 4)), np.zeros(0, np.int64)
    owner = np.repeat(np.arange(off.size - 1), np.diff(off))
    same = owner[:-1] == owner[1:]
    seg = np.column_stack([v[:-1], v[1:]])[same]
    return seg, owner[:-1][same]


def seg_intersections(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All proper intersections between segments ``a`` (Na, 4) and ``b`` (Nb, 4).

    Returns (ia, ib, points (K, 2)); parameters are half-open [0, 1) on both segments.
    """
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2))
    ax0, ay0, ax1, ay1 = (a[:, k][:, None] for k in range(4))
    bx0, by0, bx1, by1 = (b[:, k][None, :] for k in range(4))
    rx, ry = ax1 - ax0, ay1 - ay0
    sx, sy = bx1 - bx0, by1 - by0
    den = rx * sy - ry * sx
    qx, qy = bx0 - ax0, by0 - ay0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (qx * sy - qy * sx) / den
        s = (qx * ry - qy * rx) / den
    hit = (den != 0) & (t >= 0) & (t < 1) & (s >= 0) & (s < 1)
    ia, ib = np.nonzero(hit)
    tt = t[ia, ib]
    pts = np.column_stack([a[ia, 0] + tt * (a[ia, 2] - a[ia, 0]), a[ia, 1] + tt * (a[ia, 3] - a[ia, 1])])
    return ia, ib, pts


def _pairwise_crossings(seg: np.ndarray, fid: np.ndarray, x0, y0, x1, y1, cell=16.0) -> np.ndarray:
    """Crossing points between different fibres inside [x0, x1) x [y0, y1), via a bucket grid."""
    if seg.shape[0] < 2:
        return np.zeros((0, 2))
    nx = int(math.ceil((x1 - x0) / cell))
    ny = int(math.ceil((y1 - y0) / cell))
    lo_x = np.floor((np.minimum(seg[:, 0], seg[:, 2]) - x0) / cell).astype(int)
    hi_x = np.floor((np.maximum(seg[:, 0], seg[:, 2]) - x0) / cell).astype(int)
    lo_y = np.floor((np.minimum(seg[:, 1], seg[:, 3]) - y0) / cell).astype(int)
    hi_y = np.floor((np.maximum(seg[:, 1], seg[:, 3]) - y0) / cell).astype(int)
    out = []
    for cy in range(ny):
        ry = (lo_y <= cy) & (hi_y >= cy)
        if not ry.any():
            continue
        for cx in range(nx):
            sel = np.flatnonzero(ry & (lo_x <= cx) & (hi_x >= cx))
            if sel.size < 2:
                continue
            s = seg[sel]
            ia, ib, pts = seg_intersections(s, s)
            ok = (ia < ib) & (fid[sel][ia] != fid[sel][ib])
            pts = pts[ok]
            bx0, by0 = x0 + cx * cell, y0 + cy * cell
            inside = (pts[:, 0] >= bx0) & (pts[:, 0] < bx0 + cell) & (pts[:, 1] >= by0) & (pts[:, 1] < by0 + cell)
            inside &= (pts[:, 0] < x1) & (pts[:, 1] < y1)
            out.append(pts[inside])
    return np.concatenate(out) if out else np.zeros((0, 2))


class FibreField:
    """Reticulin fibres of a world, generated per 128-µm block (reticulin stain only)."""

    def __init__(self, world: World):
        self.w = world
        self.seed = world.p.seed
        mean_len = {g: (1 - q["thick"]) * np.mean(q["length"]) + q["thick"] * np.mean(BUNDLE_LENGTH_UM)
                    for g, q in FIBRE_GRADES.items()}
        area = FIBRE_BLOCK_UM**2
        self.rate = {g: FIBRE_GRADES[g]["density"] / 1e4 * area / mean_len[g] for g in FIBRE_GRADES}
        self.rate_max = max(self.rate.values())

    @lru_cache(maxsize=1024)  # noqa: B019
    def raw_block(self, bx: int, by: int) -> dict:
        """Fibre pieces (runs of a walk inside haematopoietic tissue) seeded in one block."""
        w = self.w
        rng = _rng(self.seed, K_FIB, bx, by)
        n = rng.poisson(self.rate_max)
        sx = bx * FIBRE_BLOCK_UM + rng.uniform(0, FIBRE_BLOCK_UM, n)
        sy = by * FIBRE_BLOCK_UM + rng.uniform(0, FIBRE_BLOCK_UM, n)
        uk = rng.uniform(size=n)
        ut = rng.uniform(size=(n, 4))
        mark = rng.uniform(size=n)
        ang_noise = rng.standard_normal((n, int(BUNDLE_LENGTH_UM[1] / FIBRE_STEP_UM) + 2))
        g = w.grade_pts(sx, sy).astype(int)
        rate = np.array([self.rate[k] for k in range(4)])[g]
        keep = uk < rate / self.rate_max
        sx, sy, ut, mark, ang_noise, g = sx[keep], sy[keep], ut[keep], mark[keep], ang_noise[keep], g[keep]
        n = sx.size
        if n == 0:
            return _empty_fibres()
        thick_p = np.array([FIBRE_GRADES[k]["thick"] for k in range(4)])[g]
        thick = ut[:, 0] < thick_p
        lo = np.array([FIBRE_GRADES[k]["length"][0] for k in range(4)])[g]
        hi = np.array([FIBRE_GRADES[k]["length"][1] for k in range(4)])[g]
        length = np.where(thick, BUNDLE_LENGTH_UM[0] + (BUNDLE_LENGTH_UM[1] - BUNDLE_LENGTH_UM[0]) * ut[:, 1],
                          lo + (hi - lo) * ut[:, 1])
        wlo = np.array([FIBRE_GRADES[k]["width"][0] for k in range(4)])[g]
        whi = np.array([FIBRE_GRADES[k]["width"][1] for k in range(4)])[g]
        width = np.where(thick, BUNDLE_WIDTH_UM[0] + (BUNDLE_WIDTH_UM[1] - BUNDLE_WIDTH_UM[0]) * ut[:, 2] ** 1.5,
                         wlo + (whi - wlo) * ut[:, 2])
        sd = np.array([FIBRE_GRADES[k]["angle_sd"] for k in range(4)])[g] * np.where(thick, 0.5, 1.0)
        nstep = np.ceil(length / FIBRE_STEP_UM).astype(int)
        ms = int(nstep.max())
        theta = ut[:, 3:4] * 2 * np.pi + np.cumsum(ang_noise[:, :ms] * sd[:, None], axis=1)
        step = np.where(np.arange(ms)[None, :] < nstep[:, None], FIBRE_STEP_UM, 0.0)
        step[np.arange(n), nstep - 1] = length - FIBRE_STEP_UM * (nstep - 1)
        vx = np.concatenate([sx[:, None], sx[:, None] + np.cumsum(step * np.cos(theta), axis=1)], axis=1)
        vy = np.concatenate([sy[:, None], sy[:, None] + np.cumsum(step * np.sin(theta), axis=1)], axis=1)
        valid = np.arange(ms + 1)[None, :] <= nstep[:, None]
        haem = np.zeros(valid.shape, bool)
        haem[valid] = w.labels_pts(vx[valid], vy[valid]) == 1
        # split every walk into runs of consecutive haematopoietic vertices
        verts, off, pw, pt, pm, pg, pf = [], [0], [], [], [], [], []
        for f in range(n):
            h = haem[f, : nstep[f] + 1]
            edges = np.diff(np.concatenate([[0], h.astype(np.int8), [0]]))
            starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
            for s0, e0 in zip(starts, ends, strict=True):
                if e0 - s0 < 2:
                    continue
                verts.append(np.column_stack([vx[f, s0:e0], vy[f, s0:e0]]))
                off.append(off[-1] + e0 - s0)
                pw.append(width[f])
                pt.append(thick[f])
                pm.append(mark[f])
                pg.append(g[f])
                pf.append(f)
        if not verts:
            return _empty_fibres()
        fid = (np.int64(bx + _BLOCK_OFF) << 40) | (np.int64(by + _BLOCK_OFF) << 16) | np.asarray(pf, np.int64)
        return {"verts": np.concatenate(verts), "off": np.asarray(off, np.int64), "width": np.asarray(pw),
                "thick": np.asarray(pt, bool), "mark": np.asarray(pm), "grade": np.asarray(pg, np.int64),
                "fid": fid}

    def _gather(self, getter, bx0, by0, bx1, by1) -> dict:
        parts = [getter(bx, by) for by in range(by0, by1 + 1) for bx in range(bx0, bx1 + 1)]
        return _cat_fibres(parts)

    @lru_cache(maxsize=1024)  # noqa: B019
    def block(self, bx: int, by: int) -> dict:
        """Fibres of one block after MF-0 thinning: a grade-0 fibre that crosses any fibre with a
        lower mark is removed (Matérn type-II thinning), so MF-0 areas show no crossings."""
        f = self.raw_block(bx, by)
        g0 = np.flatnonzero(f["grade"] == 0)
        if g0.size == 0:
            return f
        nb = self._gather(self.raw_block, bx - 2, by - 2, bx + 2, by + 2)
        seg_f, own_f = _segments(f)
        seg_n, own_n = _segments(nb)
        drop = np.zeros(f["off"].size - 1, bool)
        cand = np.isin(own_f, g0)
        sf, of = seg_f[cand], own_f[cand]
        if sf.shape[0] and seg_n.shape[0]:
            bb = (np.minimum(seg_n[:, 0], seg_n[:, 2]) <= sf[:, [0, 2]].max() + 1) & (
                np.maximum(seg_n[:, 0], seg_n[:, 2]) >= sf[:, [0, 2]].min() - 1) & (
                np.minimum(seg_n[:, 1], seg_n[:, 3]) <= sf[:, [1, 3]].max() + 1) & (
                np.maximum(seg_n[:, 1], seg_n[:, 3]) >= sf[:, [1, 3]].min() - 1)
            sn, on = seg_n[bb], own_n[bb]
            for c0 in range(0, sf.shape[0], 512):
                ia, ib, _ = seg_intersections(sf[c0:c0 + 512], sn)
                pa, pb = of[c0:c0 + 512][ia], on[ib]
                lower = (nb["mark"][pb] < f["mark"][pa]) & (nb["fid"][pb] != f["fid"][pa])
                drop[pa[lower]] = True
        return _select_fibres(f, ~drop)

    def near(self, x0, y0, x1, y1) -> dict:
        """Fibres that may touch the box."""
        m = FIBRE_REACH_UM + BUNDLE_WIDTH_UM[1]
        b = [int(math.floor((v - m) / FIBRE_BLOCK_UM)) for v in (x0, y0)]
        e = [int(math.floor((v + m) / FIBRE_BLOCK_UM)) for v in (x1, y1)]
        return self._gather(self.block, b[0], b[1], e[0], e[1])

    @lru_cache(maxsize=1024)  # noqa: B019
    def crossings_block(self, bx: int, by: int) -> np.ndarray:
        """Crossing points (K, 2) between different fibres that lie inside one block."""
        x0, y0 = bx * FIBRE_BLOCK_UM, by * FIBRE_BLOCK_UM
        f = self._gather(self.block, bx - 1, by - 1, bx + 1, by + 1)
        seg, own = _segments(f)
        if seg.shape[0] == 0:
            return np.zeros((0, 2))
        return _pairwise_crossings(seg, f["fid"][own], x0, y0, x0 + FIBRE_BLOCK_UM, y0 + FIBRE_BLOCK_UM)

    def crossings_in(self, x0, y0, x1, y1) -> np.ndarray:
        b = [int(math.floor(v / FIBRE_BLOCK_UM)) for v in (x0, y0)]
        e = [int(math.floor(v / FIBRE_BLOCK_UM)) for v in (x1, y1)]
        pts = [self.crossings_block(bx, by) for by in range(b[1], e[1] + 1) for bx in range(b[0], e[0] + 1)]
        pts = np.concatenate(pts) if pts else np.zeros((0, 2))
        ok = (pts[:, 0] >= x0) & (pts[:, 0] < x1) & (pts[:, 1] >= y0) & (pts[:, 1] < y1)
        return pts[ok]


def _empty_fibres() -> dict:
    return {"verts": np.zeros((0, 2)), "off": np.zeros(1, np.int64), "width": np.zeros(0),
            "thick": np.zeros(0, bool), "mark": np.zeros(0), "grade": np.zeros(0, np.int64),
            "fid": np.zeros(0, np.int64)}


def _cat_fibres(parts: list[dict]) -> dict:
    parts = [q for q in parts if q["off"].size > 1]
    if not parts:
        return _empty_fibres()
    off = [np.zeros(1, np.int64)]
    base = 0
    for q in parts:
        off.append(q["off"][1:] + base)
        base += q["verts"].shape[0]
    out = {k: np.concatenate([q[k] for q in parts]) for k in ("verts", "width", "thick", "mark", "grade", "fid")}
    out["off"] = np.concatenate(off)
    return out


def _select_fibres(f: dict, keep: np.ndarray) -> dict:
    if keep.all():
        return f
    idx = np.flatnonzero(keep)
    lens = np.diff(f["off"])[idx]
    verts = [f["verts"][f["off"][i]:f["off"][i + 1]] for i in idx]
    out = {k: f[k][idx] for k in ("width", "thick", "mark", "grade", "fid")}
    out["verts"] = np.concatenate(verts) if verts else np.zeros((0, 2))
    out["off"] = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return out


def clipped_length(seg: np.ndarray, x0, y0, x1, y1) -> np.ndarray:
    """Length of each segment inside the box [x0, x1) x [y0, y1) (Liang-Barsky), µm."""
    if seg.shape[0] == 0:
        return np.zeros(0)
    px, py = seg[:, 0], seg[:, 1]
    dx, dy = seg[:, 2] - px, seg[:, 3] - py
    t0 = np.zeros(seg.shape[0])
    t1 = np.ones(seg.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        for p, q in ((-dx, px - x0), (dx, x1 - px), (-dy, py - y0), (dy, y1 - py)):
            r = q / p
            t0 = np.where((p < 0), np.maximum(t0, r), t0)
            t1 = np.where((p > 0), np.minimum(t1, r), t1)
            outside = (p == 0) & (q < 0)
            t1 = np.where(outside, -1.0, t1)
    return np.clip(t1 - t0, 0, None) * np.hypot(dx, dy)
