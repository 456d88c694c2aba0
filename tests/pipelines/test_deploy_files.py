"""deploy/serve_config.yaml is a valid Serve config naming what exists, and matches what
`attribution serve` deploys."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from attribution_core.config import ProjectConfig
from pipelines.serve.app import IMPORT_PATH, ServeArgs
from pipelines.serve.runner import application_config

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_parses_and_names_the_builder_the_config_and_the_deployments():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH
    module, name = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), name))
    args = ServeArgs(**app.args)
    cfg = ProjectConfig.load(ROOT / args.config)
    ours = application_config(ServeArgs(config=str(ROOT / args.config)))
    assert [d["name"] for d in raw["applications"][0]["deployments"]] == [d["name"] for d in ours["deployments"]]
    assert len(ours["deployments"]) == 1 + cfg.serve.partitions
    for deployment in raw["applications"][0]["deployments"]:
        assert set(deployment["user_config"]) == set(ours["deployments"][0]["user_config"])
