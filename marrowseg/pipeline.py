"""One slide, one stain, one output folder: what ``marrowseg analyze`` runs.

Output folder contract (pinned by ``tests/test_outputs_contract.py``):

``metrics.json``
    readouts, areas, counts, provenance; written last, so its presence means complete.
``cells.csv``
    one row per detected cell: ``x, y`` (level-0 pixels of the input), ``x_um, y_um``,
    ``tile``, ``class`` and the measurements behind the class.
``tiles.csv``
    per-tile additive statistics over each tile's core.
``windows.csv``
    for analyzers with slide-aligned windows (reticulin local grades): per-window sums.
``labels.zarr``
    the analyzer's maps (``labels`` first) at ``map_mpp``.
``labels.png``, ``overlay.png``
    for inputs of at most ``output.small_image_px`` a side: the label map at the input's
    resolution (values: the analyzer's label classes) and an overlay; larger inputs get a
    thumbnail-sized ``overlay.png`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from marrowseg.analyzers import get_analyzer
from marrowseg.config import Config, load_config
from marrowseg.engine import SlideResult, run_slide
from marrowseg.io import open_slide
from marrowseg.outputs.atomic import atomic_write_json
from marrowseg.outputs.images import overlay, write_png
from marrowseg.outputs.metrics import build_metrics
from marrowseg.outputs.sink import FileSink
from marrowseg.outputs.tables import write_rows_csv, write_windows_csv

__all__ = ["analyze_slide"]

log = logging.getLogger(__name__)


def analyze_slide(
    source: str | Path,
    stain: str,
    out_dir: str | Path,
    *,
    mpp: float | None = None,
    age: float | None = None,
    config: Config | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    extra: dict[str, Any] | None = None,
    command: list[str] | None = None,
) -> tuple[dict[str, Any], SlideResult]:
    """Analyse one slide and write its output folder.

    Parameters
    ----------
    source : path-like
        Slide or image file.
    stain : {'he', 'ecad', 'reticulin'}
    out_dir : path-like
        Output folder (created).
    mpp : float, optional
        Pixel size override, µm/px.
    age : float, optional
        Patient age, years.
    config : Config, optional
        Defaults to the packaged config of ``stain``.
    progress : callable, optional
        See :func:`marrowseg.engine.run_slide`.
    extra : dict, optional
        Added to ``metrics.json`` (e.g. manifest columns).

    Returns
    -------
    metrics : dict
        The document written to ``metrics.json``.
    result : SlideResult
    """
    config = config or load_config(stain)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(source, mpp=mpp) as reader:
        analyzer = get_analyzer(stain, config)
        small = max(reader.shape) <= config.output.small_image_px
        sink = FileSink(out, chunk_px=config.output.zarr_chunk_px,
                        keep_in_memory_px=10**9 if small else 0)
        try:
            result = run_slide(reader, analyzer, config, sink=sink, age=age, progress=progress)
            write_rows_csv(out / "tiles.csv", result.tiles, first=("tile", "status"))
            write_windows_csv(out, result.windows)
            for name, content in analyzer.window_outputs(result.windows).items():
                if name.endswith(".png"):
                    write_png(out / name, content)
                else:
                    write_rows_csv(out / name, content, first=("win_row", "win_col"))
            _write_images(reader, analyzer, result, sink, out, small, config)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        metrics = build_metrics(result, reader.identity(), age=age, command=command, extra=extra)
        metrics["outputs"] = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        metrics["outputs"].append("metrics.json")
        atomic_write_json(out / "metrics.json", metrics)
    return metrics, result


def _write_images(reader: Any, analyzer: Any, result: SlideResult, sink: FileSink, out: Path,
                  small: bool, config: Config) -> None:
    # Pictures only: a chunk that cannot be decoded is white there (its tiles are already
    # reported missing), not a reason to lose the analysis.
    if small:
        h0, w0 = reader.shape
        rgb = reader.read_region_or_blank(0, 0, w0, h0, reader.mpp)[0]
        labels = sink.maps.get(analyzer.map_names[0])
        if labels is not None:
            full = cv2.resize(labels.astype(np.uint8), (w0, h0), interpolation=cv2.INTER_NEAREST)
            write_png(out / "labels.png", full)
        if "fibres" in sink.maps:
            fib = cv2.resize(sink.maps["fibres"].astype(np.uint8), (w0, h0), interpolation=cv2.INTER_NEAREST)
            write_png(out / "fibres.png", np.where(fib > 0, 255, 0).astype(np.uint8))
        cells = sink.cells
        rc = colours = None
        if cells and len(cells.get("x", ())):
            rc = np.column_stack([cells["y"], cells["x"]])
            lut = {c.name: c.rgb for c in analyzer.cell_classes}
            colours = np.array([lut.get(str(k), (255, 255, 0)) for k in cells["class"]], np.uint8)
        radius = max(2, int(round(3.0 / reader.mpp)))
        write_png(out / "overlay.png", overlay(rgb, labels, analyzer.label_classes,
                                               cells_rc=rc, cell_rgb=colours, radius_px=radius))
    else:
        thumb = reader.thumbnail(config.output.thumbnail_px, blank_unreadable=True)
        labels = _zarr_thumbnail(out / ".labels.zarr.tmp", analyzer.map_names[0], thumb.shape[:2])
        write_png(out / "overlay.png", overlay(thumb, labels, analyzer.label_classes))


def _zarr_thumbnail(store: Path, name: str, shape: tuple[int, int]) -> np.ndarray | None:
    import zarr

    try:
        arr = zarr.open_array(store=str(store / name), mode="r")
    except Exception:  # noqa: BLE001 - no map written (e.g. analyzer without maps)
        return None
    step = max(1, int(np.ceil(max(arr.shape[0] / shape[0], arr.shape[1] / shape[1]))))
    rows = []
    # Row strips keep memory at one strip of chunks, not the whole map.
    strip = max(step, arr.chunks[0] // step * step)
    for r in range(0, arr.shape[0], strip):
        rows.append(np.asarray(arr[r : r + strip])[::step, ::step])
    return np.concatenate(rows) if rows else None
