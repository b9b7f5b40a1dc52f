"""What a batch will do: find slides, name their output folders, read the manifest, pick stains.

Nothing here reads pixels; automatic stain recognition happens per slide, in the task
(:mod:`marrowseg.batch_slide`), because it needs the slide open.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from marrowseg.errors import ConfigError

__all__ = [
    "SLIDE_SUFFIXES",
    "SlideJob",
    "StainRules",
    "load_stain_rules",
    "find_slides",
    "slide_ids",
    "load_manifest",
    "normalise_stain",
    "plan_jobs",
    "manifest_columns",
]

#: file suffixes the readers open (OpenSlide-only ones fail per slide when it is absent)
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".png", ".jpg", ".jpeg", ".bmp",
                  ".mrxs", ".vms", ".vmu", ".czi", ".svslide", ".scn", ".bif")
#: names in OUT_DIR a slide folder must never take
RESERVED_IDS = frozenset({"summary.csv", "failures.csv", "marrowseg-batch.log", "slides"})
_ID_MAX_LEN = 100
_STAIN_ALIASES = {
    "he": "he", "h&e": "he", "hne": "he", "h+e": "he", "hematoxylin-eosin": "he", "haematoxylin-eosin": "he",
    "ecad": "ecad", "e-cad": "ecad", "e-cadherin": "ecad", "ecadherin": "ecad", "cdh1": "ecad",
    "reticulin": "reticulin", "retic": "reticulin", "gomori": "reticulin", "silver": "reticulin",
}
#: manifest columns with a meaning of their own (the rest are copied through)
MANIFEST_KNOWN = ("slide", "stain", "age", "mpp")


@dataclass(frozen=True)
class SlideJob:
    """One slide of a batch and how to analyse it.

    Attributes
    ----------
    path : Path
        Absolute path of the slide file.
    rel : str
        Its path relative to the input folder (POSIX separators): the ``slide`` column.
    slide_id : str
        Output folder name under OUT_DIR (safe: no separators, no leading dot).
    stain : str or None
        The stain to analyse with; None means recognise it from colour.
    stain_source : str
        ``'cli'``, ``'manifest'``, ``'rule'`` or ``'auto'``.
    age : float or None
        Patient age, years (manifest).
    mpp : float or None
        Pixel size override, µm/px (``--mpp`` or the manifest's ``mpp`` column).
    manifest : dict
        The slide's manifest row as read (all columns, strings); empty when not listed.
    error : str
        Set when the plan already knows the slide fails (e.g. listed but missing).
    """

    path: Path
    rel: str
    slide_id: str
    stain: str | None
    stain_source: str
    age: float | None = None
    mpp: float | None = None
    manifest: dict[str, str] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class StainRules:
    """Filename rules, excluded globs and auto-recognition settings (``configs/stain_rules.yaml``)."""

    rules: tuple[tuple[str, re.Pattern[str]], ...]
    exclude: tuple[str, ...]
    min_confidence: float = 0.25
    thumbnail_px: int = 1024

    def stain_of(self, rel: str) -> str | None:
        """The stain named by a slide's file name, else by its nearest folder; None if none or ambiguous."""
        p = PurePosixPath(rel)
        parts = [_strip_suffix(p.name), *reversed(p.parts[:-1])]
        for part in parts:
            hits = {stain for stain, rx in self.rules if rx.search(part)}
            if len(hits) == 1:
                return hits.pop()
            if len(hits) > 1:
                return None
        return None


def load_stain_rules(path: str | Path | None = None) -> StainRules:
    """Read the stain rules YAML (default: the packaged ``configs/stain_rules.yaml``).

    Raises
    ------
    ConfigError
        Unreadable file, bad YAML, unknown stain or invalid regular expression.
    """
    if path is None:
        from marrowseg.config import config_dir

        path = config_dir() / "stain_rules.yaml"
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read stain rules ({exc.strerror or exc})") from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: invalid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    rules = []
    for i, item in enumerate(data.get("rules") or []):
        try:
            stain = normalise_stain(str(item["stain"]))
            rx = re.compile(str(item["pattern"]))
        except (KeyError, TypeError):
            raise ConfigError(f"{path}: rules[{i}] needs 'stain' and 'pattern'") from None
        except re.error as exc:
            raise ConfigError(f"{path}: rules[{i}].pattern: {exc}") from None
        if stain is None:
            raise ConfigError(f"{path}: rules[{i}].stain {item['stain']!r} is not a stain")
        rules.append((stain, rx))
    auto = data.get("auto") or {}
    try:
        return StainRules(rules=tuple(rules), exclude=tuple(str(x) for x in data.get("exclude") or ()),
                          min_confidence=float(auto.get("min_confidence", 0.25)),
                          thumbnail_px=int(auto.get("thumbnail_px", 1024)))
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: auto.min_confidence and auto.thumbnail_px must be numbers") from None


def normalise_stain(text: str) -> str | None:
    """Canonical stain key of a manifest/CLI value; None for ``''`` and ``'auto'``.

    Raises
    ------
    ConfigError
        A value that names no stain.
    """
    key = re.sub(r"[\s_]+", "-", text.strip().lower())
    if key in ("", "auto"):
        return None
    try:
        return _STAIN_ALIASES[key]
    except KeyError:
        raise ConfigError(f"unknown stain {text!r}; expected he, ecad, reticulin or auto") from None


def _strip_suffix(name: str) -> str:
    low = name.lower()
    for suf in (".ome.tiff", ".ome.tif"):
        if low.endswith(suf):
            return name[: -len(suf)]
    stem, dot, ext = name.rpartition(".")
    return stem if dot and stem and f".{ext.lower()}" in SLIDE_SUFFIXES else name


def _is_output_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / "marrowseg-batch.log").is_file()


def find_slides(in_dir: str | Path, *, pattern: str | None = None, exclude: tuple[str, ...] = (),
                out_dir: str | Path | None = None) -> list[Path]:
    """Slide files under ``in_dir``, recursively, in sorted relative-path order.

    Skips hidden files and folders, zarr stores, our own output folders (``out_dir`` and any
    folder holding ``metrics.json`` or a batch log), files matching ``exclude`` globs, and
    files whose suffix no reader opens. A folder holding ``.dcm`` files is one DICOM slide:
    it is listed, not walked.

    Parameters
    ----------
    pattern : str, optional
        Glob the relative path must match (``PurePosixPath.match``: ``*.svs`` at any depth).

    Raises
    ------
    ConfigError
        ``in_dir`` is not a folder.
    """
    root = Path(in_dir)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a folder")
    out_res = Path(out_dir).resolve() if out_dir is not None else None

    def wanted(path: Path) -> bool:
        if any(fnmatch.fnmatch(path.name, g) for g in exclude):
            return False
        return not pattern or PurePosixPath(path.relative_to(root).as_posix()).match(pattern)

    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        if any(name.lower().endswith(".dcm") for name in filenames):
            # a DICOM whole-slide image is a folder of .dcm files: one slide, not a tree to walk
            if here == root:
                raise ConfigError(f"{root}: is one DICOM slide (a folder of .dcm files); give the folder that "
                                  "holds it, or analyse it with `marrowseg analyze`")
            dirnames[:] = []
            if wanted(here):
                found.append(here)
            continue
        keep = []
        for d in sorted(dirnames):
            sub = here / d
            if d.startswith(".") or d.lower().endswith(".zarr"):
                continue
            if (out_res is not None and sub.resolve() == out_res) or _is_output_dir(sub):
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(SLIDE_SUFFIXES):
                continue
            if wanted(here / name):
                found.append(here / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _short_hash(rel: str) -> str:
    return hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8]


def slide_ids(rels: list[str]) -> dict[str, str]:
    """Safe, unique output folder names for relative slide paths.

    The id is the relative path without the slide suffix, folders joined by ``__``, every
    character outside ``[A-Za-z0-9._-]`` replaced by ``_``, leading dots and dashes removed.
    When that changed the name, made it longer than 100 characters, hit a reserved name, or
    collides (case-insensitively) with another slide's, ``-`` and 8 hex digits of the
    path's SHA-1 are appended. Ids therefore never contain a separator, never start with a
    dot and never resolve outside OUT_DIR.
    """
    base: dict[str, str] = {}
    for rel in rels:
        parts = PurePosixPath(rel).parts
        plain = "__".join([*parts[:-1], _strip_suffix(parts[-1])]) if parts else ""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", plain).lstrip(".-")
        changed = safe != plain or not safe or len(safe) > _ID_MAX_LEN or safe.lower() in RESERVED_IDS
        base[rel] = (safe[:_ID_MAX_LEN] or "slide") + (f"-{_short_hash(rel)}" if changed else "")
    counts: dict[str, int] = {}
    for sid in base.values():
        counts[sid.lower()] = counts.get(sid.lower(), 0) + 1
    out = {}
    for rel, sid in base.items():
        if counts[sid.lower()] > 1:
            sid = f"{sid}-{_short_hash(rel)}"
        out[rel] = sid
    seen: set[str] = set()
    for rel, sid in out.items():
        while sid.lower() in seen:  # a literal name equal to another's hashed id: lengthen
            sid = f"{sid}-{_short_hash(sid)}"
        seen.add(sid.lower())
        out[rel] = sid
    return out


def load_manifest(path: str | Path) -> dict[str, dict[str, str]]:
    """Read a manifest CSV into ``{relative slide path: row}``.

    Columns: ``slide`` (required, relative to IN_DIR), ``stain``, ``age``, ``mpp`` and any
    others (``patient``, ``biopsy_date``, ...), which are kept as text.

    Raises
    ------
    ConfigError
        Unreadable file, no ``slide`` column, an absolute or escaping path, a duplicate row.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "slide" not in [c.strip() for c in reader.fieldnames]:
                raise ConfigError(f"{path}: manifest needs a 'slide' column (got {reader.fieldnames})")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read manifest ({exc.strerror or exc})") from None
    out: dict[str, dict[str, str]] = {}
    for i, row in enumerate(rows, start=2):
        raw = row.get("slide", "")
        if not raw:
            continue
        rel = PurePosixPath(raw.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts:
            raise ConfigError(f"{path}: line {i}: slide {raw!r} must be relative to the input folder")
        key = rel.as_posix()
        if key in out:
            raise ConfigError(f"{path}: line {i}: slide {raw!r} listed twice")
        out[key] = row
    return out


def _float(row: dict[str, str], key: str, where: str) -> float | None:
    text = row.get(key, "")
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{where}: {key} {text!r} is not a number") from None


def plan_jobs(
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    stain: str = "auto",
    manifest: str | Path | None = None,
    pattern: str | None = None,
    rules: StainRules | None = None,
    mpp: float | None = None,
    only: list[str | Path] | None = None,
) -> list[SlideJob]:
    """Every slide of the batch with its id, stain (or 'auto') and manifest row.

    Stain, in order: ``stain`` if not 'auto' (source ``cli``), the manifest's ``stain``
    column, the filename rules, else automatic recognition later (``stain=None``).
    Manifest rows whose file is missing become jobs with ``error`` set.

    Parameters
    ----------
    only : list of path-like, optional
        Restrict to these slide files (inside ``in_dir``).

    Raises
    ------
    ConfigError
        Bad folder, manifest, stain name or rules.
    """
    in_dir = Path(in_dir)
    rules = rules or load_stain_rules()
    forced = normalise_stain(stain)
    rows = load_manifest(manifest) if manifest is not None else {}
    paths = find_slides(in_dir, pattern=pattern, exclude=rules.exclude, out_dir=out_dir)
    if only is not None:
        wanted = {Path(p).resolve() for p in only}
        paths = [p for p in paths if p.resolve() in wanted]
    rels = [p.relative_to(in_dir).as_posix() for p in paths]
    missing = [r for r in rows if r not in set(rels)] if only is None else []
    ids = slide_ids(rels + missing)
    jobs = []
    for rel in sorted(rels + missing):
        row = rows.get(rel, {})
        where = f"{manifest}: slide {rel}"
        age = _float(row, "age", where)
        slide_mpp = _float(row, "mpp", where) or mpp
        error = "listed in the manifest but not found" if rel in missing else ""
        if forced is not None:
            st, src = forced, "cli"
        elif row.get("stain"):
            try:
                st, src = normalise_stain(row["stain"]), "manifest"
            except ConfigError as exc:
                st, src, error = None, "manifest", error or f"manifest: {exc}"
            if st is None and not error:
                st, src = rules.stain_of(rel), "rule"
                if st is None:
                    src = "auto"
        else:
            st = rules.stain_of(rel)
            src = "rule" if st is not None else "auto"
        jobs.append(SlideJob(path=(in_dir / rel).resolve() if rel not in missing else in_dir / rel,
                             rel=rel, slide_id=ids[rel], stain=st, stain_source=src, age=age,
                             mpp=slide_mpp, manifest=dict(row), error=error))
    return jobs


def manifest_columns(jobs: list[SlideJob]) -> list[str]:
    """Manifest columns to copy into summary.csv, in first-seen order."""
    cols: list[str] = []
    for j in jobs:
        for k in j.manifest:
            if k not in ("slide", "stain") and k not in cols:
                cols.append(k)
    return cols
