"""Small diffusers models built from config, saved in the standard pipeline-directory layout.

Tests, the demo and benchmarks use these instead of downloaded checkpoints; they go through
exactly the same ``load_adapter`` path as a real Stable Diffusion directory. ``sd15_unet``
builds a denoiser with Stable Diffusion 1.5's shapes (random weights) for measuring at the
scale users run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from attribution_core.config import TINY_KINDS
from attribution_core.errors import ConfigError
from attribution_core.models.pipeline_dir import save_pipeline


# Words the tiny tokenizers know as whole tokens; anything else falls back to letters.
DEFAULT_WORDS = (
    "a an the on of in with and shape background style "
    "circle square triangle star cross ring heart diamond "
    "filled outlined striped dotted solid gradient grid noise textured "
    "red green blue yellow orange purple black white gray"
).split()


def unet2d(resolution: int, channels: int, num_class_embeds: int | None, widths: tuple[int, ...], *,
           layers_per_block: int = 1):
    """A small pixel-space ``UNet2DModel`` (self-attention at every level but the first)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (len(widths) - 1),
        up_block_types=("AttnUpBlock2D",) * (len(widths) - 1) + ("UpBlock2D",),
        norm_num_groups=min(4, widths[0]),
        attention_head_dim=min(8, widths[-1]),
        num_class_embeds=num_class_embeds,
    )


def unet_cond(sample_size: int, channels: int, cross_dim: int, widths: tuple[int, ...], *, layers_per_block: int = 1,
              text_in_time: bool = False):
    """A small ``UNet2DConditionModel`` (cross-attention at every level but the first).
    ``text_in_time``: a pooled text embedding is added to the time embedding as well
    (diffusers' ``addition_embed_type="text"``), so every resnet block sees the prompt."""
    from diffusers import UNet2DConditionModel

    extra = {"addition_embed_type": "text", "addition_embed_type_num_heads": min(4, cross_dim // 4)} if text_in_time else {}
    return UNet2DConditionModel(
        **extra,
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(widths) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(widths) - 1) + ("UpBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cross_dim,
        attention_head_dim=min(8, widths[-1]),
        norm_num_groups=min(4, widths[0]),
    )


def text_encoder_for(tokenizer, width: int = 32, layers: int = 2):
    """A small ``CLIPTextModel`` sized to ``tokenizer``'s vocabulary and length."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    ))


def _learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned on ``words`` until each is one symbol (CLIP's ``</w>`` end
    marker included). Encoding replays merges in this order, so every learned word comes
    back as a single token; ties break alphabetically, so the result is deterministic."""
    symbols = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in symbols.values():
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for w, seq in symbols.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            symbols[w] = out


def word_tokenizer(words: Iterable[str], max_length: int = 16):
    """A ``CLIPTokenizer`` (word-level in effect) whose BPE merges spell each of ``words`` as
    one token; letters and digits alone and word-final are in the vocabulary too, so any
    lowercase text tokenizes."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    clean = sorted({w.lower() for w in words if w.isalnum() and w.isascii()})
    merges = _learn_merges(clean)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = max_length
    return tok


def build_tiny_pipeline(
    kind: str,
    out_dir: str | Path,
    *,
    resolution: int = 16,
    channels: int = 3,
    widths: tuple[int, ...] = (8, 16),
    num_classes: int = 4,
    words: Iterable[str] = DEFAULT_WORDS,
    seed: int = 0,
) -> Path:
    """Build a tiny model of ``kind`` with seeded random weights and save it as a pipeline dir.

    Kinds: 'unet' (pixel UNet2DModel), 'unet-class' (class-conditional UNet2DModel),
    'text' (pixel UNet2DConditionModel + CLIP text encoder/tokenizer), 'text-latent'
    (the same + a tiny AutoencoderKL: the Stable Diffusion layout).
    """
    from diffusers import AutoencoderKL, DDPMScheduler

    if kind not in TINY_KINDS:
        raise ConfigError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(TINY_KINDS)}")
    if not widths or any(w < 4 or w % 4 for w in widths):
        raise ConfigError(f"UNet widths must each be a multiple of 4 (group norm uses 4 groups), got {list(widths)}")
    if resolution % (2 ** len(widths)) and kind != "text-latent":
        raise ConfigError(f"resolution {resolution} must be divisible by {2 ** len(widths)} for widths {widths}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # diffusers initialises weights from the global RNG
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    components: dict[str, Any] = {"scheduler": scheduler}
    if kind in ("unet", "unet-class"):
        classes = num_classes if kind == "unet-class" else None
        components["unet"] = unet2d(resolution, channels, classes, widths)
    else:
        tokenizer = word_tokenizer(words)
        components["text_encoder"] = text_encoder_for(tokenizer, 32, 2)
        components["tokenizer"] = tokenizer
        sample = resolution
        if kind == "text-latent":
            components["vae"] = AutoencoderKL(
                in_channels=channels,
                out_channels=channels,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
                block_out_channels=(8, 16),
                latent_channels=4,
                norm_num_groups=4,
                sample_size=resolution,
            )
            sample = resolution // 2
        unet_channels = 4 if kind == "text-latent" else channels
        components["unet"] = unet_cond(sample, unet_channels, 32, widths)
    return save_pipeline(components, out)


def sd15_unet(sample_size: int = 64):
    """A ``UNet2DConditionModel`` with Stable Diffusion 1.5's shapes and random weights
    (about 860 M parameters; 64x64 latents for 512x512 images)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_sd15_pipeline(out_dir: str | Path, variant: str | None = "fp16", seed: int = 0) -> Path:
    """A pipeline directory with Stable Diffusion 1.5's shapes and random weights: the UNet
    (about 860 M parameters), a CLIP ViT-L/14 text encoder (123 M), the VAE (84 M) and SD's
    noise schedule; stored as ``variant`` (fp16 by default, as SD checkpoints are kept).
    For measuring every stage at the scale users run; nothing is downloaded."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = word_tokenizer(DEFAULT_WORDS, max_length=77)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), norm_num_groups=32, scaling_factor=0.18215,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon")
    components = {"unet": sd15_unet(64), "text_encoder": text, "tokenizer": tokenizer, "vae": vae,
                  "scheduler": scheduler}
    return save_pipeline(components, out_dir, variant=variant)
