"""Training recipe of the small diffusion models this project attributes.

``train_model(data, cfg)`` is a pure function of (dataset subset, recipe, seed): weights are
initialised from ``cfg.seed`` and every batch, timestep, noise sample and caption dropout
comes from one generator seeded from it, so the evaluation can retrain the same recipe on
many random subsets in parallel and get the same model twice.

Objective: DDPM noise prediction (or v-prediction) with Min-SNR-gamma weighting (Hang et
al. 2023), AdamW with linear warm-up and cosine decay, gradient clipping at 1, and an EMA
of the weights (the EMA weights are what is saved). Text models train a small CLIP text
encoder jointly with the UNet; captions are dropped to the empty prompt with probability
``caption_dropout`` so that classifier-free guidance works.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from attribution_core.config import TrainConfig
from attribution_core.data.captions import PartialCaptions, template_words
from attribution_core.data.loading import TrainingData
from attribution_core.errors import ConfigError, InputError
from attribution_core.models.adapters import DiffusersAdapter
from attribution_core.models.fingerprint import model_fingerprint
from attribution_core.models.lora import LoraSpec, add_lora
from attribution_core.models.pipeline_dir import load_adapter
from attribution_core.models.tiny import text_encoder_for, unet2d, unet_cond, word_tokenizer
from attribution_core.models.vocabulary import caption_vocabulary
from attribution_core.seeding import stable_seed

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainedModel:
    adapter: DiffusersAdapter
    losses: list[float]
    seconds: float
    cfg: TrainConfig
    trainable_parameters: int = 0
    base_fingerprint: str | None = None
    """For a LoRA fine-tune: the fingerprint of the base it was trained on."""


def _scheduler(cfg: TrainConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type)


def build_untrained(data: TrainingData, cfg: TrainConfig) -> DiffusersAdapter:
    """Freshly initialised modules for ``cfg`` (weights from ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)  # diffusers/transformers initialise from the global RNG
    scheduler = _scheduler(cfg)
    if cfg.conditioning == "text":
        if data.captions is None:
            raise InputError("train.conditioning is 'text' but the dataset has no caption column; "
                             "set train.caption_column or use conditioning 'none' / 'class'")
        words = caption_vocabulary([*data.captions, template_words(cfg.caption_template or "")])
        tokenizer = word_tokenizer(words, max_length=cfg.max_caption_tokens)
        text_encoder = text_encoder_for(tokenizer, cfg.text_width, cfg.text_layers)
        unet = unet_cond(cfg.resolution, cfg.channels, cfg.text_width, tuple(cfg.widths),
                         layers_per_block=cfg.layers_per_block,
                         text_in_time=cfg.text_in_time)
        adapter = DiffusersAdapter(unet, scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
    else:
        classes = None
        if cfg.conditioning == "class":
            if data.labels is None or not data.label_names:
                raise InputError(f"train.conditioning is 'class' but no labels were read from {cfg.label_column!r}")
            classes = len(data.label_names)
        unet = unet2d(cfg.resolution, cfg.channels, classes, tuple(cfg.widths), layers_per_block=cfg.layers_per_block)
        adapter = DiffusersAdapter(unet, scheduler)
    adapter.label_names = data.label_names
    if cfg.conditioning == "text":
        adapter.vocabulary = frozenset(words)
    return adapter


def lora_base(data: TrainingData, cfg: TrainConfig) -> tuple[DiffusersAdapter, str]:
    """The base model of a LoRA recipe with fresh adapters (seeded from ``cfg.seed``) and
    the base's fingerprint; refuses data or settings the base cannot take."""
    adapter = load_adapter(cfg.base)
    if adapter.lora is not None:
        raise ConfigError(f"train.base: {cfg.base} is itself a LoRA fine-tune; fine-tune its base pipeline instead")
    expected = (cfg.channels, cfg.resolution, cfg.resolution)
    if adapter.image_shape != expected:
        c, h, _ = adapter.image_shape
        raise ConfigError(f"train.resolution/channels give images of {expected} but the base model at {cfg.base} "
                          f"takes {adapter.image_shape}: set resolution: {h} and channels: {c}")
    if adapter.conditioning != cfg.conditioning:
        raise ConfigError(f"train.conditioning is {cfg.conditioning!r} but the base model at {cfg.base} is "
                          f"{adapter.conditioning!r}-conditioned; set conditioning: {adapter.conditioning}")
    if cfg.conditioning == "class" and adapter.label_names and data.label_names != adapter.label_names:
        raise InputError(f"the base model at {cfg.base} learned classes {adapter.label_names}; the data has "
                         f"{data.label_names}. A LoRA keeps the base's class embedding: use data of the same classes")
    fingerprint = model_fingerprint(adapter)
    spec = LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha or float(cfg.lora_rank), targets=cfg.lora_targets)
    add_lora(adapter.denoiser, spec, stable_seed("lora", cfg.seed))
    adapter.lora = spec
    if cfg.conditioning == "text":  # the base's words and the fine-tune's
        words = caption_vocabulary([*(data.captions or []), template_words(cfg.caption_template or "")])
        adapter.vocabulary = frozenset(words) | (adapter.vocabulary or frozenset())
    adapter.label_names = data.label_names or adapter.label_names
    return adapter, fingerprint


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine to 10 %

    return f


def _snr_weights(scheduler, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    if gamma <= 0:
        return torch.ones_like(snr)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def _token_ids(tokenizer, captions: list[str], cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """``Tensor[B, L]`` token ids of ``captions``, each caption tokenized once per run."""
    for c in set(captions) - set(cache):
        cache[c] = tokenizer([c], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids[0]
    return torch.stack([cache[c] for c in captions])


def _trainable(data: TrainingData, cfg: TrainConfig) -> tuple[DiffusersAdapter, list[nn.Parameter], str | None]:
    """The model to train, its trained parameters (in train mode) and, for a LoRA recipe, the
    base's fingerprint: every weight of a fresh model, or only the adapters on a frozen base
    (its text encoder included)."""
    if cfg.lora:
        adapter, base_fingerprint = lora_base(data, cfg)
        adapter.denoiser.train()
        return adapter, [p for p in adapter.denoiser.parameters() if p.requires_grad], base_fingerprint
    adapter = build_untrained(data, cfg)
    modules: list[nn.Module] = [m for m in (adapter.denoiser, adapter.text_encoder) if m is not None]
    for m in modules:
        m.train()
        m.requires_grad_(True)
    return adapter, [p for m in modules for p in m.parameters()], None


class _Conditioning:
    """The denoiser's conditioning for a batch of example indices: token ids encoded by the
    text encoder (captions, or this step's partial captions under attribute dropout, and the
    empty caption for ``caption_dropout`` of them), or class labels, or nothing."""

    def __init__(self, adapter: DiffusersAdapter, data: TrainingData, cfg: TrainConfig) -> None:
        self.cfg, self.text, self.labels = cfg, adapter.text_encoder, data.labels
        self.ids = self.empty = self.partial = None
        self.token_cache: dict[str, torch.Tensor] = {}
        if cfg.conditioning == "text":
            self.tok = tok = adapter.tokenizer
            self.ids = tok(data.captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids  # [N, L]
            self.empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
            if cfg.attribute_dropout > 0:
                self.partial = PartialCaptions(data.captions, data.attributes, cfg.caption_template,
                                               cfg.attribute_dropout)

    def __call__(self, idx: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        if self.ids is not None:
            batch_ids = (self.ids[idx].clone() if self.partial is None
                         else _token_ids(self.tok, self.partial.draw(idx.tolist(), g), self.token_cache))
            drop = torch.rand(idx.shape[0], generator=g) < self.cfg.caption_dropout
            batch_ids[drop] = self.empty[0]
            return {"encoder_hidden_states": self.text(batch_ids)[0]}
        if self.labels is not None and self.cfg.conditioning == "class":
            return {"class_labels": self.labels[idx]}
        return {}


def _batches(n: int, batch_size: int, steps: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """Example indices of each step: epochs in a fresh random order (with replacement when
    the set is smaller than a batch)."""
    order, cursor = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if cursor + batch_size > n:  # a new epoch in a new order
            order, cursor = torch.randperm(n, generator=g), 0
        yield order[cursor : cursor + batch_size] if n >= batch_size else torch.randint(n, (batch_size,), generator=g)
        cursor += batch_size


def _check_data(data: TrainingData, cfg: TrainConfig) -> None:
    if data.pixels.shape[0] == 0:
        raise InputError("the training set is empty")
    expected = (cfg.channels, cfg.resolution, cfg.resolution)
    if tuple(data.pixels.shape[1:]) != expected:
        raise InputError(f"training pixels have shape {tuple(data.pixels.shape[1:])}, the recipe expects {expected}")


def checkpoint_steps(steps: int, count: int) -> list[int]:
    """The steps after which ``count`` evenly spaced checkpoints are taken; the last is ``steps``."""
    return sorted({max(1, round(steps * (i + 1) / count)) for i in range(count)})


def learning_rate_at(cfg: TrainConfig, step: int) -> float:
    """The optimiser's learning rate during step ``step`` (1-based) of ``cfg``'s schedule."""
    return cfg.learning_rate * _lr_lambda(cfg)(step - 1)


def train_model(data: TrainingData, cfg: TrainConfig, *, progress: Callable[[int, float, float], None] | None = None,
                checkpoint: Callable[[int, TrainedModel], None] | None = None, checkpoints: int = 1,
                start: DiffusersAdapter | None = None) -> TrainedModel:
    """Train ``cfg``'s model on ``data``; ``progress(step, loss, elapsed_s)`` is called every
    1 % of the steps. Deterministic for a given ``cfg.seed`` and thread count (checkpoints
    change nothing). With ``checkpoints > 1``, ``checkpoint(step, model)`` receives the EMA
    weights after each of the first ``checkpoints - 1`` of ``checkpoint_steps`` (the last is the
    returned model), as the model it would be if training stopped there. ``start``: train the
    parameters of this model's denoiser that require gradients (adapters the caller attached)
    instead of building ``cfg``'s model; they end holding the EMA weights."""
    _check_data(data, cfg)
    prepared = None
    if start is not None:
        params = [p for p in start.denoiser.parameters() if p.requires_grad]
        if not params:
            raise InputError("nothing to train: no parameter of the starting denoiser requires gradients")
        start.denoiser.train()
        prepared = (start, params, None)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(data, cfg, progress=progress, checkpoint=checkpoint, checkpoints=checkpoints, prepared=prepared)
    finally:
        torch.set_num_threads(threads)  # a caller that trains in its own process keeps its threads
        if start is not None:
            start.denoiser.eval()


def _train(data: TrainingData, cfg: TrainConfig, *, progress: Callable[[int, float, float], None] | None,
           checkpoint: Callable[[int, TrainedModel], None] | None, checkpoints: int,
           prepared: tuple[DiffusersAdapter, list[nn.Parameter], str | None] | None = None) -> TrainedModel:
    adapter, params, base_fingerprint = prepared or _trainable(data, cfg)
    unet, scheduler = adapter.denoiser, adapter.scheduler
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    g = torch.Generator().manual_seed(stable_seed("train", cfg.seed))
    conditioning = _Conditioning(adapter, data, cfg)
    # Clean samples: the pixels, or a latent base's VAE latents (encoded once, 64 at a time).
    samples = torch.cat([adapter.encode_pixels(chunk) for chunk in data.pixels.split(64)])

    losses: list[float] = []
    start = time.perf_counter()
    every = max(1, cfg.steps // 100)
    snapshots = set(checkpoint_steps(cfg.steps, checkpoints)[:-1]) if checkpoints > 1 else set()
    for step, idx in enumerate(_batches(samples.shape[0], cfg.batch_size, cfg.steps, g)):
        x0 = samples[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, cfg.num_train_timesteps, (x0.shape[0],), generator=g)
        pred = unet(scheduler.add_noise(x0, noise, t), t, **conditioning(idx, g), return_dict=False)[0]
        target = noise if cfg.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        per_example = (pred - target).pow(2).flatten(1).mean(1)  # [B]
        loss = (per_example * _snr_weights(scheduler, t, cfg.min_snr_gamma, cfg.prediction_type)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # short warm-up of the EMA
            for pe, pm in zip(ema, params):
                pe.lerp_(pm, 1 - decay)
        losses.append(float(per_example.detach().mean()))
        if checkpoint is not None and step + 1 in snapshots:
            _snapshot(step + 1, params, ema, checkpoint, model=TrainedModel(
                adapter=adapter, losses=list(losses), seconds=time.perf_counter() - start, cfg=cfg,
                trainable_parameters=sum(p.numel() for p in params), base_fingerprint=base_fingerprint))
        if progress and ((step + 1) % every == 0 or step + 1 == cfg.steps):
            recent = losses[-every:]
            progress(step + 1, sum(recent) / len(recent), time.perf_counter() - start)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for pe, pm in zip(ema, params):
            pm.copy_(pe)
    final = DiffusersAdapter(unet, scheduler, text_encoder=adapter.text_encoder, tokenizer=adapter.tokenizer,
                             vae=adapter.vae)
    final.label_names, final.vocabulary, final.lora = data.label_names, adapter.vocabulary, adapter.lora
    final.caption_template = cfg.caption_template
    return TrainedModel(adapter=final, losses=losses, seconds=seconds, cfg=cfg,
                        trainable_parameters=sum(p.numel() for p in params), base_fingerprint=base_fingerprint)


def _snapshot(step: int, params: list[nn.Parameter], ema: list[torch.Tensor],
              checkpoint: Callable[[int, TrainedModel], None], *, model: TrainedModel) -> None:
    """Hand ``checkpoint`` the model with its EMA weights in place, then restore the live ones."""
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for pe, pm in zip(ema, params):
            pm.copy_(pe)
    try:
        checkpoint(step, model)
    finally:
        with torch.no_grad():
            for pl, pm in zip(live, params):
                pm.copy_(pl)
