"""One slide of a batch, as one task: lock, skip if complete, else analyse into a staging folder.

The task runs the same way in the batch process (serial) and on a Dask worker: it takes a
:class:`~marrowseg.batch_plan.SlideJob` and :class:`BatchSettings` (both picklable), writes
only under ``OUT_DIR`` and returns a summary row (a plain dict).

Crash safety. A slide is analysed into ``OUT_DIR/.<id>.partial-<host>-<pid>/``; the extra
outputs (OME-Zarr, GeoJSON, thumbnail) are added there, ``metrics.json`` is rewritten last
with the batch record, and only then is the folder renamed to ``OUT_DIR/<id>/``. A process
killed at any moment leaves either the old complete folder or none, plus a staging folder
that the next run removes (under the slide's lock) before redoing the slide.

Concurrency. Each slide has a lock file ``OUT_DIR/.locks/<id>.lock`` held with ``flock``
while the slide is checked and analysed; the kernel drops the lock when the holder exits,
however it exits (SIGKILL included), so there are no stale locks to detect. The file records
the holder's pid and host for people looking at a stuck run.
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import socket
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marrowseg.batch_plan import SlideJob
from marrowseg.errors import MarrowsegError
from marrowseg.io.files import files_sha256, files_stamp, slide_files
from marrowseg.outputs.metrics import stain_hue, stain_mismatch

__all__ = ["BatchSettings", "UnknownStainError", "slide_lock", "completed_metrics", "process_slide",
           "BATCH_OUTPUTS"]

log = logging.getLogger(__name__)

#: outputs the batch adds to what analyze_slide writes
BATCH_OUTPUTS = ("masks.ome.zarr", "cells.geojson", "regions.geojson", "overlay_thumb.png")
_THUMB_PX = 512
_REGIONS_MAX_SIDE_PX = 4096


class UnknownStainError(MarrowsegError, ValueError):
    """Automatic recognition could not tell the stain with enough confidence."""


@dataclass(frozen=True)
class BatchSettings:
    """What every slide task needs besides its job.

    Attributes
    ----------
    out_dir : Path
        Absolute output folder (shared storage when workers run on other machines).
    configs : dict
        Resolved :class:`~marrowseg.config.Config` of each available stain.
    hashes : dict
        ``config_hash`` of each of them: a slide is redone when its hash changes.
    min_confidence, thumbnail_px :
        Automatic stain recognition settings.
    command : tuple of str
        The batch command line, recorded in every metrics.json.
    """

    out_dir: Path
    configs: dict[str, Any]
    hashes: dict[str, str]
    min_confidence: float = 0.25
    thumbnail_px: int = 1024
    command: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- locking
@contextmanager
def slide_lock(out_dir: Path, slide_id: str, *, wait: bool = True, poll_s: float = 0.5) -> Iterator[bool]:
    """Hold the slide's lock; yields False at once (without it) when busy and ``wait`` is False."""
    lock_dir = Path(out_dir) / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{slide_id}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} host {socket.gethostname()} since {time.time():.0f}\n".encode())
        yield True
    finally:
        os.close(fd)  # releases the flock


# ----------------------------------------------------------------------------- completeness
def _input_record(path: Path) -> dict[str, int]:
    """Size (bytes, summed) and newest mtime (ns) of the files the slide is made of."""
    stamp = files_stamp(slide_files(path))
    return {"size_bytes": sum(s for _, s, _ in stamp), "mtime_ns": max((m for _, _, m in stamp), default=0)}


def _sha256(path: Path) -> str:
    """The slide's SHA-256 as its reader records it in metrics.json (every file of a DICOM folder)."""
    return files_sha256(slide_files(path))


def completed_metrics(job: SlideJob, settings: BatchSettings) -> dict[str, Any] | None:
    """The slide's metrics.json if its outputs are complete and current, else None.

    Current means: written by a batch, same stain (or recognised automatically when the
    job asks for recognition), same config hash, same age/mpp/manifest row, same input
    (size and mtime, or the same SHA-256 when only the mtime moved), every listed output present.
    """
    final = settings.out_dir / job.slide_id
    try:
        doc = json.loads((final / "metrics.json").read_text(encoding="utf-8"))
        b = doc["batch"]
        stain = b["stain"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if job.stain is not None and stain != job.stain:
        return None
    if job.stain is None and b.get("stain_source") != "auto":
        return None
    if settings.hashes.get(stain) != b.get("config_hash"):
        return None
    if b.get("age") != job.age or b.get("mpp") != job.mpp or b.get("manifest") != job.manifest:
        return None
    try:
        now = _input_record(job.path)
    except OSError:
        return None
    old = b.get("input") or {}
    if old.get("size_bytes") != now["size_bytes"]:
        return None
    if old.get("mtime_ns") != now["mtime_ns"] and _sha256(job.path) != (doc.get("slide") or {}).get("sha256"):
        return None
    if not all((final / name).exists() for name in doc.get("outputs", ())):
        return None
    return doc


# ----------------------------------------------------------------------------- the task
class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")
        except Exception:  # noqa: BLE001 - a bad log call must not fail the slide
            self.lines.append(f"{record.levelname} {record.name}: {record.msg!r}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _row(job: SlideJob, **kw: Any) -> dict[str, Any]:
    row = {"slide": job.rel, "slide_id": job.slide_id, "stain": job.stain or "", "stain_source": job.stain_source,
           "stain_confidence": 1.0 if job.stain else None, "status": "failed", "reason": "", "readouts": {},
           "tiles_missing": None, "stain_looks_like": "", "stain_hue_deg": None, "out_of_focus_frac": None,
           "crush_share": None, "mpp": None, "width": None, "height": None, "megapixels": 0.0, "config_hash": "", "seconds": None,
           "ran": False, "manifest": dict(job.manifest), "warnings": []}
    row.update(kw)
    return row


def _row_from_metrics(job: SlideJob, doc: dict[str, Any], *, ran: bool) -> dict[str, Any]:
    b, sl = doc["batch"], doc.get("slide") or {}
    w, h = sl.get("width"), sl.get("height")
    # what a reviewer of summary.csv must see beside the readouts: part of the slide unread or
    # blurred or crushed, or colours that name another stain than the one analysed (engine.plan_slide),
    # and how far an H&E slide's hue lies from the one its nuclear thresholds were set on
    other = stain_mismatch(doc)
    tiles = doc.get("tiles") or {}
    return _row(job, stain=b["stain"], stain_source=b["stain_source"], stain_confidence=b["stain_confidence"],
                status="ok", readouts=doc.get("readouts", {}), mpp=sl.get("mpp"), width=w, height=h,
                megapixels=(w * h / 1e6) if w and h else 0.0, config_hash=b["config_hash"],
                seconds=b.get("seconds"), ran=ran, tiles_missing=tiles.get("missing"),
                stain_looks_like=other["looks_like"] if other else "", stain_hue_deg=stain_hue(doc),
                out_of_focus_frac=tiles.get("out_of_focus_frac"),
                crush_share=((doc.get("measurements") or {}).get("crush") or {}).get("share_of_marrow"))


def _clean_staging(out_dir: Path, slide_id: str) -> None:
    for p in out_dir.glob(f".{slide_id}.partial-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out_dir.glob(f".{slide_id}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _engine_config(config: Any) -> Any:
    """Daemonic processes (Dask workers) may not start DataLoader workers: decode in-process."""
    if multiprocessing.current_process().daemon and config.engine.workers != 0:
        return config.model_copy(update={"engine": config.engine.model_copy(update={"workers": 0})})
    return config


def _write_extras(stage: Path, stain: str, config: Any, metrics: dict[str, Any], rel: str) -> None:
    import cv2
    import numpy as np
    import zarr

    from marrowseg.analyzers import get_analyzer
    from marrowseg.outputs.geojson import write_cells_geojson, write_regions_geojson
    from marrowseg.outputs.images import write_png
    from marrowseg.outputs.ome_zarr import read_level, write_ome_zarr

    analyzer = get_analyzer(stain, config)
    level0_mpp = float(metrics["slide"]["mpp"])
    map_mpp = float(metrics["tiles"]["map_mpp"])
    labels = stage / "labels.zarr"
    has_maps = labels.exists() and any(True for _ in zarr.open_group(store=str(labels), mode="r").arrays())
    if has_maps:
        masks = write_ome_zarr(labels, stage / "masks.ome.zarr", mpp=map_mpp, label_classes=analyzer.label_classes,
                               primary=analyzer.map_names[0], chunk_px=config.output.zarr_chunk_px,
                               extra_attrs={"level0_mpp": level0_mpp, "slide": rel, "stain": stain})
        lab, lmpp = read_level(masks, max_side_px=_REGIONS_MAX_SIDE_PX)
        write_regions_geojson(lab, stage / "regions.geojson", analyzer.label_classes, scale_px=lmpp / level0_mpp,
                              area_um2_per_px=lmpp * lmpp)
    else:
        write_regions_geojson(np.zeros((1, 1), np.uint8), stage / "regions.geojson",
                              analyzer.label_classes, scale_px=1.0)
    if (stage / "cells.csv").exists():
        write_cells_geojson(stage / "cells.csv", stage / "cells.geojson", analyzer.cell_classes)
    ov = cv2.imread(str(stage / "overlay.png"), cv2.IMREAD_COLOR)
    if ov is not None:
        f = min(1.0, _THUMB_PX / max(ov.shape[:2]))
        small = cv2.resize(ov, (max(1, round(ov.shape[1] * f)), max(1, round(ov.shape[0] * f))),
                           interpolation=cv2.INTER_AREA)
        write_png(stage / "overlay_thumb.png", cv2.cvtColor(small, cv2.COLOR_BGR2RGB))


def _analyse(job: SlideJob, settings: BatchSettings) -> dict[str, Any]:
    from marrowseg.io import open_slide
    from marrowseg.outputs.atomic import atomic_write_json, replace_dir
    from marrowseg.pipeline import analyze_slide
    from marrowseg.stain_id import identify_slide

    t0 = time.perf_counter()
    out_dir = settings.out_dir
    stain, source, conf = job.stain, job.stain_source, 1.0
    if stain is None:
        with open_slide(job.path, mpp=job.mpp) as reader:
            try:
                guess = identify_slide(reader, thumbnail_px=settings.thumbnail_px,
                                       min_confidence=settings.min_confidence)
            except MarrowsegError as exc:
                raise type(exc)(f"{job.path}: {exc}") from None
        conf = round(guess.confidence, 3)
        if guess.stain is None:
            scores = ", ".join(f"{k} {v:.2f}" for k, v in guess.scores.items())
            raise UnknownStainError(f"{job.path}: unknown stain (colour scores {scores}; confidence {conf:.2f} "
                                    f"< {settings.min_confidence}); name it in a manifest or the file name")
        stain = guess.stain
    if stain not in settings.configs:
        raise MarrowsegError(f"{job.path}: no {stain} analyzer in this installation")
    config = _engine_config(settings.configs[stain])
    stage = out_dir / f".{job.slide_id}.partial-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        extra = {"manifest": dict(job.manifest)} if job.manifest else None
        metrics, _ = analyze_slide(job.path, stain, stage, mpp=job.mpp, age=job.age, config=config,
                                   extra=extra, command=list(settings.command))
        _write_extras(stage, stain, config, metrics, job.rel)
        seconds = round(time.perf_counter() - t0, 3)
        metrics["batch"] = {
            "slide": job.rel, "slide_id": job.slide_id, "stain": stain, "stain_source": source,
            "stain_confidence": conf, "config_hash": settings.hashes[stain], "input": _input_record(job.path),
            "age": job.age, "mpp": job.mpp, "manifest": dict(job.manifest), "seconds": seconds,
        }
        names = sorted(p.name for p in stage.iterdir() if not p.name.startswith(".") and p.name != "metrics.json")
        metrics["outputs"] = [*names, "metrics.json"]
        atomic_write_json(stage / "metrics.json", metrics)  # last write inside the slide folder
        replace_dir(stage, out_dir / job.slide_id)  # the slide appears complete, or not at all
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return metrics


def process_slide(job: SlideJob, settings: BatchSettings, wait: bool = True) -> dict[str, Any]:
    """Analyse one slide of a batch unless its outputs are complete; never raises for a bad slide.

    Parameters
    ----------
    job : SlideJob
    settings : BatchSettings
    wait : bool
        Wait for the slide's lock when another process holds it; if False, return at once
        with ``status='busy'``.

    Returns
    -------
    row : dict
        ``slide, slide_id, stain, stain_source, stain_confidence, status ('ok' | 'failed' |
        'busy'), reason, readouts, tiles_missing, stain_looks_like (another stain the colours
        name confidently, else ''), stain_hue_deg (H&E: degrees from the development stain, see
        ``he.stain.reference_angle_deg``), out_of_focus_frac (share of the judged tissue), crush_share (H&E and
        E-cadherin: share of the marrow space left out as crush artefact), mpp, width, height, megapixels, config_hash, seconds, ran
        (analysed by this call), manifest, warnings`` (log lines of level WARNING and up).
    """
    if job.error:
        return _row(job, reason=job.error)
    with slide_lock(settings.out_dir, job.slide_id, wait=wait) as held:
        if not held:
            return _row(job, status="busy")
        done = completed_metrics(job, settings)
        if done is not None:
            return _row_from_metrics(job, done, ran=False)
        _clean_staging(settings.out_dir, job.slide_id)
        cap = _Capture()
        pkg = logging.getLogger("marrowseg")
        pkg.addHandler(cap)
        t0 = time.perf_counter()
        try:
            doc = _analyse(job, settings)
            row = _row_from_metrics(job, doc, ran=True)
        except MarrowsegError as exc:
            row = _row(job, reason=_one_line(exc), seconds=round(time.perf_counter() - t0, 3), ran=True)
        except Exception as exc:  # noqa: BLE001 - a bug on one slide must not stop the cohort
            cap.lines.append("ERROR traceback: " + traceback.format_exc())
            row = _row(job, reason=_one_line(f"internal error: {type(exc).__name__}: {exc}"),
                       seconds=round(time.perf_counter() - t0, 3), ran=True)
        finally:
            pkg.removeHandler(cap)
        row["warnings"] = cap.lines
        return row
