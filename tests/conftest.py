"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

SHARED_DATA_DIR = Path(__file__).parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Callable[[str], Path]:
    """Return ``get(relative_path) -> Path`` into ``../shared/data``; skips when absent.

    Example: ``shared_data("wsi/CMU-1-Small-Region.svs")``.
    """

    def get(relative_path: str) -> Path:
        path = SHARED_DATA_DIR / relative_path
        if not path.exists():
            pytest.skip(f"real data {path} is absent (optional; tests skip without it)")
        return path

    return get
