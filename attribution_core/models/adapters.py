"""Model adapters: one interface over the diffusers models the featurizer attributes.

An adapter owns the denoiser, its noise scheduler and whatever turns an example into the
denoiser's inputs (a VAE for latent models, a text encoder for captions). It validates
batches before any work is done, so bad input raises a named error instead of producing a
silently wrong feature.

Supported directory layouts (``save_pretrained`` / ``from_pretrained``; nothing downloaded):

- ``UNet2DModel`` + scheduler (DDPM pipeline layout): pixel space, unconditional, or
  class-conditional when the UNet has ``num_class_embeds``.
- ``UNet2DConditionModel`` + ``CLIPTextModel`` + ``CLIPTokenizer`` + scheduler, optionally
  + ``AutoencoderKL``: the Stable Diffusion pipeline layout (pixel space without ``vae/``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from attribution_core.errors import InputError, ModelLoadError
from attribution_core.models.lora import LoraSpec, is_lora_dir, load_lora, read_pointer

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclasses.dataclass(frozen=True)
class ExampleBatch:
    """Examples to featurize.

    ``pixels`` is ``Tensor[B, C, H, W]`` float32 in [-1, 1] at the model's resolution;
    ``captions`` (text models) and ``labels`` (class-conditional models, ``Tensor[B]``
    int64) are per example. ``example_ids`` key all randomness.
    """

    example_ids: tuple[str, ...]
    pixels: torch.Tensor
    captions: tuple[str | None, ...] | None = None
    labels: torch.Tensor | None = None
    contrast_captions: tuple[str, ...] | None = None
    """Query side only (text models): each example's prompt with one concept's words removed.
    When given, the measurement becomes Concept-TRAK's contrast (``measurement.contrast``)."""

    def __len__(self) -> int:
        return len(self.example_ids)

    def select(self, start: int, stop: int) -> ExampleBatch:
        return ExampleBatch(
            example_ids=self.example_ids[start:stop],
            pixels=self.pixels[start:stop],
            captions=None if self.captions is None else self.captions[start:stop],
            labels=None if self.labels is None else self.labels[start:stop],
            contrast_captions=None if self.contrast_captions is None else self.contrast_captions[start:stop],
        )


@dataclasses.dataclass
class Encoded:
    """Clean denoiser inputs of a batch: ``x0`` ``Tensor[B, *sample_shape]`` and per-example
    conditioning keyword arguments of the denoiser, each with leading dim B."""

    x0: torch.Tensor
    cond: dict[str, torch.Tensor]


class ModelAdapter(Protocol):
    """What the featurizer needs from a diffusion model."""

    denoiser: nn.Module
    scheduler: Any
    conditioning: str  # "none" | "class" | "text"
    image_shape: tuple[int, int, int]  # (C, H, W) of the pixels it accepts

    @property
    def device(self) -> torch.device: ...

    def check(self, batch: ExampleBatch) -> None: ...

    def encode(self, batch: ExampleBatch) -> Encoded: ...

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def fingerprint_config(self) -> dict[str, Any]: ...


def _sample_size(config: Any) -> tuple[int, int]:
    size = config.sample_size
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


class DiffusersAdapter:
    """Adapter for diffusers UNets (pixel or latent space; none / class / text conditioning)."""

    def __init__(
        self,
        denoiser: nn.Module,
        scheduler: Any,
        text_encoder: nn.Module | None = None,
        tokenizer: Any | None = None,
        vae: nn.Module | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.label_names: list[str] | None = None  # class names of a class-conditional model, if known
        self.vocabulary: frozenset[str] | None = None  # words of a text model's training captions, if known
        self.caption_template: str | None = None  # the grammar of its partial training captions, if any
        self.lora: LoraSpec | None = None  # the adapter of a LoRA fine-tune (its base is the rest)
        self.variants: dict[str, str] = {}  # component -> stored weights variant (fp16, ...), upcast on load
        cls = type(denoiser).__name__
        if cls == "UNet2DConditionModel":
            if text_encoder is None or tokenizer is None:
                raise ModelLoadError(
                    "a UNet2DConditionModel needs a text encoder and a tokenizer "
                    "(text_encoder/ and tokenizer/ in the model directory)"
                )
            self.conditioning = "text"
        elif getattr(denoiser.config, "num_class_embeds", None):
            self.conditioning = "class"
        else:
            self.conditioning = "none"
        prediction = scheduler.config.prediction_type
        if prediction not in PREDICTION_TYPES:
            raise ModelLoadError(
                f"scheduler prediction_type {prediction!r} is not supported; "
                f"expected one of {', '.join(PREDICTION_TYPES)}"
            )
        h, w = _sample_size(denoiser.config)
        if vae is not None:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            self.image_shape = (int(vae.config.in_channels), h * factor, w * factor)
        else:
            self.image_shape = (int(denoiser.config.in_channels), h, w)
        for module in (denoiser, text_encoder, vae):
            if module is not None:
                module.eval()
                module.requires_grad_(False)
        # Recomputing activations in backward would fire the capture hooks twice.
        if getattr(denoiser, "is_gradient_checkpointing", False):
            denoiser.disable_gradient_checkpointing()

    # ----------------------------------------------------------------------- placement
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device: str | torch.device) -> DiffusersAdapter:
        for module in (self.denoiser, self.text_encoder, self.vae):
            if module is not None:
                module.to(device)
        return self

    # ----------------------------------------------------------------------- input checks
    def check(self, batch: ExampleBatch) -> None:
        """Raise InputError, naming the examples, for anything the model cannot take."""
        n = len(batch.example_ids)
        if n == 0:
            raise InputError("the batch is empty")
        px = batch.pixels
        if not isinstance(px, torch.Tensor) or px.dim() != 4:
            shape = tuple(px.shape) if isinstance(px, torch.Tensor) else type(px).__name__
            raise InputError(f"pixels must be a Tensor[B, C, H, W], got {shape}")
        if px.shape[0] != n:
            raise InputError(f"{n} example ids but {px.shape[0]} images in the batch")
        if tuple(px.shape[1:]) != self.image_shape:
            c, h, w = self.image_shape
            raise InputError(
                f"images have shape (C, H, W) = {tuple(px.shape[1:])} but the model expects "
                f"{self.image_shape}: decode to {c} channel(s) and resize to {h}x{w} "
                f"(examples {list(batch.example_ids[:3])}...)"
            )
        if not px.is_floating_point():
            raise InputError(f"pixels must be floating point in [-1, 1], got {px.dtype}")
        finite = torch.isfinite(px.flatten(1)).all(1)
        if not bool(finite.all()):
            bad = [batch.example_ids[i] for i in torch.nonzero(~finite).flatten().tolist()]
            raise InputError(f"images contain NaN or Inf values: examples {bad}")
        if self.conditioning == "text":
            if batch.captions is None:
                raise InputError(
                    "this model is text-conditioned but the batch has no captions; "
                    "provide a caption column (an empty string means the unconditional prompt)"
                )
            if len(batch.captions) != n:
                raise InputError(f"{n} examples but {len(batch.captions)} captions")
            missing = [i for i, c in zip(batch.example_ids, batch.captions) if not isinstance(c, str)]
            if missing:
                raise InputError(f"missing caption for examples {missing} of a text-conditioned model")
        if batch.contrast_captions is not None and (self.conditioning != "text" or len(batch.contrast_captions) != n):
            raise InputError("contrast captions need a text-conditioned model and one per example")
        if self.conditioning == "class":
            if batch.labels is None:
                raise InputError(
                    "this model is class-conditional but the batch has no labels; "
                    "provide an integer label per example"
                )
            labels = batch.labels
            num = int(self.denoiser.config.num_class_embeds)
            if labels.shape != (n,) or labels.is_floating_point():
                raise InputError(f"labels must be an integer Tensor[{n}], got {labels.dtype} {tuple(labels.shape)}")
            out = (labels < 0) | (labels >= num)
            if bool(out.any()):
                bad = [batch.example_ids[i] for i in torch.nonzero(out).flatten().tolist()]
                raise InputError(f"labels outside [0, {num}) for examples {bad}")

    # ----------------------------------------------------------------------- model calls
    @torch.no_grad()
    def encode(self, batch: ExampleBatch) -> Encoded:
        device = self.device
        x0 = self.encode_pixels(batch.pixels.to(device=device, dtype=torch.float32))
        cond: dict[str, torch.Tensor] = {}
        if self.conditioning == "text":
            cond["encoder_hidden_states"] = self.encode_text(list(batch.captions))  # [B, S, D]
        elif self.conditioning == "class":
            cond["class_labels"] = batch.labels.to(device)  # [B]
        return Encoded(x0=x0, cond=cond)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Clean denoiser samples of images in [-1, 1]: the VAE's scaled posterior mean
        (deterministic) for a latent model, the pixels themselves otherwise."""
        if self.vae is None:
            return pixels
        latents = self.vae.encode(pixels).latent_dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Text encoder states ``Tensor[B, S, D]`` of ``captions``."""
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.denoiser(x_t, t, **cond, return_dict=False)[0]

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        prediction = self.scheduler.config.prediction_type
        if prediction == "epsilon":
            return noise
        if prediction == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return x0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model (0 for others)."""
        return int(getattr(self.denoiser.config, "num_class_embeds", None) or 0) if self.conditioning == "class" else 0

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def fingerprint_config(self) -> dict[str, Any]:
        """Configs that, with the weights, decide the features (for model fingerprints)."""
        parts = {"denoiser": dict(self.denoiser.config), "scheduler": dict(self.scheduler.config)}
        if self.vae is not None:
            parts["vae"] = dict(self.vae.config)
        if self.text_encoder is not None:
            parts["text_encoder"] = self.text_encoder.config.to_dict()
        if self.lora is not None:
            parts["lora"] = self.lora.to_json()
        if self.variants:  # an fp16 copy is another model than its fp32 original
            parts["variants"] = dict(sorted(self.variants.items()))
        return parts


# --------------------------------------------------------------------------- saving and loading

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
    return (root / "unet" / "config.json").is_file() or (root / "lora.json").is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def load_adapter(path: str | Path, device: str | torch.device = "cpu") -> DiffusersAdapter:
    """Load a model directory in a diffusers pipeline layout (see module doc), or a LoRA
    fine-tune of one (``lora.json`` + ``pytorch_lora_weights.safetensors``), onto ``device``."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(
            f"model directory {root} does not exist; build one with `attribution demo` or point "
            "--model at a diffusers pipeline directory (model_index.json, unet/, scheduler/, ...)"
        )
    if is_lora_dir(root) and not (root / "unet").is_dir():
        adapter = _load_lora_model(root)
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

    def weights(folder: Path) -> dict[str, Any]:
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
    adapter = DiffusersAdapter(unet, scheduler, text_encoder, tokenizer, vae)
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


def _load_lora_model(root: Path) -> DiffusersAdapter:
    """The base pipeline the LoRA directory points at, with its adapters attached."""
    from attribution_core.models.fingerprint import model_fingerprint

    pointer = read_pointer(root)
    if not pointer.base.is_dir() or is_lora_dir(pointer.base) and not (pointer.base / "unet").is_dir():
        what = "does not exist" if not pointer.base.is_dir() else "is itself a LoRA directory (merge it first)"
        raise ModelLoadError(f"the base model of the LoRA at {root}, {pointer.base}, {what}; fix \"base\" in "
                             f"{root}/lora.json")
    adapter = _load_pipeline(pointer.base)
    _read_training_record(adapter, pointer.base)
    if pointer.base_fingerprint and model_fingerprint(adapter) != pointer.base_fingerprint:
        raise ModelLoadError(f"the base model at {pointer.base} is not the one the LoRA at {root} was trained on "
                             "(its fingerprint differs); point lora.json's \"base\" at the original base model")
    load_lora(adapter.denoiser, root, pointer.spec)
    adapter.lora = pointer.spec
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
