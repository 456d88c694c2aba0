"""Model fingerprints: one hash of everything in a model that can change a feature.

Two indexes (or an index and a query) may be compared only when their model fingerprints
agree. The hash covers the configs of every component and the bytes of every parameter and
buffer of the denoiser, text encoder and VAE, plus the tokenizer's vocabulary and merges.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from attribution_core.models.adapters import DiffusersAdapter


def _hash_module(h: Any, prefix: str, module: nn.Module) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _tokenizer_state(tokenizer: Any) -> dict[str, Any]:
    state: dict[str, Any] = {"class": type(tokenizer).__name__,
                             "max_length": getattr(tokenizer, "model_max_length", None)}
    if hasattr(tokenizer, "get_vocab"):
        state["vocab"] = sorted(tokenizer.get_vocab().items())
    ranks = getattr(tokenizer, "bpe_ranks", None)
    if ranks:
        state["merges"] = sorted((" ".join(pair), rank) for pair, rank in ranks.items())
    return state


_VOLATILE = ("transformers_version", "torch_dtype", "dtype")


def _stable_config(value: Any) -> Any:
    """A config without where and with what it was saved (``_name_or_path``, versions)."""
    if isinstance(value, dict):
        return {k: _stable_config(v) for k, v in value.items() if not str(k).startswith("_") and k not in _VOLATILE}
    return value


def model_fingerprint(adapter: DiffusersAdapter) -> str:
    """Hex BLAKE2b-128 of the model's configs, weights and tokenizer; the same model
    saved in another directory or by another library version has the same fingerprint."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(_stable_config(adapter.fingerprint_config()), sort_keys=True, default=str).encode())
    for prefix in ("denoiser", "text_encoder", "vae"):
        module = getattr(adapter, prefix)
        if module is not None:
            _hash_module(h, prefix, module)
    if adapter.tokenizer is not None:
        h.update(json.dumps(_tokenizer_state(adapter.tokenizer), sort_keys=True, default=str).encode())
    return h.hexdigest()
