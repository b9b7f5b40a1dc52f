"""Validated configuration: YAML files in ``configs/`` plus ``--set key=value`` overrides.

Every value comes from YAML (``configs/default.yaml``, then the stain's file, then a
user file, then overrides); the models below only validate. Keys are lengths in µm,
areas in µm², optical densities in OD units, never pixels of the input.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from marrowseg.config.common import Config
from marrowseg.errors import ConfigError

__all__ = [
    "Config",
    "STAINS",
    "config_dir",
    "load_config",
    "config_hash",
    "parse_overrides",
    "load_reference_file",
]

STAINS = ("he", "ecad", "reticulin")


def config_dir() -> Path:
    """Folder holding the packaged YAML configs (source tree or installed wheel)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_configs", here.parent / "configs"):
        if (candidate / "default.yaml").is_file():
            return candidate
    raise ConfigError(f"{here}: packaged configs not found (expected configs/default.yaml)")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Turn ``["tiling.tile_px=1024", "he.mpp=0.5"]`` into a nested mapping.

    Values are parsed as YAML scalars, so ``true``, ``0.5`` and ``[1, 2]`` keep their types.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: value is not valid YAML") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set twice")
        node[parts[-1]] = value
    return out


def _format_validation(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        elif err["type"] == "missing":
            parts.append(f"missing key '{key}'")
        else:
            parts.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
    return f"{source}: " + "; ".join(parts)


def load_config(
    stain: str | None = None,
    *,
    path: str | Path | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> Config:
    """Build the validated configuration for one analysis.

    Parameters
    ----------
    stain : {'he', 'ecad', 'reticulin'} or None
        Also apply the shared-section overrides of ``configs/<stain>.yaml`` (every stain
        file's own section is always loaded).
    path : path-like, optional
        A user YAML file overlaid next (same keys as ``configs/default.yaml``).
    overrides : iterable of str or mapping
        ``KEY.PATH=VALUE`` strings (the CLI's ``--set``) or a nested mapping, applied last.

    Returns
    -------
    Config
        Frozen, validated configuration.

    Raises
    ------
    ConfigError
        Unreadable or invalid YAML, an unknown key, or a value out of range; the
        message names the file or the key.
    """
    root = config_dir()
    data = _read_yaml(root / "default.yaml")
    sources = [str(root / "default.yaml")]
    if stain is not None and stain not in STAINS:
        raise ConfigError(f"unknown stain {stain!r}; expected one of {', '.join(STAINS)}")
    # Each stain file holds its own section, always loaded (so every config is complete),
    # and may override shared sections (e.g. ``tiling``) for analyses of that stain only.
    for name in STAINS:
        layer = _read_yaml(root / f"{name}.yaml")
        if name != stain:
            layer = {k: v for k, v in layer.items() if k == name}
        data = _merge(data, layer)
        sources.append(str(root / f"{name}.yaml"))
    if path is not None:
        data = _merge(data, _read_yaml(Path(path)))
        sources.append(str(path))
    if isinstance(overrides, Mapping):
        over = dict(overrides)
    else:
        over = parse_overrides(overrides)
    if over:
        data = _merge(data, over)
        sources.append("--set")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, " + ".join(Path(x).name if x != "--set" else x for x in sources))) from None


def load_reference_file(filename: str, model: type[BaseModel], path: str | Path | None = None) -> Any:
    """Read and validate a reference table (default: the packaged ``configs/<filename>``).

    Raises
    ------
    ConfigError
        Unreadable file or invalid content; the message names the file and the keys.
    """
    p = Path(path) if path is not None else config_dir() / filename
    data = _read_yaml(p)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, str(p))) from None


def config_hash(config: Config) -> str:
    """Short, stable hash of the resolved configuration (16 hex digits)."""
    blob = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
