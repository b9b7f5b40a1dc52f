"""Readout statistics and verdicts: the left-shift ratio's Wilson interval, reference ranges, the cluster note."""

from __future__ import annotations

import math
from typing import Any

from marrowseg.config.ecad import ECadConfig, ReferenceRange

__all__ = ["wilson_interval", "fraction_range"]


_Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(k: int, n: int, *, z: float = _Z95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion ``k / n``.

    Returns
    -------
    (low, high) or None
        None when ``n == 0``.

    References
    ----------
    Wilson E.B. "Probable inference, the law of succession, and statistical inference."
    J Am Stat Assoc 22(158):209-212, 1927.
    """
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    den = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / den
    # exact ends at k = 0 and k = n (rounding would otherwise leave p just outside)
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def _range_verdict(value: float | None, low: float | None, high: float | None) -> str | None:
    if value is None:
        return None
    if low is not None and value < low:
        return "below expected range"
    if high is not None and value > high:
        return "above expected range"
    return "within expected range"


def _cluster_note(cfg: ECadConfig) -> str:
    """How the clusters were counted, in words, for the interpretation."""
    c = cfg.clusters
    sheet = (f"positive cells that are at least {c.min_positive_fraction:g} of the nucleated cells within "
             f"{c.neighbourhood_um:g} µm, " if c.neighbourhood_um is not None else "positive cells, ")
    exact = cfg.halo_um - c.link_um - (c.neighbourhood_um or 0.0)
    return (f"clusters of {sheet}linked within {c.link_um:g} µm, extent > {c.min_extent_um:g} µm; "
            f"exact up to an extent of about {exact:g} µm")


def fraction_range(pct: ReferenceRange) -> dict[str, Any]:
    """A reference range given in percent of erythroid precursors, as a fraction (like the left-shift ratio).

    Returns
    -------
    dict
        ``low``, ``high`` (fractions 0-1, None where the reference gives none), ``unit`` and ``source``.
    """
    def frac(v: float | None) -> float | None:
        return None if v is None else float(v) / 100.0

    return {"low": frac(pct.low), "high": frac(pct.high), "unit": "fraction of erythroid precursors",
            "source": pct.source}
