"""``marrowseg demo``: sample slides of each stain, analysed, next to their exact truth."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from marrowseg.analyzers import available_stains

__all__ = ["DEMO_SLIDES", "write_demo_slides", "run_demo"]

log = logging.getLogger(__name__)

#: (stem, stain, phantom parameters): one realistic case per stain.
DEMO_SLIDES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("demo_he", "he", {"seed": 7, "cellularity_pct": 55.0}),
    ("demo_ecad", "ecad", {"seed": 7, "left_shift_ratio": 0.3}),
    ("demo_reticulin", "reticulin", {"seed": 7, "grade": 2}),
)

#: readouts shown next to their truth in the demo table
_SHOWN = {
    "he": ("cellularity_pct", "bone_area_frac", "nucleated_cells"),
    "ecad": ("ecad_pos_per_100_nucleated", "left_shift_ratio"),
    "reticulin": ("fibre_length_um_per_1e4um2", "intersections_per_mm2", "mf_grade"),
}


def write_demo_slides(slide_dir: str | Path, *, size_px: int = 4096, mpp: float = 0.25) -> list[tuple[Path, str]]:
    """Write the demo phantoms (skipping ones already there); returns (path, stain) pairs."""
    from marrowseg.synth import write_phantom

    slide_dir = Path(slide_dir)
    slide_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for stem, stain, params in DEMO_SLIDES:
        tiff = slide_dir / f"{stem}.tiff"
        if not (tiff.exists() and (slide_dir / f"{stem}.truth.json").exists()):
            write_phantom(slide_dir, stain, name=stem, size_px=(size_px, size_px), mpp=mpp, **params)
        out.append((tiff, stain))
    return out


def run_demo(out_dir: str | Path, *, size_px: int = 4096, progress: bool = True,
             console: Any = None) -> list[dict[str, Any]]:
    """Write the sample slides under ``OUT/slides`` and analyse them as a batch into ``OUT``.

    The output folder has the batch layout: ``OUT/<slide-id>/`` per slide (``demo_he`` ...),
    ``OUT/summary.csv``, ``OUT/failures.csv`` and ``OUT/marrowseg-batch.log``. A rerun reuses
    the slides and skips complete analyses.

    Returns
    -------
    list of dict
        One row per shown readout: slide, stain, readout, measured, truth.
    """
    from marrowseg.batch import run_batch

    out_dir = Path(out_dir)
    slides = write_demo_slides(out_dir / "slides", size_px=size_px)
    stains = available_stains()
    wanted = []
    for tiff, stain in slides:
        if stain not in stains:
            log.warning("demo: no %s analyzer in this installation; slide written, not analysed", stain)
            continue
        wanted.append(tiff)

    def report(state: dict[str, Any]) -> None:
        if console is not None and progress:
            console.print(f"analysed {state['slide']} ({state['done'] + state['failed']}/{state['total']})")

    res = run_batch(out_dir / "slides", out_dir, only=wanted, progress=report, command=["marrowseg", "demo"])
    rows = []
    for r in res.rows:
        if r["status"] != "ok":
            log.warning("demo: %s failed: %s", r["slide"], r["reason"])
            continue
        tiff = out_dir / "slides" / r["slide"]
        truth = json.loads(tiff.with_suffix(".truth.json").read_text())["readouts"]
        for key in _SHOWN.get(r["stain"], ()):
            rows.append({"slide": r["slide_id"], "stain": r["stain"], "readout": key,
                         "measured": r["readouts"].get(key), "truth": truth.get(key)})
    return rows
