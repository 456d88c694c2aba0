"""Every shipped YAML parses into the typed config; values round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from attribution_core.config import ProjectConfig, from_mapping, load_yaml, to_mapping
from attribution_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_round_trips(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# Used by:"), "each config starts with the command that uses it"
    cfg = ProjectConfig.load(path)
    assert from_mapping(ProjectConfig, to_mapping(cfg)) == cfg


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top"):
        load_yaml(top)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("modle: {}\n")
    with pytest.raises(ConfigError, match="unknown setting.*modle"):
        ProjectConfig.load(unknown)


def test_evaluation_settings_are_checked():
    with pytest.raises(ConfigError, match="evaluate.seed: must differ from weights.seed"):
        from_mapping(ProjectConfig, {"weights": {"seed": 7}, "evaluate": {"seed": 7}})
    with pytest.raises(ConfigError, match="evaluate.bases: choose from tracin, trak, dtrak, das"):
        from_mapping(ProjectConfig, {"evaluate": {"bases": ["trak", "influence"]}})
    with pytest.raises(ConfigError, match="evaluate.subsets: LDS needs at least 2 subsets"):
        from_mapping(ProjectConfig, {"evaluate": {"subsets": 1}})
    with pytest.raises(ConfigError, match="evaluate.subset_fraction"):
        from_mapping(ProjectConfig, {"evaluate": {"subset_fraction": 1.0}})


def test_reindex_and_refresh_settings_are_checked():
    with pytest.raises(ConfigError, match="reindex.relearn: choose one of always, changed"):
        from_mapping(ProjectConfig, {"reindex": {"relearn": "sometimes"}})
    with pytest.raises(ConfigError, match=r"reindex.relearn_fraction: must be in \[0, 1\]"):
        from_mapping(ProjectConfig, {"reindex": {"relearn_fraction": 5}})
    with pytest.raises(ConfigError, match="reindex.lease_ttl_s"):
        from_mapping(ProjectConfig, {"reindex": {"lease_ttl_s": 1}})
    with pytest.raises(ConfigError, match="reindex.endpoint: must be an http"):
        from_mapping(ProjectConfig, {"reindex": {"endpoint": "attribution-serve-svc:8000"}})
    with pytest.raises(ConfigError, match="serve.refresh_s"):
        from_mapping(ProjectConfig, {"serve": {"refresh_s": -1}})

