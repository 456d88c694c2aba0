"""attribution_core never imports ray, s3fs or tqdm: a pure core, thin adapters. Inside it,
imports go one way: data < models < features < index < weights < evaluation, with the
top-level modules (config, errors, timing, seeding, statistics ...) below them all."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "attribution_core"
FORBIDDEN = {"ray", "s3fs", "tqdm"}
ORDER = ("data", "models", "features", "index", "weights", "evaluation")


def _layer(module: str) -> int:
    """0 for the top-level modules of the core (the base), then 1 + the package's place in ORDER."""
    parts = module.split(".")
    if len(parts) < 2 or (len(parts) == 2 and parts[1] not in ORDER):  # attribution_core.config, .errors ...
        return 0
    assert parts[1] in ORDER, f"attribution_core.{parts[1]} has no place in the layer order {ORDER}"
    return 1 + ORDER.index(parts[1])


def _imports(path: Path, core: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a core module in ``path``, at any depth (inside
    functions too), relative imports resolved."""
    package = ["attribution_core", *path.relative_to(core).with_suffix("").parts][:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
    return [(line, m) for line, m in found if m.split(".")[0] == "attribution_core"]


def upward_imports(core: Path) -> list[str]:
    """Every import in the package at ``core`` that goes against the layer order."""
    upward = []
    for path in sorted(core.rglob("*.py")):
        module = ".".join(["attribution_core", *path.relative_to(core).with_suffix("").parts])
        upward += [f"{path.relative_to(core.parent)}:{line} ({module}) imports {m}"
                   for line, m in _imports(path, core) if _layer(m) > _layer(module)]
    return upward


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


def test_core_imports_go_one_way():
    upward = upward_imports(CORE)
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_layer_check_sees_upward_imports_at_any_depth(tmp_path):
    core = tmp_path / "attribution_core"
    (core / "data").mkdir(parents=True)
    (core / "weights").mkdir()
    (core / "seeding.py").write_text("from attribution_core.data import readers\n")
    (core / "data" / "readers.py").write_text("import attribution_core.errors\n\n\n"
                                              "def f():\n    from ..weights.artifact import UNIFORM\n")
    (core / "weights" / "artifact.py").write_text("from attribution_core.data.readers import f\n")
    assert upward_imports(core) == [
        "attribution_core/data/readers.py:5 (attribution_core.data.readers) imports attribution_core.weights.artifact",
        "attribution_core/seeding.py:1 (attribution_core.seeding) imports attribution_core.data",
    ]
