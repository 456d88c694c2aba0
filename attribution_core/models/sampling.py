"""Sampling images from a model, reproducibly.

Image ``i`` of a call with ``seed`` starts from noise drawn from the generator of
``("generate", seed, i)`` (and DDPM's per-step noise from the same generator), so any image
can be regenerated from its (prompt, seed, index, guidance, steps, scheduler) whatever the
batch it was made in. Classifier-free guidance mixes the empty-prompt and prompted
predictions: ``eps = eps_u + g (eps_c - eps_u)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from attribution_core.data.images import to_uint8
from attribution_core.errors import ConfigError, InputError
from attribution_core.seeding import generator_for
from attribution_core.models.adapters import DiffusersAdapter

SCHEDULERS = ("ddim", "ddpm")


@dataclasses.dataclass(frozen=True)
class Generated:
    image: np.ndarray  # uint8 [H, W, C]
    prompt: str | None
    label: int | None
    seed: int
    index: int


def _sampler(adapter: DiffusersAdapter, name: str, steps: int):
    from diffusers import DDIMScheduler, DDPMScheduler

    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls = DDIMScheduler if name == "ddim" else DDPMScheduler
    sched = cls.from_config(adapter.scheduler.config)
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def generate(
    adapter: DiffusersAdapter,
    *, prompts: list[str] | None = None,
    labels: list[int] | None = None,
    n: int = 1,
    seed: int = 0,
    guidance: float = 3.0,
    steps: int = 30,
    scheduler: str = "ddim",
    first_index: int = 0,
) -> list[Generated]:
    """``n`` images (indices ``first_index ...``); image ``i`` uses ``prompts[i % len]``
    (text models) or ``labels[i % len]`` (class models)."""
    if n < 1 or steps < 1:
        raise ConfigError(f"n and steps must be >= 1, got n={n}, steps={steps}")
    if adapter.conditioning == "text" and not prompts:
        raise InputError("this model is text-conditioned: give at least one prompt")
    if adapter.conditioning == "class" and not labels:
        raise InputError("this model is class-conditional: give at least one label")
    device = adapter.device
    sched = _sampler(adapter, scheduler, steps)
    unet = adapter.denoiser
    shape = (unet.config.in_channels, *(
        (unet.config.sample_size,) * 2 if isinstance(unet.config.sample_size, int) else unet.config.sample_size))
    indices = list(range(first_index, first_index + n))
    gens = [generator_for("generate", seed, i) for i in indices]
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device) * sched.init_noise_sigma
    cond: dict[str, torch.Tensor] = {}
    uncond: dict[str, torch.Tensor] | None = None
    row_prompts = [prompts[i % len(prompts)] for i in range(n)] if prompts else None
    row_labels = [labels[i % len(labels)] for i in range(n)] if labels else None
    if adapter.conditioning == "text":
        tok = adapter.tokenizer

        def encode(texts: list[str]) -> torch.Tensor:
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            return adapter.text_encoder(ids)[0]

        cond["encoder_hidden_states"] = encode(row_prompts)
        uncond = {"encoder_hidden_states": encode([""] * n)}
    elif adapter.conditioning == "class":
        cond["class_labels"] = torch.tensor(row_labels, device=device)
    use_cfg = uncond is not None and guidance != 1.0
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        if use_cfg:
            both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
            eps_u, eps_c = unet(torch.cat([inp, inp]), t, **both, return_dict=False)[0].chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = unet(inp, t, **cond, return_dict=False)[0]
        x = sched.step(eps, t, x, generator=gens if scheduler == "ddpm" else None).prev_sample
    if adapter.vae is not None:
        shift = getattr(adapter.vae.config, "shift_factor", None) or 0.0
        x = adapter.vae.decode(x / adapter.vae.config.scaling_factor + shift).sample
    pixels = x.clamp(-1, 1).float().cpu().numpy()
    return [
        Generated(to_uint8(pixels[j]), row_prompts[j] if row_prompts else None,
                  row_labels[j] if row_labels else None, seed, indices[j])
        for j in range(n)
    ]
