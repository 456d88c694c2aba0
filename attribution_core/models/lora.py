"""LoRA fine-tunes: adapters on a base pipeline, saved and loaded the way diffusers does it.

A LoRA model directory holds ``pytorch_lora_weights.safetensors``: the adapter weights of the
denoiser under the ``unet.`` prefix and, for a fine-tune that also trained the text encoder
(diffusers' ``--train_text_encoder``), of the text encoder under ``text_encoder.``, as
``StableDiffusionPipeline.save_lora_weights`` writes them and diffusers' training scripts
(``train_text_to_image_lora.py``, ``train_dreambooth_lora.py``) leave them. Rank comes from
the weights' shapes; alpha from the file's adapter metadata, or its ``.alpha`` entries, or
else equals the rank (diffusers' convention: a scale of 1).

The base pipeline is named by the caller (``model.base``, ``--base``) or by ``lora.json``, the
optional record this project writes next to the adapters it trains (base directory, base
fingerprint, rank, alpha, targets). When the record has a base fingerprint, a base that does
not match it is refused.

Adapters are injected with peft (``inject_adapter_in_model``), as diffusers' own LoRA
support does, into the denoiser and the text encoder alike. With peft, a target ``X``
becomes ``X.base_layer`` (the frozen original) plus the adapter's down and up projections
``X.lora_A.<name>`` and ``X.lora_B.<name>``: plain ``nn.Linear`` / ``nn.Conv2d`` modules,
which the Kronecker capture tracks like any other layer.
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
    text_encoder: LoraSpec | None = None
    """The text encoder's adapter, when the fine-tune trained one too."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}
        if self.text_encoder is not None:
            out["text_encoder"] = self.text_encoder.to_json()
        return out


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
              *, base_fingerprint: str) -> Path:
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
    """What ``lora.json`` (optional) records: the base pipeline, its fingerprint and the
    adapter's settings."""

    base: Path | None
    base_fingerprint: str | None
    spec: LoraSpec | None


def is_lora_dir(path: str | Path) -> bool:
    root = Path(path)
    return (root / LORA_FILE).is_file() or (root / WEIGHTS_FILE).is_file()


def read_pointer(path: str | Path) -> LoraPointer:
    """The directory's ``lora.json``, or an empty pointer when it has none."""
    root = Path(path)
    file = root / LORA_FILE
    if not file.is_file():
        return LoraPointer(base=None, base_fingerprint=None, spec=None)
    try:
        record = json.loads(file.read_text())
        base = Path(record["base"]) if record.get("base") else None
        spec = None
        if "rank" in record:
            spec = LoraSpec(rank=int(record["rank"]), alpha=float(record.get("alpha", record["rank"])),
                            targets=tuple(record.get("targets") or DEFAULT_TARGETS))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{file} is not a readable LoRA record ({exc}); it is optional: delete it and name "
                             "the base pipeline with model.base (--base), or fix it") from exc
    if base is not None and not base.is_absolute():
        base = (root / base).resolve()
    return LoraPointer(base=base, base_fingerprint=record.get("base_fingerprint"), spec=spec)


COMPONENTS = {"unet": "denoiser", "text_encoder": "text encoder"}
_ALPHA_SUFFIX = ".alpha"


@dataclasses.dataclass(frozen=True)
class LoraFile:
    """A diffusers LoRA file split by component: ``{"unet" | "text_encoder": {peft key: tensor}}``
    plus each component's alpha when the file records one."""

    path: Path
    states: dict[str, dict[str, torch.Tensor]]
    alphas: dict[str, float]
    declared_targets: dict[str, tuple[str, ...]]

    def spec(self, component: str) -> LoraSpec:
        """Rank (from the down projections' shapes), alpha and adapted modules of one component."""
        state = self.states[component]
        ranks = {int(v.shape[0]) for k, v in state.items() if ".lora_A." in k and k.endswith(".weight")}
        if len(ranks) != 1:
            raise ModelLoadError(f"{self.path}: the {COMPONENTS[component]} adapters have ranks {sorted(ranks)}; "
                                 "adapters of one rank per component are supported (as diffusers' scripts train)")
        rank = ranks.pop()
        targets = self.declared_targets.get(component) or tuple(sorted(_adapted_modules(state)))
        return LoraSpec(rank=rank, alpha=self.alphas.get(component, float(rank)), targets=targets)


def _adapted_modules(state: dict[str, torch.Tensor]) -> set[str]:
    return {k.split(".lora_", 1)[0] for k in state if ".lora_" in k}


def _metadata(file: Path) -> dict[str, Any]:
    """The adapter metadata diffusers writes into the file's header (``lora_adapter_metadata``:
    ``{"unet.r": .., "unet.lora_alpha": .., "unet.target_modules": [..], ...}``)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        header = f.metadata() or {}
    raw = header.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{file}: its lora_adapter_metadata header is not JSON ({exc})") from exc


def read_lora_file(lora_dir: str | Path) -> LoraFile:
    """Read ``pytorch_lora_weights.safetensors`` of a LoRA directory into peft's key spelling,
    per component; refuses adapters of components this system does not load."""
    from safetensors.torch import load_file

    file = Path(lora_dir) / WEIGHTS_FILE
    if not file.is_file():
        raise ModelLoadError(f"{lora_dir} holds no {WEIGHTS_FILE}: not a LoRA directory as diffusers saves one")
    raw = load_file(str(file))
    others = sorted({key.split(".", 1)[0] for key in raw if key.split(".", 1)[0] not in COMPONENTS})
    if others:
        raise ModelLoadError(
            f"{file} has weights under {', '.join(others)}; LoRA files of Stable Diffusion 1.x/2.x pipelines are "
            "loaded (keys under unet. and text_encoder., as StableDiffusionPipeline.save_lora_weights writes them). "
            "Convert other layouts (e.g. kohya's lora_unet_...) with diffusers first")
    metadata = _metadata(file)
    states: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, value in raw.items():
        component, rest = key.split(".", 1)
        if rest.endswith(_ALPHA_SUFFIX):  # a network alpha (kohya-style conversions keep them)
            found = alphas.setdefault(component, float(value))
            if found != float(value):
                raise ModelLoadError(f"{file}: the {COMPONENTS[component]} adapters have several alphas; one "
                                     "alpha per component is supported")
            continue
        for old, new in _KEY_SPELLINGS:
            rest = rest.replace(old, new)
        states.setdefault(component, {})[rest] = value
    declared: dict[str, tuple[str, ...]] = {}
    for component in states:
        if f"{component}.lora_alpha" in metadata:
            alphas[component] = float(metadata[f"{component}.lora_alpha"])
        if metadata.get(f"{component}.target_modules"):
            declared[component] = tuple(sorted(metadata[f"{component}.target_modules"]))
    if "unet" not in states:
        raise ModelLoadError(f"{file} holds no denoiser adapters (keys under 'unet.' with lora_A/lora_B or "
                             "lora.down/lora.up)")
    return LoraFile(path=file, states=states, alphas=alphas, declared_targets=declared)


def attach(module: nn.Module, state: dict[str, torch.Tensor], spec: LoraSpec, what: str, *, file: Path) -> list[str]:
    """Inject adapters of ``spec`` into ``module`` where ``state`` has weights and load them
    (frozen); returns the wrapped module names."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    wrapped = sorted(_adapted_modules(state))
    modules = dict(module.named_modules())
    unknown = [n for n in wrapped if n not in modules]
    if unknown:
        raise ModelLoadError(f"{file} adapts modules the base {what} does not have ({unknown[:3]}...): it was "
                             "trained on another base model; name the base it was trained on with model.base")
    inject_adapter_in_model(_lora_config(spec, wrapped), module, adapter_name=ADAPTER)
    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    bad = [k for k in getattr(result, "unexpected_keys", []) or [] if ".lora_" in k]
    if bad:
        raise ModelLoadError(f"{file} has {what} adapter weights that do not fit the base: {bad[:3]}")
    module.requires_grad_(False)
    return wrapped


def load_lora(denoiser: nn.Module, text_encoder: nn.Module | None, lora_dir: str | Path,
              declared: LoraSpec | None = None) -> LoraSpec:
    """Attach the adapters saved in ``lora_dir`` to ``denoiser`` (and ``text_encoder`` when
    the file adapts it), frozen; returns their spec. ``declared`` (from ``lora.json``) must
    agree with the file's rank."""
    lora = read_lora_file(lora_dir)
    spec = lora.spec("unet")
    if declared is not None:
        if declared.rank != spec.rank:
            raise ModelLoadError(f"{lora.path} has adapters of rank {spec.rank} but {LORA_FILE} says {declared.rank}")
        spec = dataclasses.replace(spec, alpha=declared.alpha, targets=declared.targets)
    attach(denoiser, lora.states["unet"], spec, "denoiser", file=lora.path)
    if "text_encoder" in lora.states:
        if text_encoder is None:
            raise ModelLoadError(f"{lora.path} adapts a text encoder but the base model has none: it was trained "
                                 "on another base model")
        text_spec = lora.spec("text_encoder")
        attach(text_encoder, lora.states["text_encoder"], text_spec, "text encoder", file=lora.path)
        spec = dataclasses.replace(spec, text_encoder=text_spec)
    return spec
