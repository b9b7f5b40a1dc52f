"""Per-stain analyzers behind one interface (:class:`~marrowseg.analyzers.base.Analyzer`)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from marrowseg.analyzers.base import Analyzer, LabelClass, TileContext, TileResult
from marrowseg.errors import ConfigError

if TYPE_CHECKING:
    from marrowseg.config import Config

__all__ = ["Analyzer", "LabelClass", "TileContext", "TileResult", "ANALYZERS", "available_stains", "get_analyzer"]

#: stain key -> "module:Class"; imported on demand so one analyzer's import cost is paid only when used
ANALYZERS = {
    "he": "marrowseg.analyzers.he:HEAnalyzer",
    "ecad": "marrowseg.analyzers.ecad:ECadAnalyzer",
    "reticulin": "marrowseg.analyzers.reticulin:ReticulinAnalyzer",
}


def get_analyzer(stain: str, config: Config) -> Analyzer:
    """Instantiate the analyzer of ``stain`` with its section of ``config``.

    Raises
    ------
    ConfigError
        Unknown stain.
    """
    try:
        target = ANALYZERS[stain]
    except KeyError:
        raise ConfigError(f"unknown stain {stain!r}; expected one of {', '.join(ANALYZERS)}") from None
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(config.stain_section(stain))


def available_stains() -> list[str]:
    """Stains whose analyzer module is importable in this installation."""
    ok = []
    for stain, target in ANALYZERS.items():
        try:
            importlib.import_module(target.split(":")[0])
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("marrowseg"):
                continue
            raise
        ok.append(stain)
    return ok
