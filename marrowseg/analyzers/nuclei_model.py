"""A small learned nucleus-centre detector (optional; see ``he.nuclei.detector: unet``).

:class:`CentreNet` maps an RGB tile (0..255) at the analysis resolution (0.5 µm/px) to a
centre map in [0, 1]: Gaussian blobs (sigma ``TARGET_SIGMA_UM``) at nucleus centres. Peaks of
the map (:func:`centre_peaks`) are detections. Trained by ``scripts/train_nuclei.py`` on the
mbm-dev point annotations; the shipped weights live in ``marrowseg/analyzers/weights``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from skimage.feature import peak_local_max
from torch import nn

__all__ = ["CentreNet", "TARGET_SIGMA_UM", "TRAIN_MPP", "WEIGHTS_DIR", "load_centre_net", "load_mask_net",
           "centre_peaks"]

#: pixel size the net is trained at, µm/px
TRAIN_MPP = 0.5
#: sigma of the target blobs, µm
TARGET_SIGMA_UM = 1.0
#: packaged weights
WEIGHTS_DIR = Path(__file__).with_name("weights")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True),
    )


class CentreNet(nn.Module):
    """Three-level U-Net on RGB optical density; ``(B, 3, H, W)`` 0..255 -> ``(B, 1, H, W)`` in [0, 1].

    Parameters
    ----------
    base : int
        Channels at full resolution (x2, x4 below).

    Notes
    -----
    The input is converted to OD ``-log10(clamp(I, 1, 255) / 255)`` so that stain
    intensity is linear; H and W need not be multiples of 4 (the skips are cropped/padded).
    """

    def __init__(self, base: int = 8) -> None:
        super().__init__()
        self.base = base
        b = base
        self.enc1 = _block(3, b)
        self.enc2 = _block(b, 2 * b)
        self.mid = _block(2 * b, 4 * b)
        self.dec2 = _block(4 * b + 2 * b, 2 * b)
        self.dec1 = _block(2 * b + b, b)
        self.head = nn.Conv2d(b, 1, 1)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        if rgb.device.type == "cpu":
            # oneDNN's CPU convolutions of these few channels run ~1.8x faster channels-last
            # (a 2,048² tile: 8.1 -> 4.8 s on one thread); the output differs by ~2e-6
            rgb = rgb.contiguous(memory_format=torch.channels_last)
        od = torch.log10(rgb.float().clamp(1.0, 255.0)).neg_().add_(math.log10(255.0))
        e1 = self.enc1(od)
        e2 = self.enc2(F.max_pool2d(e1, 2, ceil_mode=True))
        m = self.mid(F.max_pool2d(e2, 2, ceil_mode=True))
        u2 = F.interpolate(m, size=e2.shape[-2:], mode="bilinear", align_corners=False)
        d2 = self.dec2(torch.cat([u2, e2], 1))
        u1 = F.interpolate(d2, size=e1.shape[-2:], mode="bilinear", align_corners=False)
        d1 = self.dec1(torch.cat([u1, e1], 1))
        return torch.sigmoid(self.head(d1))


def load_centre_net(path: str | Path | None = None) -> CentreNet:
    """A :class:`CentreNet` with weights from ``path`` (default: the packaged ``nuclei_unet.pt``).

    The file is a state dict saved with ``torch.save``, read with ``weights_only=True``;
    its ``base`` width is inferred from the first convolution.
    """
    return _load(path, "nuclei_unet.pt", "centre-net", "scripts/train_nuclei.py", "he.nuclei.unet_weights")


def load_mask_net(path: str | Path | None = None) -> CentreNet:
    """The nuclear-mask net (a :class:`CentreNet` whose output is the nuclear probability).

    Default: the packaged ``nuclear_mask_monuseg.pt``, trained on the 7 MoNuSeg tiles at
    0.5 µm/px by ``scripts/train_nuclear_mask.py`` (binary cross-entropy plus Dice against the
    nuclear polygons, borders between touching nuclei as background). Read with
    ``weights_only=True``.
    """
    return _load(path, "nuclear_mask_monuseg.pt", "mask-net", "scripts/train_nuclear_mask.py",
                 "he.nuclei.mask_net_weights")


def _load(path: str | Path | None, packaged: str, what: str, trainer: str, setting: str) -> CentreNet:
    p = Path(path) if path else WEIGHTS_DIR / packaged
    if not p.is_file():
        raise FileNotFoundError(f"{what} weights {p} not found: train them with {trainer} and set {setting}")
    state = torch.load(p, map_location="cpu", weights_only=True)
    net = CentreNet(base=int(state["enc1.0.weight"].shape[0]))
    net.load_state_dict(state)
    return net.eval()


def centre_peaks(centre_map: np.ndarray, mpp: float, *, min_score: float, min_distance_um: float,
                 allowed: np.ndarray | None = None) -> np.ndarray:
    """Local maxima of a centre map: (N, 2) int (row, col), shape (0, 2) if none.

    Parameters
    ----------
    centre_map : (H, W) float ndarray
        Output of :class:`CentreNet` for one tile, in [0, 1].
    mpp : float
        µm per pixel of the map.
    min_score : float
        A peak must reach this value.
    min_distance_um : float
        Two peaks are at least this far apart (Chebyshev, µm).
    allowed : (H, W) bool ndarray, optional
        Peaks outside it are dropped.
    """
    m = np.asarray(centre_map, np.float32)
    if m.ndim != 2:
        raise ValueError(f"centre_map: expected a (H, W) array, got shape {m.shape}")
    md = max(1, int(round(float(min_distance_um) / float(mpp))))
    lab = None if allowed is None else np.asarray(allowed).astype(np.uint8)
    if lab is not None and not lab.any():
        return np.zeros((0, 2), np.intp)
    pk = peak_local_max(m, min_distance=md, threshold_abs=float(min_score), labels=lab, exclude_border=False)
    return np.asarray(pk, np.intp).reshape(-1, 2)
