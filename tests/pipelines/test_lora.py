"""LoRA fine-tunes end to end: a base trained on one dataset, the attributed model and every
LDS subset model fine-tuned from it with LoRA on a second, through index -> weights ->
evaluate -> the endpoint, as `attribution demo` runs them."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from attribution_core.index.store import IndexStore
from attribution_core.models.fingerprint import model_fingerprint
from attribution_core.models.pipeline_dir import load_adapter
from attribution_core.models.lora import is_adapter_layer, read_pointer
from tests.pipelines.conftest import tiny_main_job
from tests.pipelines.test_cli import attribution, error_line


def lora_job(tmp_path: Path) -> dict:
    """The tiny main job with a ``base`` section (its own synthetic set, without two styles)
    and rank-2 LoRA recipes for the attributed model and the subset models."""
    cfg = tiny_main_job(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        cfg["serve"]["port"] = s.getsockname()[1]
    base = str(tmp_path / "base")
    lora = {"base": base, "lora_rank": 2, "learning_rate": 0.005}
    cfg["base"] = {
        "path": base,
        "data": {"uri": str(tmp_path / "base-data"),
                 "synthetic": {"n": 48, "seed": 1, "size": 16, "holdout": [{"style": "striped"}, {"style": "dotted"}]}},
        "train": dict(cfg["train"]),
    }
    cfg["train"].update(lora)
    cfg["subset_train"] = {**cfg["train"], "steps": 4}  # the same base: the universe model is a LoRA of it
    cfg["evaluate"]["bases"] = ["dtrak"]  # one LDS index (the demo test covers every basis)
    return cfg


def test_lora_models_go_through_every_stage(tmp_path, ray_cluster):
    settings = lora_job(tmp_path)
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump(settings))
    result = json.loads(attribution("demo", "--config", str(config), "--json", env={"RAY_ADDRESS": ray_cluster}).stdout)
    info, served = result["evaluation"]["info"], result["served"]
    assert set(info["prepared"]) == {"base", "data", "model"}

    # The attributed model is a LoRA directory on the base, and its fingerprint is not the base's.
    model_dir = tmp_path / "model"
    assert {p.name for p in model_dir.iterdir()} == {"lora.json", "pytorch_lora_weights.safetensors", "training.json"}
    pointer = read_pointer(model_dir)
    assert pointer.base == (tmp_path / "base").resolve() and pointer.spec.rank == 2
    base_fp = model_fingerprint(load_adapter(tmp_path / "base"))
    assert pointer.base_fingerprint == base_fp

    # The index tracks the adapters only, and its manifest carries the LoRA model's fingerprint.
    manifest = IndexStore(str(tmp_path / "index")).latest()
    names = [layer["name"] for layer in manifest.layout["layers"]]
    assert names and all(is_adapter_layer(n) for n in names)
    assert {g["name"] for g in manifest.layout["groups"]} == {
        "self_attn_qkv", "self_attn_out", "cross_attn_q", "cross_attn_k", "cross_attn_v", "cross_attn_out"}
    assert manifest.model.fingerprint == model_fingerprint(load_adapter(model_dir)) != base_fp

    # LDS: the universe model and the 4 subset models are LoRA fine-tunes of the same base.
    metrics = result["evaluation"]
    assert set(metrics["lds"]) == {"dtrak"} and info["ground_truth"]["trained"] == 4
    for row in metrics["lds"].values():
        assert all(-1 <= row[k] <= 1 for k in ("uniform", "learned"))
    universe = tmp_path / "eval" / "lds" / "model"
    assert read_pointer(universe).base_fingerprint == base_fp
    key = json.loads((Path(info["ground_truth"]["folder"]) / "key.json").read_text())
    assert key["recipe"]["lora_rank"] == 2

    # The endpoint answered with every learned aspect.
    answer = served["answers"][0]["answer"]
    assert set(answer["aspects"]) == {"general", "subject", "style", "background"}
    assert answer["index"]["version"] == info["index_build"]["version"]


@pytest.mark.slow  # subprocesses that train a base and a LoRA
def test_train_model_lora_flags(tmp_path):
    """`train-model --base --lora` writes a LoRA directory that loads as base + adapters;
    a changed base is refused at load with one line."""
    settings = tiny_main_job(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(settings))
    attribution("data", "synth", "--out", str(tmp_path / "data"), "--n", "24", "--size", "16")
    attribution("train-model", "--config", str(config), "--out", str(tmp_path / "base"), "--steps", "3")
    out = attribution("train-model", "--config", str(config), "--out", str(tmp_path / "ft"), "--steps", "3",
                      "--base", str(tmp_path / "base"), "--lora", "3", "--lora-targets", "attn2.to_k,attn2.to_v").stdout
    assert "LoRA rank 3 on" in out and "saved to" in out
    adapter = load_adapter(tmp_path / "ft")
    wrapped = {n.rsplit(".lora_", 1)[0] for n, _ in adapter.denoiser.named_modules() if is_adapter_layer(n)}
    assert wrapped and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in wrapped)
    assert adapter.lora.rank == 3

    proc = attribution("train-model", "--config", str(config), "--out", str(tmp_path / "x"), "--lora", "2", check=False)
    assert proc.returncode == 2 and "needs both --base" in error_line(proc)

    attribution("train-model", "--config", str(config), "--out", str(tmp_path / "base"), "--steps", "2", "--seed", "9",
                "--overwrite")  # the base changes under the LoRA
    proc = attribution("groups", "--config", str(config), "--model", str(tmp_path / "ft"), check=False)
    assert proc.returncode == 2 and "is not the one the LoRA" in error_line(proc)
