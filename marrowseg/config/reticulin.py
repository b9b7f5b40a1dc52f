"""Settings of the reticulin analyzer (values live in ``configs/reticulin.yaml``)."""

from __future__ import annotations

from pydantic import Field

from marrowseg.config._base import Strict


class ReticulinConfig(Strict):
    mpp: float = Field(gt=0, description="analysis resolution, µm/px")
    halo_um: float = Field(ge=0, description="context needed around each tile core, µm")
