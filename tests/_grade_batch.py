"""A small batch output shared by the grade, report, review and notebook tests (built once per run).

Three 512 px phantoms at 0.5 µm/px (one per stain) analysed with
:func:`marrowseg.pipeline.analyze_slide` into the batch layout (``OUT/<id>/`` with the manifest
row in ``metrics.json``, ``summary.csv``, ``failures.csv`` with one failed slide); the three good
slides form one biopsy. ``windows.csv`` is written from each result's window sums.
Built once per pytest process in a temporary folder (removed at exit), since an analysis of
each stain costs seconds on a shared CPU.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

SIZE_PX = (512, 512)
MPP = 0.5
SLIDES = (
    ("p1_he", "he", {"cellularity_pct": 55.0}),
    ("p1_ecad", "ecad", {"left_shift_ratio": 0.3}),
    ("p1_ret", "reticulin", {"grade": 2}),
)


@functools.cache
def batch_dir() -> Path:
    """``OUT`` of the shared batch: ``OUT/<id>/`` (with ``windows.csv``), ``summary.csv``, ``failures.csv``."""
    from marrowseg.pipeline import analyze_slide
    from marrowseg.report.slides import write_windows_csv
    from marrowseg.synth import write_phantom

    root = Path(tempfile.mkdtemp(prefix="marrowseg-gradetest-"))
    atexit.register(shutil.rmtree, root, True)
    slides, out = root / "slides", root / "out"
    summary = ["slide_id,stain,status,reason,patient,biopsy_date"]
    for name, stain, kw in SLIDES:
        tiff, _ = write_phantom(slides, stain, name=name, size_px=SIZE_PX, mpp=MPP, seed=1001, **kw)
        manifest = {"slide": tiff.name, "stain": stain, "age": "45", "patient": "P001", "biopsy_date": "2024-03-01"}
        _, result = analyze_slide(tiff, stain, out / name, age=45, extra={"manifest": manifest})
        write_windows_csv(out / name, result)
        summary.append(f"{name},{stain},ok,,P001,2024-03-01")
    summary.append("p2_broken,he,failed,p2_broken.tiff: not a recognised slide or image,P002,2024-04-02")
    (out / "summary.csv").write_text("\n".join(summary) + "\n")
    (out / "failures.csv").write_text("slide,slide_id,stain,reason\n"
                                      "p2_broken.tiff,p2_broken,he,p2_broken.tiff: not a recognised slide or image\n")
    return out
