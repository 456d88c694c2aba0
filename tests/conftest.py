"""Shared fixtures: tiny diffusers models saved in the pipeline layout, seeded batches.

Tiers: ``tests/core`` (no Ray), ``tests/pipelines`` (command line; local Ray once a stage
needs it), ``tests/gpu`` (marker ``gpu``, skipped without CUDA). Marker ``slow``: starts Ray,
Serve or a training job (``make test-fast`` leaves these out).
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import pytest
import torch

from attribution_core.models.adapters import DiffusersAdapter, ExampleBatch
from attribution_core.models.pipeline_dir import load_adapter
from attribution_core.models.tiny import build_tiny_pipeline

warnings.filterwarnings("ignore", message=".*batching rule.*")

KINDS = ("unet", "unet-class", "text", "text-latent")


def pytest_collection_modifyitems(config, items):
    """Tests that start Ray (the session cluster) are ``slow`` as well as those marked so (a
    subprocess that trains or starts its own Ray): ``make test-fast`` runs ``-m "not slow"``.
    Without CUDA, ``gpu`` tests are skipped."""
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """One tiny saved model per kind (16x16 images, widths (8, 16))."""
    root = tmp_path_factory.mktemp("models")
    return {kind: str(build_tiny_pipeline(kind, root / kind, resolution=16, widths=(8, 16))) for kind in KINDS}


@pytest.fixture(scope="session")
def adapters(model_dirs) -> dict[str, DiffusersAdapter]:
    return {kind: load_adapter(path) for kind, path in model_dirs.items()}


CAPTIONS = ("a red star", "a striped circle on a grid background", "", "a dotted ring", "a blue square", "a cross")


def make_batch(adapter: DiffusersAdapter, n: int = 3, seed: int = 0, prefix: str = "ex") -> ExampleBatch:
    """``n`` seeded random images (and captions/labels as the model needs)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand((n, *adapter.image_shape), generator=g) * 2 - 1
    captions = tuple(CAPTIONS[i % len(CAPTIONS)] for i in range(n)) if adapter.conditioning == "text" else None
    labels = torch.arange(n) % 3 if adapter.conditioning == "class" else None
    return ExampleBatch(tuple(f"{prefix}{i}" for i in range(n)), pixels, captions, labels)


@pytest.fixture(scope="session")
def s3_base(tmp_path_factory):
    """A real S3-protocol server (moto's server mode) on 127.0.0.1 and a bucket in it;
    yields ``s3://bucket``. The standard AWS variables point every client at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket="attribution")
    try:
        yield "s3://attribution"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_lora(base_dir: str, out_dir, rank: int = 2, seed: int = 0, targets=None) -> str:
    """A LoRA directory on ``base_dir`` whose adapters are random and non-zero (as after
    fine-tuning, so every adapter weight has a gradient), saved the standard way."""
    from attribution_core.models.fingerprint import model_fingerprint
    from attribution_core.models.lora import DEFAULT_TARGETS, LoraSpec, add_lora, save_lora

    adapter = load_adapter(base_dir)
    base_fp = model_fingerprint(adapter)
    spec = LoraSpec(rank=rank, alpha=float(rank), targets=tuple(targets or DEFAULT_TARGETS))
    add_lora(adapter.denoiser, spec, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.denoiser.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return str(save_lora(adapter.denoiser, spec, out_dir, base_dir, base_fingerprint=base_fp))


def write_diffusers_lora(base_dir: str, out_dir, rank: int = 2, seed: int = 0, text_encoder: bool = True) -> str:
    """A LoRA folder as diffusers' training scripts leave one (``train_dreambooth_lora.py``
    with ``--train_text_encoder``): peft adapters on the UNet's attention projections and the
    text encoder's, random non-zero weights, saved by ``StableDiffusionPipeline.save_lora_weights``
    alone (no metadata, no lora.json)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    adapter = load_adapter(base_dir)
    torch.manual_seed(seed)
    parts = {"unet_lora_layers": (adapter.denoiser, ["to_k", "to_q", "to_v", "to_out.0"])}
    if text_encoder:
        parts["text_encoder_lora_layers"] = (adapter.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"])
    layers = {}
    g = torch.Generator().manual_seed(seed)
    for key, (module, targets) in parts.items():
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                           target_modules=targets), module)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        layers[key] = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
    StableDiffusionPipeline.save_lora_weights(out_dir, **layers)
    return str(out_dir)


@pytest.fixture(scope="session")
def lora_dirs(model_dirs, tmp_path_factory) -> dict[str, str]:
    """A rank-2 LoRA on attention q/k/v/out of each tiny model kind."""
    root = tmp_path_factory.mktemp("loras")
    return {kind: write_lora(path, root / kind, seed=i) for i, (kind, path) in enumerate(model_dirs.items())}
