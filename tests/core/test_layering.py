"""attribution_core never imports ray, s3fs or tqdm: a pure core, thin adapters."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "attribution_core"
FORBIDDEN = {"ray", "s3fs", "tqdm"}


def test_no_forbidden_import_statement_in_core():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders


def test_importing_and_using_the_core_loads_no_ray_or_s3fs(model_dirs):
    script = f"""
import pkgutil, importlib, sys, torch
import attribution_core
for m in pkgutil.walk_packages(attribution_core.__path__, "attribution_core."):
    importlib.import_module(m.name)
from attribution_core.models.adapters import ExampleBatch
from attribution_core.models.pipeline_dir import load_adapter
from attribution_core.config import FeaturizeConfig
from attribution_core.features.featurize import featurize
a = load_adapter({model_dirs['text']!r})
featurize(a, ExampleBatch(("x",), torch.zeros(1, *a.image_shape), ("a star",)), FeaturizeConfig())
print(sorted(m for m in ("ray", "s3fs") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={"PATH": "", "HF_HUB_OFFLINE": "1"})
    assert out.stdout.strip().splitlines()[-1] == "[]"
