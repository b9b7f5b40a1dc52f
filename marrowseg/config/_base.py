from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Frozen model that rejects unknown keys (a typo in YAML must not pass silently)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
