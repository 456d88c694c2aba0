"""Tier 2 fixtures: one local Ray per test session (num_cpus=2) and index helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from attribution_core.config import ProjectConfig, from_mapping
from attribution_core.data.images import encode_png
from attribution_core.data.writers import SYNTH_SCHEMA, synthetic_rows, write_parquet_dataset
from attribution_core.index.schema import flat_matrix
from attribution_core.index.store import IndexStore

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

FEATURIZE = {"measurement": "square", "timesteps": {"count": 2, "strategy": "uniform"},
             "projection": {"k_in": 4, "k_out": 4}, "groups": {"preset": "block"}, "seed": 0}


@pytest.fixture(scope="session")
def ray_cluster(s3_base):
    """A local Ray of 2 CPUs, started after the S3 test server so workers inherit its
    AWS variables; yields the cluster address for subprocess drivers."""
    import ray

    from pipelines.ray_runtime import local_settings

    local_settings()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 2**20,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def project(index: dict | None = None, featurize: dict | None = None, weights: dict | None = None) -> ProjectConfig:
    """A config for tests: tiny featurize settings, small shards, 2 actors, the kernel's
    structure and damping fixed (the objective rule has tests of its own)."""
    return from_mapping(ProjectConfig, {
        "featurize": {**FEATURIZE, **(featurize or {})},
        "index": {"batch_size": 8, "actors": 2, "threads_per_actor": 1, "kernel": "auto", "damping_rule": "fixed",
                  **(index or {})},
        "weights": weights or {},
    })


def read_index(uri: str) -> tuple[dict, pa.Table]:
    """(latest manifest, every feature row of it)."""
    store = IndexStore(uri)
    manifest = store.latest()
    assert manifest is not None, f"{uri} has no committed version"
    tables = [store.read_table(s.path) for s in manifest.shards]
    return manifest, pa.concat_tables(tables)


def features_by_id(uri: str) -> tuple[dict, dict[str, np.ndarray]]:
    manifest, table = read_index(uri)
    flat = flat_matrix(table, manifest.group_layout)
    return manifest, dict(zip(table.column("example_id").to_pylist(), flat))


def error_ids(uri: str) -> dict[str, str]:
    store = IndexStore(uri)
    manifest = store.latest()
    rows = [r for p in manifest.errors.shards for r in store.read_table(p).to_pylist()]
    return {r["example_id"]: r["reason"] for r in rows}


def tiny_main_job(tmp_path: Path, kernel_rule: str = "fixed", **sections: dict) -> dict:
    """configs/demo.yaml scaled to seconds: a 48-example dataset, 8x8 models, a few steps
    everywhere, an LDS of 4 subsets over 24 examples; ``sections`` update its sections.
    ``kernel_rule="objective"`` keeps demo.yaml's choice of the kernel and damping by the
    objective on generated queries; by default they are fixed (the rule has tests of its own)."""
    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "demo.yaml").read_text())
    recipe = {"resolution": 8, "widths": [8, 16], "text_width": 16, "batch_size": 8, "warmup_steps": 1, "threads": 1}
    cfg["data"]["uri"] = str(tmp_path / "data")
    cfg["data"]["synthetic"].update(n=48, size=16)
    cfg["model"]["path"] = str(tmp_path / "model")
    cfg["train"].update(recipe, steps=6)
    cfg["subset_train"].update(recipe, steps=4)
    cfg["featurize"]["timesteps"]["count"] = 2
    # one featurize actor: a second costs a process start (torch and diffusers imported) and saves
    # nothing at 24-48 rows; the evaluation's sweep holds the index's damping grid
    cfg["index"].update(out=str(tmp_path / "index"), batch_size=16, actors=1, damping_queries=3,
                        damping_grid=[0.01, 1.0])
    if kernel_rule == "fixed":  # block-diagonal: a LoRA's k_total fits a full kernel, whose inverse takes ~10 s here
        cfg["index"].update(kernel="block_diagonal", damping_rule="fixed")
    cfg["weights"].update(queries_per_aspect=4, steps=10, sample_steps=3, max_rounds=1, workers=1, pool_size=12,
                          validation_queries=6, holdout_queries=3)
    cfg["demo"].update(out=str(tmp_path / "demo"), queries=1, top_k=2, lds=True)
    cfg["serve"].update(partitions=1, cpus_per_replica=0.25)
    cfg["evaluate"].update(out=str(tmp_path / "eval"), lds_examples=24, subsets=4, generated_queries=3,
                           heldout_queries=2, output_timesteps=2, weights_queries=4, recall_queries=6, gallery=2,
                           gallery_k=3, bootstrap=200, damping_grid=[0.01, 1.0])
    cfg["evaluate"]["exemplars"].update(columns={"subject": "subject", "style": "style"}, size=3, queries=4,
                                        distractors=0, steps=20, batch_size=3)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


N = 40  # good rows of the shared index (full_build)


def bad_rows() -> list[dict]:
    """Rows the job must quarantine: undecodable, missing caption, too small, too elongated."""
    tiny = encode_png(np.zeros((2, 2, 3), dtype=np.uint8))
    long = encode_png(np.zeros((8, 64, 3), dtype=np.uint8))
    base = {"subject": "circle", "style": "filled", "background": "solid"}
    return [
        {"example_id": "bad-bytes", "image": b"not an image", "caption": "a filled circle", **base},
        {"example_id": "no-caption", "image": tiny, "caption": None, **base},
        {"example_id": "tiny", "image": tiny, "caption": "a filled circle", **base},
        {"example_id": "elongated", "image": long, "caption": "a filled circle", **base},
    ]


def write_rows(uri: str, rows: list[dict]) -> str:
    write_parquet_dataset(uri, rows, SYNTH_SCHEMA, {"kind": "test"}, rows_per_file=16)
    return uri


@pytest.fixture(scope="session")
def good_rows() -> list[dict]:
    return list(synthetic_rows(N, seed=5, size=16))


@pytest.fixture(scope="session")
def full_build(tmp_path_factory, ray_cluster, model_dirs, good_rows):
    """An index of ``N`` good and 4 bad rows, built once for the tests that read it; a test
    that changes an index works on a copy of it."""
    from pipelines.index.job import IndexRequest, run_index

    root = tmp_path_factory.mktemp("index")
    data = write_rows(str(root / "data"), good_rows + bad_rows())
    out = str(root / "index")
    result = run_index(project(), IndexRequest(dataset=data, model=model_dirs["text"], out=out))
    return {"data": data, "out": out, "result": result, "root": root}
