"""LoRA fine-tunes: adapters on a base pipeline, saved and loaded the way diffusers does it.

A LoRA model directory holds ``pytorch_lora_weights.safetensors`` (the denoiser's adapter
weights under the ``unet.`` prefix, as diffusers' ``save_lora_weights`` writes them and
``load_lora_weights`` reads them) next to ``lora.json``, the pointer to its base pipeline
directory with the adapter's rank, alpha and target modules, and usually the
``training.json`` of the fine-tune. Adapters are injected with peft (``inject_adapter_in_model``),
as diffusers' own LoRA support does, so any diffusers UNet takes them.

With peft, a target ``X`` becomes ``X.base_layer`` (the frozen original) plus the adapter's
down and up projections ``X.lora_A.<name>`` and ``X.lora_B.<name>``: plain ``nn.Linear`` /
``nn.Conv2d`` modules, which the Kronecker capture tracks like any other layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attribution_core.errors import ConfigError, ModelLoadError

LORA_FILE = "lora.json"
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
ADAPTER = "default"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# X.lora_A.<adapter> / X.lora_B.<adapter> / X.base_layer -> X
_WRAPPED = re.compile(r"^(.*)\.(?:lora_[AB]\.[^.]+|base_layer)$")
# Key spellings of the same adapter weight in saved files -> peft's.
_KEY_SPELLINGS = ((".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."),
                  (".lora_linear_layer.down.", ".lora_A."), (".lora_linear_layer.up.", ".lora_B."))


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """One adapter: its rank, alpha (the update is scaled by ``alpha / rank``) and the
    module-name suffixes it is attached to."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def target_name(module_name: str) -> str:
    """The module a LoRA wrapper part belongs to (``X.lora_A.default`` -> ``X``); other names
    are returned unchanged."""
    m = _WRAPPED.match(module_name)
    return m.group(1) if m else module_name


def is_adapter_layer(module_name: str) -> bool:
    return bool(re.search(r"\.lora_[AB]\.[^.]+$", module_name))


def has_lora(model: nn.Module) -> bool:
    return any(is_adapter_layer(name) for name, _ in model.named_modules())


def _lora_config(spec: LoraSpec, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=targets, init_lora_weights="gaussian")


def add_lora(denoiser: nn.Module, spec: LoraSpec, seed: int = 0) -> list[str]:
    """Attach fresh adapters (down: Gaussian from ``seed``, up: zeros, so the model is
    unchanged) to every module whose name ends in one of ``spec.targets``; returns the
    wrapped module names. Only the adapters are left trainable."""
    from peft import inject_adapter_in_model

    if spec.rank < 1:
        raise ConfigError(f"LoRA rank must be at least 1, got {spec.rank}")
    names = [n for n, m in denoiser.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    wrapped = [n for n in names if any(n == t or n.endswith("." + t) for t in spec.targets)]
    missing = [t for t in spec.targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        sample = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})[:12])
        raise ConfigError(f"LoRA targets {missing} match no Linear/Conv2d module of the denoiser; "
                          f"module names end in e.g. {sample}")
    torch.manual_seed(seed)  # peft draws the down projections from the global generator
    inject_adapter_in_model(_lora_config(spec, wrapped), denoiser, adapter_name=ADAPTER)
    for name, p in denoiser.named_parameters():
        p.requires_grad_(".lora_" in name)
    return wrapped


def adapter_state_dict(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights in peft's naming (``X.lora_A.weight``), without the base."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(denoiser, adapter_name=ADAPTER).items()}


def save_lora(denoiser: nn.Module, spec: LoraSpec, out_dir: str | Path, base_dir: str | Path,
              base_fingerprint: str) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers' LoRA file, loadable with
    ``pipeline.load_lora_weights``) and ``lora.json`` (the base, relative to ``out_dir`` when
    both are local paths)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(adapter_state_dict(denoiser))
    metadata = {"r": spec.rank, "lora_alpha": spec.alpha, "target_modules": sorted(
        {target_name(n) for n, _ in denoiser.named_modules() if is_adapter_layer(n)})}
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, weight_name=WEIGHTS_FILE,
                                              unet_lora_adapter_metadata=metadata)
    pointer = os.path.relpath(Path(base_dir).resolve(), out.resolve())  # model directories are local
    record = {"base": pointer, "base_fingerprint": base_fingerprint, **spec.to_json()}
    (out / LORA_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


@dataclasses.dataclass(frozen=True)
class LoraPointer:
    """The content of a LoRA directory's ``lora.json``."""

    base: Path
    base_fingerprint: str | None
    spec: LoraSpec


def is_lora_dir(path: str | Path) -> bool:
    root = Path(path)
    return (root / LORA_FILE).is_file() or (root / WEIGHTS_FILE).is_file()


def read_pointer(path: str | Path) -> LoraPointer:
    root = Path(path)
    file = root / LORA_FILE
    if not file.is_file():
        raise ModelLoadError(
            f"{root} holds LoRA weights ({WEIGHTS_FILE}) but no {LORA_FILE} naming the base model; write "
            f'{file} as {{"base": "<base pipeline directory>", "rank": R, "alpha": A, "targets": [...]}}')
    try:
        record = json.loads(file.read_text())
        base = Path(record["base"])
        spec = LoraSpec(rank=int(record["rank"]), alpha=float(record.get("alpha", record["rank"])),
                        targets=tuple(record.get("targets") or DEFAULT_TARGETS))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{file} is not a readable LoRA pointer ({exc}); it needs at least "
                             '"base" and "rank"') from exc
    return LoraPointer(base=base if base.is_absolute() else (root / base).resolve(),
                       base_fingerprint=record.get("base_fingerprint"), spec=spec)


def _peft_keys(state: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    others = sorted({key.split(".", 1)[0] for key in state if not key.startswith("unet.")})
    if others:
        raise ModelLoadError(f"{file} also adapts {', '.join(others)}; only UNet adapters are loaded, and without "
                             "the others the model would not be the one you fine-tuned. Merge those adapters into "
                             "the base and point lora.json at the merged pipeline")
    out = {}
    for key, value in state.items():
        key = key[len("unet."):]
        for old, new in _KEY_SPELLINGS:
            key = key.replace(old, new)
        out[key] = value
    return out


def load_lora(denoiser: nn.Module, lora_dir: str | Path, spec: LoraSpec) -> list[str]:
    """Attach the adapters saved in ``lora_dir`` to ``denoiser`` (frozen); returns the wrapped
    module names. Refuses a file whose adapters do not fit the denoiser."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(lora_dir) / WEIGHTS_FILE
    if not file.is_file():
        raise ModelLoadError(f"{lora_dir} has a {LORA_FILE} but no {WEIGHTS_FILE}")
    state = _peft_keys(load_file(str(file)), file)
    wrapped = sorted({k.split(".lora_", 1)[0] for k in state if ".lora_" in k})
    if not wrapped:
        raise ModelLoadError(f"{file} holds no UNet LoRA weights (keys under 'unet.' with lora_A/lora_B)")
    modules = dict(denoiser.named_modules())
    unknown = [n for n in wrapped if n not in modules]
    if unknown:
        raise ModelLoadError(f"{file} adapts modules the base denoiser does not have ({unknown[:3]}...): "
                             "it was trained on another base model")
    inject_adapter_in_model(_lora_config(spec, wrapped), denoiser, adapter_name=ADAPTER)
    result = set_peft_model_state_dict(denoiser, state, adapter_name=ADAPTER)
    bad = [k for k in getattr(result, "unexpected_keys", []) or [] if ".lora_" in k]
    if bad:
        raise ModelLoadError(f"{file} has adapter weights that do not fit the base: {bad[:3]}")
    shapes = {k: v.shape for k, v in state.items() if k.endswith("lora_A.weight")}
    ranks = {int(s[0]) for s in shapes.values()}
    if ranks != {spec.rank}:
        raise ModelLoadError(f"{file} has adapters of rank {sorted(ranks)} but {LORA_FILE} says {spec.rank}")
    denoiser.requires_grad_(False)
    return wrapped
