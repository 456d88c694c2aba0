"""Every shipped YAML parses into the typed config; values round-trip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from attribution_core.config import ProjectConfig, from_mapping, load_yaml, to_mapping
from attribution_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_every_config_the_docs_name_exists_and_every_config_is_named_in_the_docs():
    """A user follows the README, the Makefile and the deploy files to a config: each one
    they name is shipped, and no shipped config is left undocumented."""
    docs = "".join(p.read_text() for p in [ROOT / "README.md", ROOT / "Makefile", ROOT / "benchmarks" / "README.md",
                                            ROOT / "deploy" / "README.md", *sorted(ROOT.glob("deploy/**/*.yaml"))])
    named = set(re.findall(r"configs/[\w.-]+\.yaml", docs))
    assert "configs/demo.yaml" in named  # make demo's config
    assert sorted(n for n in named if not (ROOT / n).is_file()) == []
    assert [p.name for p in CONFIGS if f"configs/{p.name}" not in docs] == []


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
    with pytest.raises(ConfigError, match="serve.featurize_in: choose one of ingress, replicas, got 'gpu'"):
        from_mapping(ProjectConfig, {"serve": {"featurize_in": "gpu"}})


def test_every_config_field_says_what_it_changes():
    """Each field of every config section is followed by its doc line (what it changes, its
    unit): the config files and --help point users to these."""
    import ast

    import attribution_core

    root = Path(attribution_core.__file__).parent
    missing = []
    for name in ("config.py", "config_model.py", "config_stages.py", "config_serve.py"):
        tree = ast.parse((root / name).read_text())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            body = cls.body
            for i, node in enumerate(body):
                if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                    continue
                if "ClassVar" in ast.unparse(node.annotation):
                    continue
                after = body[i + 1] if i + 1 < len(body) else None
                if not (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                        and isinstance(after.value.value, str) and after.value.value.strip()):
                    missing.append(f"{name}: {cls.name}.{node.target.id}")
    assert not missing, "fields without a doc line: " + ", ".join(missing)
