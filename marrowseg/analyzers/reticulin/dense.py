"""The dense torch step of the reticulin analyzer: optical density, the ridge contrast of the fibres and
the smoothed colour features of the tissue classes.
"""

from __future__ import annotations

import torch

from marrowseg.analyzers import fibres
from marrowseg.stains import od_from_rgb_torch

__all__ = []


class _ReticulinModule(torch.nn.Module):
    """(B, 3, H, W) RGB 0..255 -> ridge contrast (OD), winning scale, tissue features."""

    def __init__(
        self,
        mpp: float,
        scales_um: tuple[float, ...],
        flank_factor: float,
        smooth_um: float,
        background_radius_um: float,
        blob_radius_um: float,
        chroma_penalty: float,
        half_max_radius_um: float,
        half_max_floor_od: float,
    ):
        super().__init__()
        self.half_max_floor_od = float(half_max_floor_od)
        self.chroma_penalty = float(chroma_penalty)
        self.half_max_radius_px = float(half_max_radius_um) / float(mpp)
        self.mpp = float(mpp)
        self.background_radius_px = float(background_radius_um) / float(mpp)
        self.blob_radius_px = float(blob_radius_um) / float(mpp)
        self.scales_um = tuple(float(s) for s in scales_um)
        self.flank_factor = float(flank_factor)
        self.smooth_px = float(smooth_um) / float(mpp)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.float()  # the filter differences small OD contrasts: keep float32 under autocast
        od = od_from_rgb_torch(x)
        # silver absorbs in every channel; orange bone (red ~ glass) and the pink/purple
        # counterstain each leave one channel bright, so the minimum over channels isolates it
        lo = od.amin(dim=1, keepdim=True)
        hi = od.amax(dim=1, keepdim=True)
        # silver is a neutral absorber: OD equal in R, G, B. What a coloured stain adds to the
        # weakest channel is paid back in proportion to its colour spread, so magenta nuclei
        # and brown-orange collagen drop out while grey/black fibres keep their OD
        dark = (lo - self.chroma_penalty * (hi - lo)).clamp(min=0)
        ridge, scale_idx = fibres.ridge_contrast_torch(
            dark, self.mpp, scales_um=self.scales_um, flank_factor=self.flank_factor
        )
        # local background under fibres (grey opening removes anything narrower than the
        # structuring element); the top-hat is the fibre contrast used for half-max widths
        dark_s = fibres.gaussian_blur_torch(dark, 0.5)
        tophat = dark_s - fibres.grey_opening_torch(dark_s, self.background_radius_px)
        # a fibre's body is where its contrast is at least half the nearby peak (FWHM), so
        # the mask width follows the fibre, not its contrast over the hysteresis threshold;
        # but a fainter bundle beside a darker fibre on it keeps its own body
        half_max = fibres.half_max_body_torch(tophat, self.half_max_radius_px, self.half_max_floor_od)
        # what survives an opening at nucleus size: dark objects too wide to be reticulin
        wide_dark = fibres.grey_opening_torch(dark_s, self.blob_radius_px)
        mean_od = fibres.gaussian_blur_torch(od.mean(dim=1, keepdim=True), self.smooth_px)
        # golden-orange (bone, collagen) absorbs blue, not red
        orange = fibres.gaussian_blur_torch(od[:, 2:3] - od[:, 0:1], self.smooth_px)
        return {
            "ridge_od": ridge[:, 0],
            "scale_idx": scale_idx[:, 0],
            "mean_od": mean_od[:, 0],
            "orange_od": orange[:, 0],
            "tophat_od": tophat[:, 0],
            "half_max": half_max[:, 0],
            "wide_dark_od": wide_dark[:, 0],
        }

