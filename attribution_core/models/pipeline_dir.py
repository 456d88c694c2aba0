"""Model directories: saving components as a diffusers pipeline directory and loading one
(or a LoRA fine-tune of one, or its fp16 / bf16 weight variant) as a ``DiffusersAdapter``.

Supported layouts (``save_pretrained`` / ``from_pretrained``; nothing downloaded) are listed
in ``attribution_core.models.adapters``; a LoRA directory is described in
``attribution_core.models.lora``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attribution_core.errors import ModelLoadError
from attribution_core.models.adapters import DiffusersAdapter
from attribution_core.models.fingerprint import model_fingerprint
from attribution_core.models.lora import is_lora_dir, load_lora, read_pointer

log = logging.getLogger(__name__)

_TRANSFORMERS_COMPONENTS = ("text_encoder", "tokenizer")


def save_pipeline(components: dict[str, Any], out_dir: str | Path, variant: str | None = None) -> Path:
    """Save model components (``unet``, ``scheduler``, optionally ``text_encoder``,
    ``tokenizer``, ``vae``) as a diffusers pipeline directory with its ``model_index.json``;
    ``variant`` ("fp16") stores the weights in half precision under that variant's file names,
    as Stable Diffusion checkpoints are usually kept (the modules are converted in place)."""
    import diffusers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline_class = "StableDiffusionPipeline" if "text_encoder" in components else "DDPMPipeline"
    index: dict[str, Any] = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__}
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if variant is not None and variant not in half:
        raise ValueError(f"variant must be one of {', '.join(half)}, got {variant!r}")
    for name, component in components.items():
        if variant is not None and isinstance(component, nn.Module):
            component.to(half[variant]).save_pretrained(out / name, variant=variant)
        else:
            component.save_pretrained(out / name)
        library = "transformers" if name in _TRANSFORMERS_COMPONENTS else "diffusers"
        index[name] = [library, type(component).__name__]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def is_model_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a model ``load_adapter`` can open (a pipeline or a LoRA)."""
    root = Path(path)
    return (root / "unet" / "config.json").is_file() or is_lora_dir(root)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def load_adapter(path: str | Path, device: str | torch.device = "cpu", base: str | Path | None = None) -> DiffusersAdapter:
    """Load a model directory in a diffusers pipeline layout (see module doc), or a LoRA
    fine-tune of one (``pytorch_lora_weights.safetensors``, on the pipeline directory ``base``
    or the one its optional ``lora.json`` names), onto ``device``."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(
            f"model directory {root} does not exist; build one with `attribution demo` or point "
            "--model at a diffusers pipeline directory (model_index.json, unet/, scheduler/, ...)"
        )
    if is_lora_dir(root) and not (root / "unet").is_dir():
        adapter = _load_lora_model(root, None if base is None else Path(base))
    else:
        adapter = _load_pipeline(root)
    _read_training_record(adapter, root)
    log.info("loaded %s (%s conditioning%s) from %s", type(adapter.denoiser).__name__, adapter.conditioning,
             f", LoRA rank {adapter.lora.rank}" if adapter.lora else "", root)
    return adapter.to(device)


def _load_pipeline(root: Path) -> DiffusersAdapter:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel

    unet_dir = root / "unet"
    if not (unet_dir / "config.json").is_file():
        raise ModelLoadError(f"{root} has no unet/config.json: not a diffusers pipeline directory")
    if not (root / "scheduler").is_dir():
        raise ModelLoadError(f"{root} has no scheduler/ folder; save the training noise scheduler there")
    unet_class = _read_json(unet_dir / "config.json").get("_class_name")
    classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    if unet_class not in classes:
        raise ModelLoadError(
            f"{unet_dir} holds a {unet_class!r}; supported denoisers are {', '.join(classes)}"
        )
    variants: dict[str, str] = {}

    def weights(folder: Path) -> dict[str, str | None]:
        """from_pretrained arguments: the stored variant (fp16 / bf16 copies as users keep
        them) where there is no plain file, upcast to float32 so every sum accumulates in it."""
        variant = stored_variant(folder)
        if variant:
            variants[folder.name] = variant
        return {"variant": variant}

    unet = classes[unet_class].from_pretrained(unet_dir, torch_dtype=torch.float32, **weights(unet_dir))
    scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    text_encoder = tokenizer = vae = None
    if unet_class == "UNet2DConditionModel":
        from transformers import CLIPTextModel, CLIPTokenizer

        for sub in ("text_encoder", "tokenizer"):
            if not (root / sub).is_dir():
                raise ModelLoadError(f"{root} has a text-conditioned UNet but no {sub}/ folder")
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=torch.float32,
                                                     **weights(root / "text_encoder"))
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    if (root / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32, **weights(root / "vae"))
    adapter = DiffusersAdapter(unet, scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
    adapter.variants = variants
    return adapter


_WEIGHT_FILE = re.compile(r"^(?:diffusion_pytorch_model|model)(?:\.(?P<variant>[A-Za-z0-9_-]+))?"
                          r"\.(?:safetensors|bin)(?:\.index\.json)?$")


def stored_variant(folder: Path) -> str | None:
    """The weights variant of a component folder: None when it holds the plain file
    (``diffusion_pytorch_model.safetensors``, ``model.safetensors``, or their shard index),
    else the one variant it holds (``...fp16.safetensors`` -> "fp16")."""
    found = {m.group("variant") for f in folder.iterdir() if (m := _WEIGHT_FILE.match(f.name))}
    if None in found or not found:
        return None
    if len(found) > 1:
        raise ModelLoadError(f"{folder} holds weights in several variants ({', '.join(sorted(found))}) and no plain "
                             "file; keep the one to attribute")
    return found.pop()


def _load_lora_model(root: Path, base: Path | None) -> DiffusersAdapter:
    """The base pipeline (``base``, else the one ``lora.json`` names) with the adapters attached."""
    pointer = read_pointer(root)
    chosen = base or pointer.base
    if chosen is None:
        raise ModelLoadError(f"{root} holds LoRA weights; name the base pipeline directory they were trained on "
                             "with model.base in the config (or --base), e.g. your Stable Diffusion 1.5 folder")
    where = "model.base (--base)" if base is not None else f'"base" in {root}/lora.json'
    if not chosen.is_dir() or is_lora_dir(chosen) and not (chosen / "unet").is_dir():
        what = "does not exist" if not chosen.is_dir() else "is itself a LoRA directory (merge it first)"
        raise ModelLoadError(f"the base model of the LoRA at {root}, {chosen}, {what}; fix {where}")
    adapter = _load_pipeline(chosen)
    _read_training_record(adapter, chosen)
    if pointer.base_fingerprint and model_fingerprint(adapter) != pointer.base_fingerprint:
        raise ModelLoadError(f"the base model at {chosen} is not the one the LoRA at {root} was trained on "
                             f"(its fingerprint differs from the one in lora.json); fix {where} to name the "
                             "original base model")
    adapter.lora = load_lora(adapter.denoiser, adapter.text_encoder, root, pointer.spec)
    return adapter


def _read_training_record(adapter: DiffusersAdapter, root: Path) -> None:
    """Class names and caption words of a model trained here (its ``training.json``)."""
    if not (root / "training.json").is_file():
        return
    record = _read_json(root / "training.json")
    if record.get("label_names") is not None:
        adapter.label_names = record.get("label_names")
    if adapter.conditioning == "text" and record.get("words") is not None:
        adapter.vocabulary = frozenset(record["words"])
    template = (record.get("recipe") or {}).get("caption_template")
    if template is not None:
        adapter.caption_template = template
