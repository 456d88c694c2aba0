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
import logging
from typing import Any, Protocol

import torch
from torch import nn

from attribution_core.errors import InputError, ModelLoadError
from attribution_core.models.lora import LoraSpec, has_lora

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TEXT_ENCODER = "text_encoder"
"""Prefix of the text encoder's layers among the tracked ones (``text_encoder.text_model...``)."""


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
        *,
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
        return self.text_states(self.tokenize(captions))

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids ``Tensor[B, S]`` int64 on the model's device."""
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return tokens.input_ids.to(self.device)

    def text_states(self, ids: torch.Tensor) -> torch.Tensor:
        """The text encoder's last hidden states ``Tensor[B, S, D]`` of token ids (under the
        caller's grad mode: differentiated when its layers are tracked)."""
        return self.text_encoder(ids)[0]

    @property
    def tracks_text_encoder(self) -> bool:
        """Whether the text encoder carries LoRA adapters, whose layers are then tracked too."""
        return self.text_encoder is not None and has_lora(self.text_encoder)

    def tracked_model(self) -> nn.Module:
        """The module whose Linear/Conv2d layers may be tracked: the denoiser, under its own
        layer names; with a LoRA on the text encoder, a view holding the denoiser's modules
        under the same names and the text encoder's under ``text_encoder.``."""
        if not self.tracks_text_encoder:
            return self.denoiser
        view = nn.Module()
        for name, child in self.denoiser.named_children():
            view.add_module(name, child)
        view.add_module(TEXT_ENCODER, self.text_encoder)
        return view

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
        if self.lora is not None:  # which modules are adapted shows in the weights' names
            parts["lora"] = {"rank": self.lora.rank, "alpha": self.lora.alpha}
            if self.lora.text_encoder is not None:
                parts["lora"]["text_encoder"] = {"rank": self.lora.text_encoder.rank,
                                                 "alpha": self.lora.text_encoder.alpha}
        if self.variants:  # an fp16 copy is another model than its fp32 original
            parts["variants"] = dict(sorted(self.variants.items()))
        return parts
