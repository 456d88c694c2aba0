"""Resolve a ``ModelConfig`` to a loaded adapter (building a tiny model when asked)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from attribution_core.config import ModelConfig
from attribution_core.errors import ConfigError
from attribution_core.index.manifest import IndexManifest
from attribution_core.models.adapters import DiffusersAdapter
from attribution_core.models.pipeline_dir import is_model_dir, load_adapter
from attribution_core.models.tiny import build_tiny_pipeline

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(device)


def ensure_model(cfg: ModelConfig) -> Path:
    """The model directory of ``cfg``, built first when missing and ``cfg.build`` is set."""
    path = Path(cfg.path)
    if is_model_dir(path):
        return path
    if cfg.build is None:
        return path  # load_adapter explains what is missing
    log.info("building a tiny %r model at %s", cfg.build, path)
    return build_tiny_pipeline(cfg.build, path, resolution=cfg.resolution, widths=tuple(cfg.widths))


def load_model(cfg: ModelConfig) -> DiffusersAdapter:
    return load_adapter(ensure_model(cfg), device=resolve_device(cfg.device), base=cfg.base)


def load_model_dir(path: str, device: str = "auto", base: str | None = None) -> DiffusersAdapter:
    """The model at ``path`` (``base``: the base pipeline of a LoRA directory) on ``device``."""
    return load_adapter(path, device=resolve_device(device), base=base)


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """Where a model is: its directory and, for a LoRA directory without lora.json, its base
    pipeline directory. What stages and actors pass around instead of a loaded model."""

    path: str
    base: str | None = None

    def load(self, device: str = "auto") -> DiffusersAdapter:
        return load_model_dir(self.path, device, self.base)

    @classmethod
    def of_manifest(cls, manifest: IndexManifest, path: str | None = None) -> ModelRef:
        """The model an index version was built with (``path`` instead of the recorded one,
        keeping the recorded base)."""
        return cls(path or manifest.model.path, manifest.model.base)


def manifest_model(manifest: IndexManifest, device: str = "auto", path: str | None = None) -> DiffusersAdapter:
    """The model an index version was built with (``path`` instead of the recorded one; the
    recorded base of a LoRA either way)."""
    return ModelRef.of_manifest(manifest, path).load(device)
