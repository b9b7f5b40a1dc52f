"""H&E analyzer: tissue classes, cellularity, adipocytes, nucleated cells.

Per slide (``prepare``): the stain's Macenko estimate, its distance from the development stain
and, for a slide 5-15 degrees off (another lab's hue), the mapping of the nuclei's deconvolution
onto that stain (``he.stain.vectors: reference``); the haematoxylin floor and ceiling.
Dense step (torch, on the device): optical density, haematoxylin/eosin deconvolution,
the smoothed haematoxylin maps of the nuclear detector and the pooled maps of the tissue
classes. Per tile (CPU): tissue labels (:mod:`marrowseg.analyzers.tissue`), nuclei
(:mod:`marrowseg.analyzers.nuclei`; with ``faint_nuclei`` set, also the pale nuclei below the
nuclear mask, :func:`marrowseg.analyzers.nuclei.faint_nuclei`), counting only the tile core. ``finalize`` turns the
summed pixel counts and counts into readouts; every ratio is formed there.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import numpy as np
import torch

from marrowseg import stains
from marrowseg.analyzers import nuclei as nuc
from marrowseg.analyzers import nuclei_model as nmod
from marrowseg.analyzers import tissue as tis
from marrowseg.analyzers.base import LabelClass, TileContext, TileResult
from marrowseg.analyzers.marrow import (
    MarrowAnalyzer,
    crush_measurement,
    nuclear_log_area_sum,
    nuclear_scale,
)
from marrowseg.config.he import CellularityReference, HEConfig, load_cellularity_reference
from marrowseg.errors import ConfigError

__all__ = ["HEAnalyzer", "HEModule", "cellularity_interval", "cellularity_verdict"]

log = logging.getLogger(__name__)

_CELL_COLUMNS = ("area_um2", "eccentricity", "solidity", "h_od_mean", "h_od_cv")
_MIN_INTENSITY, _BACKGROUND = 1.0, 255.0  # as marrowseg.stains: one grey level keeps log finite


class HEModule(torch.nn.Module):
    """``(B, 3, H, W)`` RGB 0..255 -> haematoxylin OD, nuclear maps and tissue maps.

    Outputs at the analysis resolution: ``h_od``, ``peak``, ``mask`` (B, 1, H, W), and with
    ``he.nuclei.detector: unet`` the learned ``centre`` map, with ``he.nuclei.mask_net`` the
    learned ``nuclear_prob``; at the
    tissue-class resolution: ``bright``, ``h_ctx``, ``e_ctx`` (B, 1, ceil(H/k), ceil(W/k)); with
    ``he.nuclei.mask_contrast_od`` the nuclear mask's ``background`` on its own coarse grid
    (B, 1, ceil(H/f), ceil(W/f)), f = :func:`marrowseg.analyzers.nuclei.background_factor`.
    """

    def __init__(self, rgb_from_stains: np.ndarray, config: HEConfig, tissue_scale: float = 1.0,
                 tissue_rgb_from_stains: np.ndarray | None = None) -> None:
        super().__init__()
        self.tissue_scale = float(tissue_scale)  # x summed OD and eosin for the tissue classes (HEAnalyzer.prepare)
        inv = np.linalg.inv(np.asarray(rgb_from_stains, np.float64))
        # od = conc @ rgb_from_stains (row vectors), so conc = od @ inv: indexed (rgb, stain)
        self.register_buffer("rgb_to_stain", torch.as_tensor(inv, dtype=torch.float32))
        # he.stain.vectors: reference deconvolves the tissue classes' H and E apart from the nuclei's
        self.tissue_rgb_to_stain: torch.Tensor | None
        if tissue_rgb_from_stains is None:
            self.tissue_rgb_to_stain = None
        else:
            inv_t = np.linalg.inv(np.asarray(tissue_rgb_from_stains, np.float64))
            self.register_buffer("tissue_rgb_to_stain", torch.as_tensor(inv_t, dtype=torch.float32))
        self.nuclei = nuc.NucleusMaps(config.mpp, config.nuclei)
        self.tissue = tis.TissueMaps(config.mpp, config.tissue)
        # he.nuclei.detector: unet adds the learned centre map (output "centre")
        self.centre_net = nmod.load_centre_net(config.nuclei.unet_weights) if config.nuclei.detector == "unet" else None
        # he.nuclei.mask_net adds the learned nuclear probability (output "nuclear_prob")
        self.mask_net = nmod.load_mask_net(config.nuclei.mask_net_weights) if config.nuclei.mask_net else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # od = -log10(I / 255) with I clamped to 1..255 (as stains.od_from_rgb_torch), in one pass
        od = x.float().clamp(_MIN_INTENSITY, _BACKGROUND).log10_().neg_().add_(math.log10(_BACKGROUND))
        conc = torch.einsum("bchw,cs->bshw", od, self.rgb_to_stain.to(od.dtype))
        h = torch.clamp(conc[:, 0:1], min=0.0)
        out = {"h_od": h}
        out.update(self.nuclei(h))
        od_sum, he_conc = od.sum(dim=1, keepdim=True), conc[:, 0:2]
        if self.tissue_rgb_to_stain is not None:
            he_conc = torch.einsum("bchw,cs->bshw", od, self.tissue_rgb_to_stain[:, 0:2].to(od.dtype))
        if self.tissue_scale != 1.0:
            od_sum = od_sum * self.tissue_scale
            he_conc = torch.cat([he_conc[:, 0:1], he_conc[:, 1:2] * self.tissue_scale], dim=1)  # H is scaled already
        out.update(self.tissue(od_sum, he_conc))
        if self.centre_net is not None:
            out["centre"] = self.centre_net(x.float())
        if self.mask_net is not None:
            out["nuclear_prob"] = self.mask_net(x.float())
        return out




def _nucleus_box(ctx: TileContext, shape: tuple[int, int], margin_px: float) -> tuple[tuple[slice, slice], tuple[int, int]]:
    """The tile's core grown by ``margin_px`` and clipped to ``shape``; and its (row, col) origin."""
    m = int(math.ceil(margin_px)) if np.isfinite(margin_px) else max(shape)
    r0, c0 = max(0, ctx.core[0].start - m), max(0, ctx.core[1].start - m)
    r1, c1 = min(shape[0], ctx.core[0].stop + m), min(shape[1], ctx.core[1].stop + m)
    return (slice(r0, r1), slice(c0, c1)), (r0, c0)


def cellularity_interval(age: float, rule_name: str, reference: CellularityReference) -> tuple[float, float]:
    """Normal cellularity interval (low, high) in percent for ``age`` years under a named rule.

    Raises
    ------
    ConfigError
        Unknown rule name.
    ValueError
        Negative age or an age outside every band of a table.
    """
    if rule_name not in reference.rules:
        raise ConfigError(f"he.cellularity_rule: unknown rule {rule_name!r}; known: {', '.join(reference.rules)}")
    if not (age >= 0):
        raise ValueError(f"age must be >= 0 years, got {age}")
    rule = reference.rules[rule_name]
    if rule.kind == "hundred_minus_age":
        centre = 100.0 - float(age)
        tol = float(rule.tolerance_pct)
        return max(0.0, centre - tol), min(100.0, max(0.0, centre + tol))
    for band in rule.bands:
        if band.age_min <= age < band.age_max:
            return float(band.low_pct), float(band.high_pct)
    raise ValueError(f"age {age} is outside every band of rule {rule_name!r}")


def cellularity_verdict(cellularity_pct: float, low_pct: float, high_pct: float) -> str:
    """``hypocellular`` below ``low_pct``, ``hypercellular`` above ``high_pct``, else ``normocellular``."""
    if cellularity_pct < low_pct:
        return "hypocellular"
    if cellularity_pct > high_pct:
        return "hypercellular"
    return "normocellular"


# A pixel counts as nuclear for the stain level when its haematoxylin exceeds its eosin and this
# OD (the faintest nuclear rim at 0.5 µm/px; pink cytoplasm and membranes stay below).
_NUCLEAR_MIN_H_OD = 0.15
# ~10 nuclei at 0.5 µm/px: a small crop's sample holds a few thousand tissue pixels.
_NUCLEAR_MIN_PIXELS = 300


class HEAnalyzer(MarrowAnalyzer):
    """Cellularity and nucleated cells of an H&E-stained marrow trephine.

    Parameters
    ----------
    config : HEConfig
        The ``he`` section of the configuration.
    """

    stain: ClassVar[str] = "he"
    cell_classes: ClassVar[tuple[LabelClass, ...]] = (
        LabelClass(1, "late_erythroid", (220, 30, 30)),
        LabelClass(2, "megakaryocyte", (30, 30, 220)),
        LabelClass(3, "other", (30, 180, 30)),
    )
    allow_amp: ClassVar[bool] = False  # OD thresholds near 0.25 do not survive float16 rounding of logs
    # mbm-dev crops resampled to coarser scans: detection F1 0.896 at 1.5 µm/px, 0.871 at 2.0,
    # 0.780 at 3.0 (count -16 %), 0.383 at 4.0 (docs/validation.md)
    max_scan_mpp: ClassVar[float | None] = 2.0
    # PSS with 1 and 4 tile workers at tile_px 1024 and 2048 (scripts/worker_memory.py, docs/validation.md)
    memory_model_mb: ClassVar[tuple[float, float, float, float]] = (335.0, 20.0, 125.0, 45.0)

    def __init__(self, config: HEConfig) -> None:
        super().__init__(config)
        self.rgb_from_stains = stains.stain_matrix(stains.RUIFROK_H, stains.RUIFROK_E)
        self.tissue_scale = 1.0  # set per slide by prepare (he.stain.tissue_follows_floor)
        # the tissue classes' own deconvolution where it differs from the nuclei's (he.stain.vectors: reference)
        self.tissue_rgb_from_stains: np.ndarray | None = None
        self.k = tis.class_factor(config.mpp, config.tissue.class_mpp)
        self._ref_nets: dict[str, torch.nn.Module] | None = None  # reference_dense's learned nets
        self.reference = load_cellularity_reference()
        if config.cellularity_rule not in self.reference.rules:
            raise ConfigError(
                f"he.cellularity_rule: unknown rule {config.cellularity_rule!r}; "
                f"known: {', '.join(self.reference.rules)}"
            )
        self.edges_um2 = np.asarray(config.adipocyte_bins_um2, np.float64)
        if config.nuclei.detector == "unet" and not math.isclose(float(config.mpp), nmod.TRAIN_MPP):
            raise ConfigError(f"he.nuclei.detector unet is trained at {nmod.TRAIN_MPP} µm/px; he.mpp is {config.mpp}")
        if config.nuclei.mask_net and not math.isclose(float(config.mpp), nmod.TRAIN_MPP):
            raise ConfigError(f"he.nuclei.mask_net is trained at {nmod.TRAIN_MPP} µm/px; he.mpp is {config.mpp}")

    # -- dense ----------------------------------------------------------------------------
    @property
    def needs_sample(self) -> bool:
        return self.config.stain.vectors != "ruifrok" or self.config.stain.scales_haematoxylin

    def prepare(self, sample_rgb: np.ndarray) -> dict[str, Any]:
        """Choose the stain vectors (Ruifrok, a Macenko estimate, or the slide's stain mapped onto
        the reference stain), then the haematoxylin scale."""
        cfg = self.config.stain
        sample_rgb = tis.without_opaque(sample_rgb, self.config.tissue)
        ruifrok = stains.stain_matrix(stains.RUIFROK_H, stains.RUIFROK_E)
        self.rgb_from_stains = ruifrok  # each slide starts from the published vectors
        self._module = None
        info: dict[str, Any] = {"stain_vectors": "ruifrok"}
        self.tissue_rgb_from_stains = None
        has_reference = cfg.reference_h is not None and cfg.reference_e is not None
        if cfg.vectors != "ruifrok" or has_reference:
            h_e, est = self._macenko(sample_rgb, ruifrok)
            info["macenko"] = est
            if h_e is not None:
                info["h"], info["e"] = [float(x) for x in h_e[0]], [float(x) for x in h_e[1]]
                if has_reference:
                    # how far the slide's stain lies from the one the nuclear thresholds were set on
                    # (provenance only; the development crops' own estimates scatter up to 4.7 degrees)
                    ref = stains.stain_matrix(cfg.reference_h, cfg.reference_e)
                    info["stain_hue_deg"] = {"h": round(stains.angle_deg(h_e[0], ref[0]), 2), "e": round(stains.angle_deg(h_e[1], ref[1]), 2)}
                if cfg.vectors != "ruifrok":
                    info.update(self._use_vectors(h_e, ruifrok))
        if info["stain_vectors"] == "reference":
            # the tissue thresholds were set in the Ruifrok deconvolution (on phantoms, and one real
            # trabecula whose stain is the reference); mapping the tissue too read phantom bone worse
            # (thirty-first and thirty-second sessions): the tissue classes keep the Ruifrok deconvolution
            self.tissue_rgb_from_stains = ruifrok
        self.tissue_scale = 1.0
        if cfg.scales_haematoxylin:
            pixels = np.asarray(sample_rgb).reshape(-1, 3)
            self.rgb_from_stains, h_info = self._normalise_haematoxylin(pixels, self.rgb_from_stains)
            info.update(h_info)
            tissue_scale = info.get("h_scale", 1.0)
            if self.tissue_rgb_from_stains is not None:
                # The tissue's haematoxylin gets its own scale, but whether the section is pale is the
                # mapped (hue-corrected) level's to say: a bluer lab haematoxylin reads ~0.75 in Ruifrok's
                # basis and would look pale, and the tissue OD scale below then took nucleus-poor marrow
                # for bone (phantoms in Macenko's vectors, thirty-second session)
                self.tissue_rgb_from_stains, t_info = self._normalise_haematoxylin(
                    pixels, self.tissue_rgb_from_stains, warn=False)  # the nuclei's scale has said it
                info["tissue_h_scale"] = t_info.get("h_scale", 1.0)
            if cfg.tissue_follows_floor and tissue_scale > 1.0:
                # a thinner section or a paler run takes every dye down by the same factor (Beer-Lambert);
                # the tissue thresholds (bright_max_od, bone_min_eosin_od) are absolute, and at 0.6-0.7x
                # fat membranes fell below bright_max_od and fat spaces merged into "tissue"
                self.tissue_scale = float(tissue_scale)
                info["tissue_od_scale"] = self.tissue_scale
        return info

    def _macenko(self, sample_rgb: np.ndarray, ruifrok: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray] | None, dict]:
        """The slide's (haematoxylin, eosin) Macenko vectors, or None, and the estimator's report."""
        cfg = self.config.stain
        od = stains.od_from_rgb(np.asarray(sample_rgb).reshape(-1, 3))
        vecs, est = stains.estimate_two_stains(od, min_od=cfg.macenko_min_od, percentile=cfg.macenko_percentile,
                                               reference=ruifrok)
        return (None if vecs is None else (vecs[0], vecs[1])), est

    def _use_vectors(self, h_e: tuple[np.ndarray, np.ndarray], ruifrok: np.ndarray) -> dict[str, Any]:
        """Set ``rgb_from_stains`` from the slide's Macenko vectors (``he.stain.vectors``).

        ``macenko`` deconvolves with the estimate itself. ``reference`` keeps the Ruifrok
        deconvolution the nuclear thresholds were chosen with, but first maps the slide's stains
        onto the reference stain, ``conc = od @ inv(S) @ Ref @ inv(Ruifrok)``, where ``S`` is the
        slide's estimate and ``Ref`` the development crops' estimate by the same estimator, whose
        bias (its eosin lies 15-20 degrees from Ruifrok's on every real H&E here) then cancels as
        long as the tissue is alike. ``reference`` maps only an estimate lying between the two
        ``reference_angle_deg`` from the reference (nearer: the development stain's own scatter;
        farther: hues where the estimate misled), and notes why it did not. Either keeps Ruifrok,
        and says why, when a vector lies more than ``max_angle_deg`` from the vector it is
        compared with.
        """
        cfg = self.config.stain
        h, e = h_e
        ref = ruifrok if cfg.vectors == "macenko" else stains.stain_matrix(cfg.reference_h, cfg.reference_e)
        dh, de = stains.angle_deg(h, ref[0]), stains.angle_deg(e, ref[1])
        info: dict[str, Any] = {"h_angle_deg": dh, "e_angle_deg": de}
        if cfg.vectors == "reference":
            lo, hi = cfg.reference_angle_deg
            if max(dh, de) <= lo:
                info["stain_vectors_note"] = (
                    f"estimated vectors {dh:.1f} / {de:.1f} deg from the reference, within he.stain.reference_angle_deg "
                    f"{lo:g}: stained as the reference, deconvolved as it is")
                return info
            if max(dh, de) > hi:
                info["stain_vectors_note"] = (
                    f"estimated vectors {dh:.1f} / {de:.1f} deg from the reference, beyond he.stain.reference_angle_deg "
                    f"{hi:g} (beyond the hues the mapping was checked on): deconvolved as it is")
                return info
        if dh > cfg.max_angle_deg or de > cfg.max_angle_deg:
            against = "Ruifrok" if cfg.vectors == "macenko" else "reference"
            info["stain_vectors_fallback_reason"] = (
                f"estimated vectors {dh:.0f} / {de:.0f} deg from the {against} vectors, beyond "
                f"he.stain.max_angle_deg {cfg.max_angle_deg:g}: Ruifrok kept")
            log.warning("H&E %s", info["stain_vectors_fallback_reason"])
            return info
        slide = stains.stain_matrix(h, e)
        if cfg.vectors == "macenko":
            self.rgb_from_stains = slide
        else:
            # od @ inv(M) = od @ inv(S) @ Ref @ inv(R)  <=>  M = R @ inv(Ref) @ S
            self.rgb_from_stains = ruifrok @ np.linalg.inv(ref) @ slide
        info["stain_vectors"] = cfg.vectors
        return info

    def _normalise_haematoxylin(self, sample_rgb: np.ndarray, rgb_from_stains: np.ndarray,
                                warn: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
        """Scale the haematoxylin vector so that the slide's nuclear OD lies between the floor and the ceiling.

        The nuclear thresholds are absolute ODs; a slide stained 20 % paler than the crops they
        were chosen on loses a tenth of its nuclei (mbm-dev: count MAE 7.9 -> 15.9), one 30 %
        darker counts a tenth too many (MAE 15.0). A level below ``h_reference_od`` is brought up
        to it, one above ``h_ceiling_od`` down to it, one between is left alone. The level is
        a percentile of nuclear pixels only (haematoxylin above eosin and above
        ``_NUCLEAR_MIN_H_OD``), so a fatty marrow, whose tissue is mostly pale membranes, is not
        taken for a pale stain. Dividing the H vector by ``s`` multiplies every haematoxylin
        concentration by ``s``, so the module and the NumPy reference both see the normalised stain.
        Returns the scaled copy of ``rgb_from_stains`` and what was measured.
        """
        cfg = self.config.stain
        od = stains.od_from_rgb(sample_rgb)
        tissue = od.sum(axis=1) >= cfg.h_tissue_min_od
        lo, hi = cfg.h_scale_limits
        if tissue.sum() < 1000:
            return rgb_from_stains, {"h_scale": 1.0, "h_scale_note": f"too few tissue pixels in the sample ({int(tissue.sum())})"}
        conc = od[tissue] @ np.linalg.inv(np.asarray(rgb_from_stains, np.float64))
        h = np.maximum(conc[:, 0], 0.0)
        nuclear = (h > conc[:, 1]) & (h > _NUCLEAR_MIN_H_OD)
        if nuclear.sum() < _NUCLEAR_MIN_PIXELS:
            return rgb_from_stains, {"h_scale": 1.0, "h_scale_note": f"too few nuclear pixels in the sample ({int(nuclear.sum())})"}
        level = max(float(np.percentile(h[nuclear], cfg.h_reference_percentile)), 1e-6)
        target = level
        if cfg.h_reference_od is not None:
            target = max(target, cfg.h_reference_od)
        if cfg.h_ceiling_od is not None:
            target = min(target, cfg.h_ceiling_od)
        raw = target / level
        scale = float(np.clip(raw, lo, hi))
        m = np.array(rgb_from_stains, np.float64)
        m[0] = m[0] / scale
        info: dict[str, Any] = {"h_scale": scale, "h_level_od": level}
        if scale != raw:
            # the nuclear thresholds then see a stain outside the range they were chosen on: the QA
            # notebook flags the slide ("stain estimate unreliable") and the log says why
            info["h_scale_fallback_reason"] = (
                f"haematoxylin not brought into range: nuclear level {level:.2f} OD needs x{raw:.2f}, beyond "
                f"he.stain.h_scale_limits [{lo:g}, {hi:g}]; counts may read {'low' if raw > 1 else 'high'}")
            if warn:
                log.warning("H&E %s", info["h_scale_fallback_reason"])
        return m, info

    def build_module(self) -> torch.nn.Module:
        return HEModule(self.rgb_from_stains, self.config, self.tissue_scale, self.tissue_rgb_from_stains).eval()

    def reference_dense(self, rgb: np.ndarray) -> dict[str, np.ndarray]:
        """The module's dense outputs for one tile, in plain NumPy / SciPy (the peer baseline).

        Parameters
        ----------
        rgb : (H, W, 3) uint8 ndarray
            One tile.

        Returns
        -------
        dict of str to ndarray
            The keys of :class:`HEModule`'s output, each float32 and shaped like it without
            the batch axis: ``(1, H, W)`` at the analysis resolution, ``(1, ceil(H/k), ceil(W/k))``
            at the tissue-class resolution; ``post(reference_dense(rgb), rgb, ctx)`` works.

        Notes
        -----
        Gaussian blurs use ``scipy.ndimage.gaussian_filter`` with ``mode="mirror"`` and a
        radius of ``ceil(3 sigma)``, the module's padding and truncation.
        """
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"rgb: expected an (H, W, 3) array, got shape {rgb.shape}")
        cfg = self.config
        mpp = float(cfg.mpp)
        od = -np.log10(np.clip(rgb.astype(np.float32), _MIN_INTENSITY, _BACKGROUND) / np.float32(_BACKGROUND))
        stains_from_rgb = np.linalg.inv(np.asarray(self.rgb_from_stains, np.float64)).astype(np.float32)
        conc = od @ stains_from_rgb
        h = np.maximum(conc[..., 0], 0.0)
        out = {"h_od": h}
        out.update(nuc.reference_maps(h, mpp, cfg.nuclei))
        od_sum, he_conc = od.sum(axis=2), conc[..., :2]
        if self.tissue_rgb_from_stains is not None:
            he_conc = od @ np.linalg.inv(np.asarray(self.tissue_rgb_from_stains, np.float64)).astype(np.float32)[:, :2]
        if self.tissue_scale != 1.0:
            od_sum = od_sum * np.float32(self.tissue_scale)
            he_conc = np.concatenate([he_conc[..., 0:1], he_conc[..., 1:2] * np.float32(self.tissue_scale)], axis=-1)
        out.update(tis.reference_maps(od_sum, he_conc, mpp, cfg.tissue))
        # the learned maps have no SciPy twin: the same nets, one tile, loaded once per analyzer
        # (not the module's: the engine may have moved those to a GPU)
        if self._ref_nets is None:
            self._ref_nets = {}
            if cfg.nuclei.detector == "unet":
                self._ref_nets["centre"] = nmod.load_centre_net(cfg.nuclei.unet_weights)
            if cfg.nuclei.mask_net:
                self._ref_nets["nuclear_prob"] = nmod.load_mask_net(cfg.nuclei.mask_net_weights)
        with torch.no_grad():
            for key, net in self._ref_nets.items():
                out[key] = net(torch.from_numpy(rgb).permute(2, 0, 1)[None].float())[0, 0].numpy()
        return {key: np.asarray(v, np.float32)[None] for key, v in out.items()}

    # -- per tile -------------------------------------------------------------------------
    def post(self, dense: dict[str, np.ndarray], rgb: np.ndarray, ctx: TileContext) -> TileResult:
        cfg = self.config
        mpp = float(ctx.mpp)
        k = self.k
        d = {key: np.asarray(v, dtype=np.float32).reshape(np.shape(v)[-2:]) for key, v in dense.items()}
        # beyond the slide there is only white padding: work on the valid box only
        full = d["h_od"].shape
        if "background" in d:  # the nuclear mask's background comes on a coarse grid of its own
            d["background"] = nuc.upsample_background(d["background"], full, cfg.nuclei.mask_background_sigma_um / mpp)
        d, vr, vc = self._valid_box(d, ctx)
        shape = d["h_od"].shape
        class_mpp = mpp * k
        valid_c, border_c = self._geometry(ctx, shape)
        # black fill and marker ink: outside the section, and no haematoxylin
        valid_c, border_c = tis.exclude_opaque(rgb[:vr, :vc], k, cfg.tissue, valid_c, border_c, d,
                                               ("h_od", "peak", "mask"))
        labels_c, fat = tis.classify_tissue(
            d["bright"], d["h_ctx"], d["e_ctx"], class_mpp, cfg.tissue, valid=valid_c, open_border=border_c
        )
        crush_c = None
        if cfg.tissue.crush is not None:
            labels_c, fat, crush_c = self._leave_out_crush(labels_c, fat, d["h_od"], d["h_ctx"], class_mpp, cfg.tissue.crush)
        labels = tis.upsample_labels(labels_c, k, shape)
        core = ctx.core
        core_labels = labels[core]
        stats = self._tissue_stats(core_labels)
        if crush_c is not None:
            stats["crush_px"] = self._crush_px(crush_c, shape, ctx)

        # adipocytes: one per fat space, counted by the tile holding its centroid
        fr = (fat.row + 0.5) * k - 0.5
        fc = (fat.col + 0.5) * k - 0.5
        in_core = ctx.in_core(fr, fc) if fr.size else np.zeros(0, bool)
        areas_um2 = fat.area_px[in_core].astype(np.float64) * class_mpp**2
        hist = np.bincount(np.digitize(areas_um2, self.edges_um2), minlength=len(self.edges_um2) + 1)
        stats["n_adipocytes"] = int(in_core.sum())
        stats["adipocyte_area_um2"] = float(areas_um2.sum())
        for i, n in enumerate(hist):
            stats[f"n_adipocytes_bin_{i:02d}"] = int(n)

        # nuclei: centres searched in marrow (haematopoietic tissue and fat septa), over the
        # core and the nuclei's own search margin (the tile halo is sized for fat spaces)
        allowed = (labels == tis.HAEMATOPOIETIC) | (labels == tis.FAT)
        margin = cfg.nuclei.search_margin_um
        box, (r_off, c_off) = _nucleus_box(ctx, shape, np.inf if margin is None else margin / mpp)
        if cfg.nuclei.detector == "unet":
            _, table = nuc.detect_nuclei_from_centre_map(
                d["h_od"][box], mpp, cfg.nuclei, d["centre"][box], peak_map=d["peak"][box],
                mask_map=d["mask"][box], allowed=allowed[box]
            )
        else:
            nuc_labels, table = nuc.detect_nuclei(
                d["h_od"][box], mpp, cfg.nuclei, peak_map=d["peak"][box], mask_map=d["mask"][box],
                allowed=allowed[box], background_map=d["background"][box] if "background" in d else None,
                mask=d["nuclear_prob"][box] >= np.float32(cfg.nuclei.mask_net_threshold) if cfg.nuclei.mask_net else None,
            )
            if cfg.faint_nuclei is not None:
                table = self._add_faint(d, box, nuc_labels, table, labels[box] == tis.HAEMATOPOIETIC, mpp)
        table = dict(table, row=table["row"] + r_off, col=table["col"] + c_off)
        keep = ctx.in_core(table["row"], table["col"])
        classes = nuc.classify_nuclei(table, cfg.classes)[keep]
        cells = {"row": table["row"][keep], "col": table["col"][keep], "class": classes.astype(str)}
        for c in _CELL_COLUMNS:
            cells[c] = table[c][keep]
        stats["n_nucleated"] = int(keep.sum())
        stats["nuclear_log_area_sum"] = nuclear_log_area_sum(cells["area_um2"])
        for name in nuc.NUCLEUS_CLASSES:
            stats[f"n_{name}"] = int((classes == name).sum())

        windows = self._windows(core_labels, cells, ctx) if cfg.window_um is not None else {}
        return TileResult(stats=stats, maps={"labels": self._map(labels, ctx)}, cells=cells, windows=windows)

    def _add_faint(self, d: dict[str, np.ndarray], box: tuple[slice, slice], nuc_labels: np.ndarray,
                   table: dict[str, np.ndarray], marrow: np.ndarray, mpp: float) -> dict[str, np.ndarray]:
        """Append the pale nuclei below the nuclear mask (:func:`nuclei.faint_nuclei`) to ``table``.

        Only in haematopoietic tissue (not fat septa: a fat-cell membrane is a line, and the
        seeds' depth rule is the only guard there), away from the nuclei already found; the new
        rows are classified with the others by :func:`nuclei.classify_nuclei`.
        """
        fc = self.config.faint_nuclei
        _, ft = nuc.faint_nuclei(
            d["mask"][box], d["peak"][box], d["h_od"][box], mpp, nuc_labels, background_um=fc.background_um,
            contrast_od=fc.contrast_od, gap_um=fc.gap_um, min_radius_um=fc.min_radius_um,
            min_distance_um=fc.min_distance_um, min_area_um2=fc.min_area_um2, max_area_um2=fc.max_area_um2,
            allowed=marrow, max_background_od=fc.max_background_od, max_eccentricity=fc.max_eccentricity,
        )
        if len(ft["label"]) == 0:
            return table
        offset = int(nuc_labels.max()) if nuc_labels.size else 0
        ft = dict(ft, label=ft["label"] + offset)
        return {k: np.concatenate([np.asarray(table[k]), np.asarray(ft[k]).astype(np.asarray(table[k]).dtype)])
                for k in table}

    def _windows(self, core_labels: np.ndarray, cells: dict[str, np.ndarray], ctx: TileContext) -> dict:
        names = {tis.HAEMATOPOIETIC: "haematopoietic_px", tis.FAT: "fat_px", tis.BONE: "bone_px"}
        out: dict[tuple[int, int], dict[str, float]] = {}
        for key, n, inwin in self._window_blocks(core_labels, cells, ctx):
            out[key] = {name: int(n[v]) for v, name in names.items()} | {"n_nucleated": int(inwin.sum())}
        return out

    # -- slide ----------------------------------------------------------------------------
    def _quantile(self, hist: np.ndarray, q: float) -> float | None:
        """Quantile of the adipocyte areas from the fixed-bin histogram (linear within a bin)."""
        n = hist.sum()
        if n == 0:
            return None
        edges = self.edges_um2
        target = q * n
        cum = np.cumsum(hist)
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, len(hist) - 1)
        if i == 0:
            return float(edges[0])  # below the first edge: report the edge
        if i == len(hist) - 1:
            return float(edges[-1])  # open-ended last bin: report its lower edge
        lo, hi = edges[i - 1], edges[i]
        before = cum[i - 1]
        frac = (target - before) / hist[i] if hist[i] else 0.0
        return float(lo + frac * (hi - lo))

    def finalize(
        self,
        totals: dict[str, float],
        windows: dict[tuple[int, int], dict[str, float]],
        *,
        age: float | None = None,
    ) -> dict[str, Any]:
        px_um2 = float(self.config.mpp) ** 2
        g = lambda key: float(totals.get(key, 0))  # noqa: E731
        haem_um2, fat_um2 = g("haematopoietic_px") * px_um2, g("fat_px") * px_um2
        bone_um2, excl_um2 = g("bone_px") * px_um2, g("excluded_px") * px_um2
        marrow_um2 = haem_um2 + fat_um2
        n_cells = int(g("n_nucleated"))
        n_adip = int(g("n_adipocytes"))
        hist = np.array([int(totals.get(f"n_adipocytes_bin_{i:02d}", 0)) for i in range(len(self.edges_um2) + 1)])

        def ratio(a: float, b: float, scale: float = 1.0) -> float | None:
            return None if b <= 0 else float(a / b * scale)

        cellularity = ratio(haem_um2, marrow_um2, 100.0)
        readouts: dict[str, Any] = {
            "cellularity_pct": cellularity,
            "bone_area_frac": ratio(bone_um2, bone_um2 + marrow_um2),
            "marrow_area_mm2": marrow_um2 / 1e6,
            "adipocyte_count": n_adip,
            "adipocyte_area_um2_q25": self._quantile(hist, 0.25),
            "adipocyte_area_um2_median": self._quantile(hist, 0.5),
            "adipocyte_area_um2_q75": self._quantile(hist, 0.75),
            "adipocyte_area_um2_mean": ratio(g("adipocyte_area_um2"), n_adip),
            "nucleated_cells": n_cells,
            "nucleated_cells_per_mm2": ratio(n_cells, haem_um2, 1e6),
            "late_erythroid_per_100": ratio(g("n_late_erythroid"), n_cells, 100.0),
            "megakaryocytes_per_mm2": ratio(g("n_megakaryocyte"), haem_um2, 1e6),
        }
        interpretation: dict[str, Any] = {}
        if age is not None:
            low, high = cellularity_interval(float(age), self.config.cellularity_rule, self.reference)
            rule = self.reference.rules[self.config.cellularity_rule]
            readouts["cellularity_reference"] = {
                "low": low,
                "high": high,
                "rule": self.config.cellularity_rule,
                "source": rule.source,
            }
            readouts["cellularity_verdict"] = (
                None if cellularity is None else cellularity_verdict(cellularity, low, high)
            )
            interpretation = {"age_years": float(age), "cellularity_verdict": readouts["cellularity_verdict"]}

        # local cellularity over windows with enough marrow (half a window) to be meaningful
        win_cell = []
        if self.config.window_um is not None:
            min_px = 0.5 * (float(self.config.window_um) ** 2) / px_um2
            for v in windows.values():
                m = v.get("haematopoietic_px", 0) + v.get("fat_px", 0)
                if m >= min_px:
                    win_cell.append(100.0 * v["haematopoietic_px"] / m)
        win_summary = (
            {
                "n_windows": len(win_cell),
                "window_um": float(self.config.window_um),
                "cellularity_pct_p10": float(np.percentile(win_cell, 10)),
                "cellularity_pct_median": float(np.median(win_cell)),
                "cellularity_pct_p90": float(np.percentile(win_cell, 90)),
            }
            if win_cell
            else {"n_windows": 0}
        )
        out = {
            "readouts": readouts,
            "areas_um2": {
                "haematopoietic": haem_um2,
                "fat": fat_um2,
                "bone": bone_um2,
                "excluded": excl_um2,
            },
            "counts": {name: int(g(f"n_{name}")) for name in nuc.NUCLEUS_CLASSES},
            "measurements": {
                "adipocyte_area_hist": {
                    "edges_um2": [float(e) for e in self.edges_um2],
                    "counts": [int(c) for c in hist],
                    "note": "counts[0] is below edges[0], counts[i] in [edges[i-1], edges[i]), the last is >= edges[-1]",
                },
                "local_cellularity": win_summary,
                "nuclear_scale": nuclear_scale(totals, self.config.nuclear_area_check_um2),
            },
        }
        if self.config.tissue.crush is not None:
            out["measurements"]["crush"] = crush_measurement(totals, px_um2, marrow_um2)
        if interpretation:
            out["interpretation"] = interpretation
        for v in out["readouts"].values():
            if isinstance(v, float) and not math.isfinite(v):
                raise AssertionError("non-finite readout")  # ratios guard their denominators
        return out
