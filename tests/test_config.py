"""Config loading, validation and overrides."""

from __future__ import annotations

import pytest

from marrowseg.config import STAINS, config_hash, load_config, parse_overrides
from marrowseg.errors import ConfigError


@pytest.mark.parametrize("stain", [None, *STAINS])
def test_packaged_configs_validate(stain):
    cfg = load_config(stain)
    assert cfg.tiling.tile_px > cfg.tiling.overlap_px


def test_override_changes_value_and_hash():
    a = load_config("he")
    b = load_config("he", overrides=["tiling.tile_px=3072"])
    assert b.tiling.tile_px == 3072
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(load_config("he"))


def test_unknown_key_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"unknown key 'tiling\.tile_pz'"):
        load_config("he", overrides=["tiling.tile_pz=512"])


def test_out_of_range_value_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"'engine\.batch_size'"):
        load_config(overrides={"engine": {"batch_size": 0}})


def test_bad_yaml_file_is_an_error_naming_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("tiling: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config("he", path=p)


def test_user_file_overlays_defaults(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("engine:\n  batch_size: 16\n")
    assert load_config("he", path=p).engine.batch_size == 16


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_overrides(["tiling.tile_px"])


def test_override_values_keep_yaml_types():
    assert parse_overrides(["a.b=0.5", "a.c=true", "d=text"]) == {"a": {"b": 0.5, "c": True}, "d": "text"}


def test_unknown_stain_is_rejected():
    with pytest.raises(ConfigError, match="unknown stain"):
        load_config("giemsa")


@pytest.mark.parametrize("key,value", [("workers", -1), ("threads", 0), ("workers", "many")])
def test_engine_counts_must_be_auto_or_in_range(key, value):
    with pytest.raises(ConfigError, match=rf"engine\.{key}"):
        load_config(overrides={"engine": {key: value}})


def test_threads_auto_honours_omp_num_threads(monkeypatch):
    from marrowseg.engine import _resolve_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _resolve_threads("auto") == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert _resolve_threads("auto") >= 1
    assert _resolve_threads(3) == 3


def test_bad_reference_table_names_the_file_and_key(tmp_path):
    from marrowseg.config.ecad import load_ecad_reference
    from marrowseg.config.he import load_cellularity_reference

    p = tmp_path / "ref.yaml"
    p.write_text("rules: 3\n")
    with pytest.raises(ConfigError, match=r"ref\.yaml.*'rules'"):
        load_cellularity_reference(p)
    with pytest.raises(ConfigError, match=r"ref\.yaml"):
        load_ecad_reference(p)
