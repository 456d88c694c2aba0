"""A user's case end to end: Stable Diffusion (layout) fine-tuned with LoRA by diffusers'
own scripts (UNet and text-encoder adapters in ``pytorch_lora_weights.safetensors`` alone, no
lora.json), their licensed images as Parquet with their own column names and an ``artist``
column, through index -> learn-weights -> the endpoint, whose answer names each hit's artist."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from attribution_core.data.writers import synthetic_rows
from attribution_core.index.store import IndexStore
from attribution_core.models.fingerprint import model_fingerprint
from attribution_core.models.pipeline_dir import load_adapter
from attribution_core.models.tiny import build_tiny_pipeline
from tests.conftest import write_diffusers_lora
from tests.pipelines.conftest import tiny_main_job
from tests.pipelines.http_client import b64, free_port, post
from tests.pipelines.test_cli import attribution, error_line

ARTISTS = ("ana", "bo", "cy")


def write_licensed_set(folder, n: int) -> dict[str, str]:
    """Parquet as a user keeps it: ``key`` ids, ``picture`` bytes, caption, artist, license;
    returns id -> artist."""
    rows = list(synthetic_rows(n, seed=4, size=16))
    table = pa.table({
        "key": [f"img-{i:04d}" for i in range(n)],
        "picture": [r["image"] for r in rows],
        "caption": [r["caption"] for r in rows],
        "artist": [ARTISTS[i % 3] for i in range(n)],
        "license": ["cc-by"] * n,
    })
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-0.parquet")
    return dict(zip(table.column("key").to_pylist(), table.column("artist").to_pylist()))


def test_a_diffusers_lora_with_text_encoder_adapters_through_every_stage(tmp_path, ray_cluster):
    from pipelines.serve.app import ServeArgs
    from pipelines.serve.runner import start, stop

    base = str(build_tiny_pipeline("text-latent", tmp_path / "sd-base", resolution=16, widths=(8, 16)))
    lora = write_diffusers_lora(base, tmp_path / "my-lora")
    artists = write_licensed_set(tmp_path / "licensed", 24)
    settings = tiny_main_job(tmp_path, weights={"aspects": ["general"]})
    settings["model"] = {"path": lora, "base": base, "device": "cpu"}
    settings["data"] = {"uri": str(tmp_path / "licensed"), "image_column": "picture", "id_column": "key"}
    settings["index"]["keep_columns"] = ["artist"]
    settings["weights"].update(top_k=4, pool_size=8)
    port = free_port()
    settings["serve"].update(host="127.0.0.1", port=port)
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = {"RAY_ADDRESS": ray_cluster}

    built = json.loads(attribution("index", "--config", str(config), "--json", env=env).stdout)
    assert built["rows"] == 24 and built["errors"] == 0
    manifest = IndexStore(str(tmp_path / "index")).latest()
    assert manifest.model.base == base
    assert manifest.model.fingerprint == model_fingerprint(load_adapter(lora, base=base))
    groups = [g["name"] for g in manifest.layout["groups"]]
    assert "text_encoder" in groups and "cross_attn_k" in groups  # the text encoder's adapters, their own group
    assert manifest.dataset["keep_columns"] == ["artist"] and manifest.dataset["image_column"] == "picture"
    rows = IndexStore(str(tmp_path / "index")).read_table(manifest.shards[0].path).to_pylist()
    assert all(json.loads(r["metadata"]) == {"artist": artists[r["example_id"]]} for r in rows)

    learned = json.loads(attribution("learn-weights", "--config", str(config), "--json", env=env).stdout)
    assert learned["version"] == manifest.version

    url, _ = start(ServeArgs(config=str(config)), timeout_s=240)
    try:
        query = (tmp_path / "licensed" / "part-0.parquet")
        image = pq.read_table(query, columns=["picture"]).column("picture")[5].as_py()
        status, answer = post(url, {"image": b64(image), "prompt": "a red circle", "k": 5})
        assert status == 200, answer
        hits = answer["aspects"]["general"]
        assert len(hits) == 5
        for hit in hits:
            assert hit["metadata"] == {"artist": artists[hit["example_id"]]}
    finally:
        stop()

    # Without the base, the LoRA folder is refused in one line that says what to set.
    del settings["model"]["base"]
    config.write_text(yaml.safe_dump(settings))
    proc = attribution("groups", "--config", str(config), check=False)
    assert proc.returncode == 2 and "with model.base in the config (or --base)" in error_line(proc)
    out = attribution("groups", "--config", str(config), "--base", base).stdout
    assert "text_encoder" in out
