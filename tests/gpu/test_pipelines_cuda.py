"""GPU tier, whole stages (marker ``gpu``; skipped without CUDA): fp16-variant models
featurize in float32 on the device (LoRA exactness is in test_featurize_cuda), the index
actor takes a GPU, and the endpoint's featurizer replica holds a GPU and answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution_core.config import FeaturizeConfig
from attribution_core.data.writers import write_synthetic
from attribution_core.features.featurize import Featurizer
from attribution_core.models.pipeline_dir import load_adapter
from tests.conftest import make_batch
from tests.pipelines.conftest import features_by_id, project

pytestmark = pytest.mark.gpu


def test_fp16_variant_featurizes_in_float32_on_cuda(model_dirs, tmp_path):
    from tests.core.test_model_variants import half_copy

    half = half_copy(model_dirs["text-latent"], tmp_path / "fp16", "fp16", torch.float16)
    adapter = load_adapter(half, device="cuda")
    assert {p.dtype for p in adapter.denoiser.parameters()} == {torch.float32}
    cpu = Featurizer(load_adapter(half), FeaturizeConfig()).flat(make_batch(adapter, n=2))
    gpu = Featurizer(adapter, FeaturizeConfig()).flat(make_batch(adapter, n=2)).cpu()
    assert float((gpu - cpu).norm() / cpu.norm()) < 1e-4


def test_index_actor_takes_a_gpu(tmp_path, ray_cluster, model_dirs):
    from attribution_core.models.fingerprint import model_fingerprint
    from pipelines.index.job import IndexRequest, run_index

    data = str(tmp_path / "data")
    write_synthetic(data, 12, seed=4, size=16)
    out = str(tmp_path / "index")
    run_index(project(index={"actors": 0}), IndexRequest(dataset=data, model=model_dirs["text"], out=out))  # 0: one per GPU
    manifest, rows = features_by_id(out)
    assert manifest.build.device == "cuda" and len(rows) == 12
    assert all(np.isfinite(v).all() and np.abs(v).sum() > 0 for v in rows.values())
    assert manifest.model.fingerprint == model_fingerprint(load_adapter(model_dirs["text"]))


def test_serve_featurizer_replica_holds_a_gpu(tmp_path, ray_cluster, model_dirs):
    from ray.util.state import list_actors

    from pipelines.index.job import IndexRequest, run_index
    from pipelines.serve.app import ServeArgs
    from pipelines.serve.runner import start, stop
    from tests.pipelines.http_client import b64, free_port, post, write_config

    data = str(tmp_path / "data")
    write_synthetic(data, 12, seed=4, size=16)
    index = str(tmp_path / "index")
    run_index(project(), IndexRequest(dataset=data, model=model_dirs["text"], out=index))
    port = free_port()
    config = write_config(tmp_path / "serve.yaml", model_dirs["text"], index, port, partitions=1)
    url, _ = start(ServeArgs(config=config), host="127.0.0.1", port=port, timeout_s=600)
    try:
        from attribution_core.data.readers import read_examples

        example = next(iter(read_examples(data)))
        status, answer = post(url, {"image": b64(example.image), "prompt": example.caption, "k": 3})
        assert status == 200 and answer["aspects"]["general"]
        gpu_actors = [a for a in list_actors(detail=True, filters=[("state", "=", "ALIVE")])
                      if (a.required_resources or {}).get("GPU")]
        assert any("Featurizer" in (a.class_name or "") for a in gpu_actors), [a.class_name for a in gpu_actors]
    finally:
        stop()
