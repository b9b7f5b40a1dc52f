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
    b = load_config("he", overrides=["tiling.tile_px=2048"])
    assert b.tiling.tile_px == 2048
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
