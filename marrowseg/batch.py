"""``marrowseg batch``: a folder of slides in, one folder per slide plus cohort tables out.

Output layout::

    OUT_DIR/
        <slide-id>/               everything analyze_slide writes, plus masks.ome.zarr,
                                  cells.geojson, regions.geojson, overlay_thumb.png
        summary.csv               one row per slide: stain and its source, status, readouts
        failures.csv              slide, slide_id, stain, reason
        marrowseg-batch.log       one line per slide and the warnings it raised
        .locks/                   per-slide lock files (flock)

Slides run one after another in this process, on a local Dask cluster (``cluster='local'``)
or on an existing Dask scheduler (``cluster='tcp://host:8786'``): one task per slide, the
workers write the slide folders (so OUT_DIR must be shared storage, same path everywhere),
the client collects the summary rows. Reruns skip complete slides (see
:func:`marrowseg.batch_slide.completed_metrics`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marrowseg.batch_plan import SlideJob, load_stain_rules, manifest_columns, plan_jobs
from marrowseg.batch_slide import BatchSettings, process_slide
from marrowseg.errors import ConfigError
from marrowseg.outputs.atomic import atomic_write_text
from marrowseg.outputs.tables import rows_to_csv

__all__ = ["BatchResult", "run_batch", "build_settings", "summary_rows", "write_tables", "EXIT_FAILURES"]

log = logging.getLogger(__name__)

#: exit code of a batch that finished with failed slides
EXIT_FAILURES = 3
_FIRST = ("slide", "slide_id", "stain", "stain_source", "stain_confidence", "status", "reason")
_LAST = ("tiles_missing", "stain_looks_like", "stain_hue_deg", "out_of_focus_frac", "crush_share", "mpp", "width", "height", "megapixels", "config_hash", "seconds")


@dataclass
class BatchResult:
    """Rows of a finished batch (sorted by slide path) and where the tables went."""

    out_dir: Path
    rows: list[dict[str, Any]]
    summary_csv: Path
    failures_csv: Path
    seconds: float

    @property
    def n_ok(self) -> int:
        return sum(r["status"] == "ok" for r in self.rows)

    @property
    def n_failed(self) -> int:
        return sum(r["status"] != "ok" for r in self.rows)

    @property
    def n_ran(self) -> int:
        return sum(bool(r["ran"]) for r in self.rows)

    @property
    def exit_code(self) -> int:
        return EXIT_FAILURES if self.n_failed else 0


class _BatchLog:
    """Appends timestamped lines to ``OUT_DIR/marrowseg-batch.log`` (line-buffered)."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "a", encoding="utf-8", buffering=1)

    def __call__(self, msg: str) -> None:
        stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        self.fh.write(f"{stamp} {msg}\n")

    def close(self) -> None:
        self.fh.close()


def build_settings(out_dir: Path, *, config: str | Path | None = None, sets: Sequence[str] = (),
                   device: str | None = None, min_confidence: float = 0.25, thumbnail_px: int = 1024,
                   command: Sequence[str] = ()) -> BatchSettings:
    """Resolve the config of every available stain once (a bad ``--set`` fails here, not per slide)."""
    from marrowseg.analyzers import available_stains
    from marrowseg.config import config_hash, load_config

    overrides = [*sets, *([f"engine.device={device}"] if device else [])]
    configs = {s: load_config(s, path=config, overrides=overrides) for s in available_stains()}
    return BatchSettings(out_dir=out_dir, configs=configs, hashes={s: config_hash(c) for s, c in configs.items()},
                         min_confidence=min_confidence, thumbnail_px=thumbnail_px, command=tuple(command))


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _flatten(f"{prefix}.{i}", v, out)
    else:
        out[prefix] = "" if value is None else value


def summary_rows(rows: list[dict[str, Any]], manifest_cols: Sequence[str] = ()) -> tuple[list[dict[str, Any]], list[str]]:
    """Flat summary.csv rows (readouts flattened with dots) and the column order."""
    flat_rows, readout_cols = [], []
    taken = set(_FIRST) | set(_LAST)
    for r in rows:
        flat: dict[str, Any] = {k: ("" if r.get(k) is None else r.get(k)) for k in (*_FIRST, *_LAST)}
        ro: dict[str, Any] = {}
        _flatten("", r.get("readouts") or {}, ro)
        for k in ro:
            if k not in readout_cols:
                readout_cols.append(k)
        flat.update(ro)
        for k in manifest_cols:
            col = f"manifest_{k}" if k in taken or k in ro else k
            flat[col] = (r.get("manifest") or {}).get(k, "")
        flat_rows.append(flat)
    mcols = [f"manifest_{k}" if k in taken or k in readout_cols else k for k in manifest_cols]
    return flat_rows, [*_FIRST, *readout_cols, *_LAST, *mcols]


def write_tables(out_dir: Path, rows: list[dict[str, Any]], manifest_cols: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``failures.csv`` (atomically) from batch rows."""
    flat, cols = summary_rows(rows, manifest_cols)
    summary = atomic_write_text(out_dir / "summary.csv", rows_to_csv(flat, first=cols))
    fails = [{"slide": r["slide"], "slide_id": r["slide_id"], "stain": r["stain"], "reason": r["reason"]}
             for r in rows if r["status"] != "ok"]
    failures = atomic_write_text(out_dir / "failures.csv",
                                 rows_to_csv(fails, first=("slide", "slide_id", "stain", "reason")))
    return summary, failures


def _run_serial(jobs: list[SlideJob], settings: BatchSettings, record: Callable[[dict[str, Any]], None]) -> None:
    deferred = []
    for job in jobs:
        row = process_slide(job, settings, wait=False)
        if row["status"] == "busy":  # another batch holds it: come back when the rest is done
            deferred.append(job)
        else:
            record(row)
    for job in deferred:
        record(process_slide(job, settings, wait=True))


def _run_dask(jobs: list[SlideJob], settings: BatchSettings, record: Callable[[dict[str, Any]], None],
              cluster: str, workers: int) -> None:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:  # pragma: no cover - distributed is a dependency
        raise ConfigError("--cluster needs dask.distributed (pip install 'dask[distributed]')") from None
    local = None
    # distributed sets its own loggers to INFO; keep the client's stderr for warnings and up.
    dlog = logging.getLogger("distributed")
    dlog_level = dlog.level
    if not log.isEnabledFor(logging.DEBUG):
        dlog.setLevel(logging.WARNING)
    if cluster == "local":
        local = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,
                             dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(local)
    elif cluster.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        try:
            client = Client(cluster, timeout="30s")
        except OSError as exc:
            raise ConfigError(f"--cluster {cluster}: cannot reach the scheduler ({exc})") from None
    else:
        raise ConfigError(f"--cluster {cluster!r}: expected 'local' or a scheduler address like tcp://host:8786")
    try:
        futures = {client.submit(process_slide, job, settings, True, key=f"marrowseg-slide-{job.slide_id}-{time.time_ns()}",
                                 pure=False): job for job in jobs}
        for fut in as_completed(futures):
            job = futures[fut]
            try:
                row = fut.result()
            except Exception as exc:  # noqa: BLE001 - a worker died (killed, out of memory)
                from marrowseg.batch_slide import _row

                row = _row(job, reason=f"worker failed: {type(exc).__name__}: {' '.join(str(exc).split())}", ran=True)
            record(row)
    finally:
        client.close()
        if local is not None:
            local.close()
        dlog.setLevel(dlog_level)


def run_batch(
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    stain: str = "auto",
    manifest: str | Path | None = None,
    pattern: str | None = None,
    workers: int = 1,
    cluster: str | None = None,
    config: str | Path | None = None,
    sets: Sequence[str] = (),
    device: str | None = None,
    mpp: float | None = None,
    stain_rules: str | Path | None = None,
    only: list[str | Path] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    command: Sequence[str] = (),
) -> BatchResult:
    """Analyse every slide under ``in_dir`` into ``out_dir``; bad slides become failure rows.

    Parameters
    ----------
    in_dir, out_dir : path-like
        Input folder (searched recursively) and output folder (created).
    stain : {'auto', 'he', 'ecad', 'reticulin'}
        'auto': manifest, then filename rules, then colour recognition, per slide.
    manifest : path-like, optional
        CSV with ``slide,stain,age,patient,biopsy_date`` (+ any columns, + optional ``mpp``).
    pattern : str, optional
        Glob on the relative path, e.g. ``*.svs``.
    workers : int
        Worker processes of a local cluster; more than 1 without ``cluster`` means ``'local'``.
    cluster : str, optional
        None (serial), ``'local'`` or a scheduler address (``tcp://host:8786``).
    config, sets, device :
        Analysis config file, ``KEY=VALUE`` overrides and engine device, as for ``analyze``.
    mpp : float, optional
        Pixel size for slides whose files carry none (PNG/JPEG), µm/px.
    stain_rules : path-like, optional
        Alternative to ``configs/stain_rules.yaml``.
    only : list of path-like, optional
        Restrict the batch to these files.
    progress : callable, optional
        Called after each slide with ``{done, failed, remaining, total, mpx_per_s, slide}``.
    command : sequence of str
        Recorded in every metrics.json.

    Returns
    -------
    BatchResult

    Raises
    ------
    ConfigError
        Bad folder, manifest, rules, config or cluster address (nothing is analysed).
    """
    t_start = time.perf_counter()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rules = load_stain_rules(stain_rules)
    jobs = plan_jobs(in_dir, out, stain=stain, manifest=manifest, pattern=pattern, rules=rules, mpp=mpp, only=only)
    settings = build_settings(out, config=config, sets=sets, device=device, min_confidence=rules.min_confidence,
                              thumbnail_px=rules.thumbnail_px, command=command)
    if workers > 1 and cluster is None:
        cluster = "local"
    blog = _BatchLog(out / "marrowseg-batch.log")
    blog(f"start: {len(jobs)} slides from {Path(in_dir).resolve()} -> {out}; stain {stain}; "
         f"{'serial' if cluster is None else f'cluster {cluster} ({workers} workers)'}; "
         f"config hashes {settings.hashes}")
    rows: list[dict[str, Any]] = []
    state = {"done": 0, "failed": 0, "remaining": len(jobs), "total": len(jobs), "mpx_per_s": 0.0, "slide": ""}
    mpx_done = 0.0

    def record(row: dict[str, Any]) -> None:
        nonlocal mpx_done
        rows.append(row)
        ok = row["status"] == "ok"
        what = ("done" if row["ran"] else "complete, skipped") if ok else f"FAILED: {row['reason']}"
        secs = f" {row['seconds']:.1f} s" if row["ran"] and row.get("seconds") is not None else ""
        blog(f"{row['slide_id']} [{row['stain'] or '?'} via {row['stain_source']}] {what}{secs}")
        for line in row.get("warnings", ()):
            blog(f"  {row['slide_id']}: {line}")
        if ok and row["ran"]:
            mpx_done += row["megapixels"]
        state["done" if ok else "failed"] += 1
        state["remaining"] -= 1
        state["slide"] = row["slide_id"]
        state["mpx_per_s"] = mpx_done / max(time.perf_counter() - t_start, 1e-9)
        if progress is not None:
            progress(dict(state))

    try:
        if not jobs:
            blog(f"no slides found under {in_dir}")
        elif cluster is None:
            _run_serial(jobs, settings, record)
        else:
            _run_dask(jobs, settings, record, cluster, workers)
        rows.sort(key=lambda r: r["slide"])
        summary, failures = write_tables(out, rows, manifest_columns(jobs))
        seconds = time.perf_counter() - t_start
        res = BatchResult(out_dir=out, rows=rows, summary_csv=summary, failures_csv=failures, seconds=seconds)
        blog(f"end: {res.n_ok} ok, {res.n_failed} failed, {res.n_ran} slides run now, {seconds:.1f} s")
    finally:
        blog.close()
    return res
