"""Render any region of a world at any pixel size by Beer-Lambert absorbance.

Per pixel: tissue labels from the layout and adipocyte seeds, role maps from the object
primitives (per-pixel maxima, so the order objects are drawn in cannot matter), dye
concentrations ``c``, ``OD = c @ V``, ``I = 255 * 10**-OD``, a Gaussian optical blur
(sigma 0.5 µm; the region is rendered with a halo and trimmed), then shot noise keyed by
the global pixel index. Every step is a pure function of world position, so a region
rendered in pieces equals the region rendered whole.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from marrowseg.synth import _noise as nz
from marrowseg.synth import _world as wd

BLUR_SIGMA_UM = 0.5
NOISE_GAIN = 0.16          # shot noise s.d. = NOISE_GAIN * sqrt(I) (I in 0-255)
N_ROLES = 10               # nuc cyto cytb cov ring rbc fib col ost fmask
R_NUC, R_CYTO, R_CYTB, R_COV, R_RING, R_RBC, R_FIB, R_COL, R_OST, R_FMASK = range(N_ROLES)
_MAX_PAIRS = 600_000
_K_TEX, _K_STROMA, _K_STROMA2, _K_LAM, _K_SHOT, _K_SLIDE = 101, 102, 103, 104, 105, 106


def composite(prims: dict, xs: np.ndarray, ys: np.ndarray, mpp: float, tex: np.ndarray) -> np.ndarray:
    """Role maps (N_ROLES, H, W) float32 from ellipse primitives; per-pixel maximum per role."""
    h, w = ys.size, xs.size
    out = np.zeros(N_ROLES * h * w, np.float32)
    if not prims or prims["x"].size == 0:
        return out.reshape(N_ROLES, h, w)
    a_d = np.maximum(prims["a"], 0.5 * mpp)
    b_d = np.maximum(prims["b"], 0.5 * mpp)
    # sub-pixel objects are drawn one pixel wide with their absorbance scaled by what they cover
    scale = np.where(prims["line"], prims["a"] / a_d, prims["a"] * prims["b"] / (a_d * b_d))
    ext = np.maximum(a_d, b_d) + mpp
    fx = (prims["x"] - xs[0]) / mpp
    fy = (prims["y"] - ys[0]) / mpp
    ix0 = np.maximum(np.ceil(fx - ext / mpp), 0).astype(np.int64)
    ix1 = np.minimum(np.floor(fx + ext / mpp), w - 1).astype(np.int64)
    iy0 = np.maximum(np.ceil(fy - ext / mpp), 0).astype(np.int64)
    iy1 = np.minimum(np.floor(fy + ext / mpp), h - 1).astype(np.int64)
    ok = (ix1 >= ix0) & (iy1 >= iy0) & (prims["amp"] > 0)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return out.reshape(N_ROLES, h, w)
    wx = ix1[idx] - ix0[idx] + 1
    wy = iy1[idx] - iy0[idx] + 1
    npx = wx * wy
    cum = np.cumsum(npx)
    start = 0
    while start < idx.size:
        stop = int(np.searchsorted(cum, (cum[start - 1] if start else 0) + _MAX_PAIRS, side="right"))
        stop = max(stop, start + 1)
        sl = slice(start, stop)
        pid = idx[sl]
        n_i = npx[sl]
        rep = np.repeat(np.arange(pid.size), n_i)
        base = np.concatenate([[0], np.cumsum(n_i)[:-1]])
        local = np.arange(int(n_i.sum())) - base[rep]
        wxr = wx[sl][rep]
        px = ix0[pid][rep] + local % wxr
        py = iy0[pid][rep] + local // wxr
        gp = pid[rep]
        dx = (xs[px] - prims["x"][gp]).astype(np.float32)
        dy = (ys[py] - prims["y"][gp]).astype(np.float32)
        th = prims["th"][gp]
        c = np.cos(th).astype(np.float32)
        s = np.sin(th).astype(np.float32)
        a = a_d[gp].astype(np.float32)
        b = b_d[gp].astype(np.float32)
        u = (dx * c + dy * s) / a
        v = (dy * c - dx * s) / b
        rho = np.sqrt(u * u + v * v)
        reff = np.sqrt(a * b) / np.float32(mpp)
        cov = np.clip((1 - rho) * reff + 0.5, 0, 1)
        inner = prims["inner"][gp].astype(np.float32)
        ring = inner > 0
        if ring.any():
            cin = np.clip((inner - rho) * reff + 0.5, 0, 1)
            cov = np.where(ring, np.maximum(cov - cin, 0), cov)
        flat = py * w + px
        val = cov * (prims["amp"][gp] * scale[gp]).astype(np.float32)
        t = prims["tex"][gp]
        if np.any(t):
            val *= 1 + t * tex.ravel()[flat]
        np.maximum.at(out, prims["role"][gp] * (h * w) + flat, val)
        r2 = prims["role2"][gp]
        sec = r2 >= 0
        if sec.any():
            np.maximum.at(out, r2[sec] * (h * w) + flat[sec], cov[sec] * prims["amp2"][gp][sec])
        start = stop
    return out.reshape(N_ROLES, h, w)


def fibre_prims(f: dict, mpp: float, box: tuple[float, float, float, float], truth: bool) -> dict:
    """Discs sampled densely along fibre centre lines (spacing tied to width and pixel size)."""
    seg, own = wd._segments(f)
    if seg.shape[0] == 0:
        return {}
    x0, y0, x1, y1 = box
    r = f["width"][own] / 2
    m = r + mpp
    near = (np.maximum(seg[:, 0], seg[:, 2]) >= x0 - m) & (np.minimum(seg[:, 0], seg[:, 2]) <= x1 + m) & (
        np.maximum(seg[:, 1], seg[:, 3]) >= y0 - m) & (np.minimum(seg[:, 1], seg[:, 3]) <= y1 + m)
    seg, own, r = seg[near], own[near], r[near]
    if seg.shape[0] == 0:
        return {}
    length = np.hypot(seg[:, 2] - seg[:, 0], seg[:, 3] - seg[:, 1])
    step = np.maximum(np.maximum(r * 0.5, mpp * 0.5), 0.05)
    ns = np.ceil(length / step).astype(np.int64) + 1
    rep = np.repeat(np.arange(seg.shape[0]), ns)
    k = np.arange(int(ns.sum())) - np.repeat(np.concatenate([[0], np.cumsum(ns)[:-1]]), ns)
    t = k / np.maximum(ns[rep] - 1, 1)
    sx = seg[rep, 0] + t * (seg[rep, 2] - seg[rep, 0])
    sy = seg[rep, 1] + t * (seg[rep, 3] - seg[rep, 1])
    rr = r[rep]
    ok = (sx >= x0 - rr - mpp) & (sx <= x1 + rr + mpp) & (sy >= y0 - rr - mpp) & (sy <= y1 + rr + mpp)
    sx, sy, rr, rep = sx[ok], sy[ok], rr[ok], rep[ok]
    thick = f["thick"][own][rep]
    amp = np.where(thick, 0.85, 1.05 + 0.25 * f["mark"][own][rep]).astype(np.float32)
    out = []
    for role, sel in (("fib", ~thick), ("col", thick)):
        if sel.any():
            out.append(wd._prims(sx[sel], sy[sel], rr[sel], rr[sel], 0.0, role, amp[sel],
                                 role2="fmask" if truth else None, amp2=1.0, line=True))
    return wd._cat(out)


wd._ROLE_IDS["fmask"] = R_FMASK


class Renderer:
    """Renders regions of one world in one stain."""

    def __init__(self, world: wd.World, spec: dict):
        self.w = world
        self.spec = spec
        self.fibres = wd.FibreField(world) if world.p.stain == "reticulin" else None
        rng = np.random.default_rng([world.p.seed & 0xFFFFFFFF, 7777])
        nd = len(spec["dyes"])
        self.dye_scale = np.exp(world.p.stain_jitter * rng.standard_normal(nd)).astype(np.float32)
        self.jitter = float(world.p.stain_jitter)
        od = (spec["grid"]["glass"] * self.dye_scale).astype(np.float32) @ spec["vectors"]
        self.glass_rgb = (np.float32(255.0) * np.exp(np.float32(-math.log(10.0)) * od)).astype(np.float32)

    # ------------------------------------------------------------------ labels
    def labels(self, xs: np.ndarray, ys: np.ndarray, mpp: float):
        """Labels (H, W) uint8 and the helper maps the colour step needs."""
        w = self.w
        h_, w_ = ys.size, xs.size
        lab = np.zeros((h_, w_), np.uint8)
        aux = {"memb": None, "bone_n": None, "bone_t": None}
        core = w.core_grid(xs, ys)
        if not core.any():
            return lab, aux
        n, t = w.bone_value_grid(xs, ys)
        bone = core & (np.abs(n) < t)
        hmr = core & ~bone & w.haemorrhage_grid(xs, ys)
        aux["bone_n"], aux["bone_t"] = n, t
        sx, sy, sr = w.adipo_seeds(xs[0], ys[0], xs[-1], ys[-1])
        best = np.full((h_, w_), np.inf, np.float32)
        second = np.full((h_, w_), np.inf, np.float32)
        bi = np.full((h_, w_), -1, np.int32)
        si = np.full((h_, w_), -1, np.int32)
        for k in range(sx.size):
            reach = w.adipo_reach * sr[k]
            c0, c1 = np.searchsorted(xs, sx[k] - reach), np.searchsorted(xs, sx[k] + reach, "right")
            r0, r1 = np.searchsorted(ys, sy[k] - reach), np.searchsorted(ys, sy[k] + reach, "right")
            if c1 <= c0 or r1 <= r0:
                continue
            dx2 = ((xs[c0:c1] - sx[k]) ** 2).astype(np.float32)
            dy2 = ((ys[r0:r1] - sy[k]) ** 2).astype(np.float32)
            d2 = dy2[:, None] + dx2[None, :]
            within = d2 <= np.float32(reach * reach)
            p = d2 - np.float32(sr[k] ** 2)
            b_ = best[r0:r1, c0:c1]
            s_ = second[r0:r1, c0:c1]
            bi_ = bi[r0:r1, c0:c1]
            si_ = si[r0:r1, c0:c1]
            first = within & (p < b_)
            sec = within & ~first & (p < s_)
            s_[first] = b_[first]
            si_[first] = bi_[first]
            s_[sec] = p[sec]
            si_[sec] = k
            b_[first] = p[first]
            bi_[first] = k
        fat = core & ~bone & ~hmr & (bi >= 0)
        if w.sheet_xyr.size:
            fat &= ~w.sheet_grid(xs, ys)  # a sheet replaces the fat
        lab[core] = 1
        lab[fat] = 2
        lab[bone] = 3
        lab[hmr] = 4
        if fat.any():
            own = np.where(fat, bi, 0)
            d_own = np.sqrt(np.maximum(best + sr[own].astype(np.float32) ** 2, 0))
            edge = np.float32(w.adipo_reach) * sr[own].astype(np.float32) - d_own
            has2 = si >= 0
            oth = np.where(has2, si, 0)
            sep = np.hypot(sx[own] - sx[oth], sy[own] - sy[oth]).astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                bis = np.where(has2, (second - best) / (2 * sep), np.inf)
            m = wd.MEMBRANE_UM
            bd = np.minimum(edge, bis)
            width = np.where(bis < edge, m / 2, m).astype(np.float32)
            half = np.float32(mpp / 2)
            cov = np.clip(np.minimum(width, bd + half) - np.maximum(0, bd - half), 0, None) / np.float32(mpp)
            aux["memb"] = np.where(fat, np.minimum(cov, 1), 0).astype(np.float32)
        return lab, aux


    def _tissue(self, xs, ys, mpp, lab, aux, truth):
        """Absorbance -> intensity (H, W, 3) float32 of a region that holds tissue, and the fibre mask."""
        spec = self.spec
        g = spec["grid"]
        nd = len(spec["dyes"])
        H, W = lab.shape
        seed = self.w.p.seed
        haem = lab == 1
        fat = lab == 2
        bone = lab == 3
        box = (xs[0], ys[0], xs[-1], ys[-1])
        tex = np.zeros((H, W), np.float32)
        if mpp < 0.6:
            tex = nz.value_noise_grid(xs, ys, 0.9, nz.key_of(seed, _K_TEX))
            tex += 0.5 * nz.value_noise_grid(xs, ys, 0.45, nz.key_of(seed, _K_TEX + 50))
        _, prims = self.w.cells_in(*box, margin=12.0)
        if self.fibres is not None:
            fp = fibre_prims(self.fibres.near(*box), mpp, box, truth)
            prims = wd._cat([prims, fp])
        roles = composite(prims, xs, ys, mpp, tex)
        hmr = lab == 4
        hf = haem.astype(np.float32)
        for r in (R_NUC, R_CYTO, R_CYTB, R_COV, R_RING):
            roles[r] *= hf
        roles[R_RBC] *= haem | hmr
        roles[R_OST] *= bone
        fmask = roles[R_FMASK] >= 0.5 if truth else None
        st = nz.value_noise_grid(xs, ys, 3.0, nz.key_of(seed, _K_STROMA))
        if mpp < 0.6:
            st += 0.6 * nz.value_noise_grid(xs, ys, 1.1, nz.key_of(seed, _K_STROMA2))
        # spilled blood: packed red cells in plasma, as in a sinusoid
        sinus = (self.w.sinus_grid(xs, ys) & haem) | hmr
        free = (1 - roles[R_COV]) * (1 + 0.4 * st)
        stroma = free * (haem & ~sinus)
        sin_f = free * sinus
        ff = fat.astype(np.float32)
        lam = None
        if bone.any():
            n, t = aux["bone_n"], aux["bone_t"]
            lam = np.sin(np.float32(np.pi * 14.0) * n / t + 1.2 * nz.value_noise_grid(
                xs, ys, 25.0, nz.key_of(seed, _K_LAM)))
            lam = bone * (0.93 + 0.06 * lam + 0.04 * st)
        drift = 1 + 0.5 * self.jitter * nz.value_noise_grid(xs, ys, 900.0, nz.key_of(seed, _K_SLIDE))
        mix = spec["mix"]
        od = np.zeros((H, W, 3), np.float32)
        for d in range(nd):
            c = np.zeros((H, W), np.float32)
            if g["stroma"][d]:
                c += g["stroma"][d] * stroma
            if g["sinus"][d]:
                c += g["sinus"][d] * sin_f
            if g["fat"][d]:
                c += g["fat"][d] * ff
            if g["membrane"][d] and aux["memb"] is not None:
                c += g["membrane"][d] * aux["memb"]
            if g["bone"][d] and lam is not None:
                c += g["bone"][d] * lam
            for r in range(mix.shape[0]):
                if mix[r, d]:
                    c += mix[r, d] * roles[r]
            if mix[R_NUC, d]:
                c += mix[R_NUC, d] * roles[R_OST]
            c *= self.dye_scale[d] * drift
            c += np.float32(g["glass"][d] * self.dye_scale[d])
            for ch in range(3):
                od[:, :, ch] += spec["vectors"][d, ch] * c
        img = np.exp(np.float32(-math.log(10.0)) * od)
        img *= np.float32(255.0)
        return img, fmask

    # ------------------------------------------------------------------ region
    def region(self, gx0: float, gy0: float, w_px: int, h_px: int, mpp: float, *, truth: bool = False):
        """Render pixels whose centres are at ``(g0 + i + 0.5) * mpp`` µm; g0 may be fractional.

        Returns (rgb (h, w, 3) uint8, truth dict or None); truth holds 'labels' and 'fibres'.
        """
        sigma_px = BLUR_SIGMA_UM / mpp
        halo = int(math.ceil(3 * sigma_px)) + 1 if sigma_px >= 0.3 else 0
        ix0, iy0 = int(math.floor(gx0)) - halo, int(math.floor(gy0)) - halo
        fx, fy = gx0 - math.floor(gx0), gy0 - math.floor(gy0)
        W, H = w_px + 2 * halo, h_px + 2 * halo
        xs = (ix0 + np.arange(W) + fx + 0.5) * mpp
        ys = (iy0 + np.arange(H) + fy + 0.5) * mpp
        cx0, cy0, cx1, cy1 = self.w.core_bbox_um()
        tissue = not (xs[-1] < cx0 or xs[0] > cx1 or ys[-1] < cy0 or ys[0] > cy1)
        lab = np.zeros((H, W), np.uint8)
        fmask = None
        if tissue:
            lab, aux = self.labels(xs, ys, mpp)
        noise = nz.pixel_normal(ix0, iy0, W, H, nz.key_of(self.w.p.seed, _K_SHOT, int(round(mpp * 1e6))))
        if not (tissue and lab.any()):
            # glass only: uniform, so blur and slow drift change nothing
            img = np.broadcast_to(self.glass_rgb, (H, W, 3)).copy()
        else:
            img = self._tissue(xs, ys, mpp, lab, aux, truth)
            fmask = img[1]
            img = img[0]
            far = lab == 0
            if halo:
                k = 2 * halo + 1
                img = cv2.GaussianBlur(img, (k, k), sigma_px, borderType=cv2.BORDER_REFLECT)
                # pixels whose whole blur footprint is glass take the exact glass value, as glass-only chunks do
                far = cv2.erode(far.astype(np.uint8), np.ones((k, k), np.uint8),
                                borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
            img[far] = self.glass_rgb
        img += np.float32(NOISE_GAIN) * np.sqrt(img) * noise[:, :, None]
        sl = (slice(halo, halo + h_px), slice(halo, halo + w_px))
        rgb = np.clip(np.rint(img[sl]), 0, 255).astype(np.uint8)
        if not truth:
            return rgb, None
        t = {"labels": lab[sl].copy(),
             "fibres": fmask[sl].copy() if fmask is not None else np.zeros((h_px, w_px), bool)}
        return rgb, t
