"""Small diffusers models built from config, saved in the standard pipeline-directory layout.

Tests, the demo and benchmarks use these instead of downloaded checkpoints; they go through
exactly the same ``load_adapter`` path as a real Stable Diffusion directory. ``sd15_unet``
builds a denoiser with Stable Diffusion 1.5's shapes (random weights) for measuring at the
scale users run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from attribution_core.config import TINY_KINDS
from attribution_core.errors import ConfigError


# Words the tiny tokenizers know as whole tokens; anything else falls back to letters.
DEFAULT_WORDS = (
    "a an the on of in with and shape background style "
    "circle square triangle star cross ring heart diamond "
    "filled outlined striped dotted solid gradient grid noise textured "
    "red green blue yellow orange purple black white gray"
).split()


def _tiny_unet2d(resolution: int, channels: int, num_class_embeds: int | None, widths: tuple[int, ...]):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (len(widths) - 1),
        up_block_types=("AttnUpBlock2D",) * (len(widths) - 1) + ("UpBlock2D",),
        norm_num_groups=min(4, widths[0]),
        attention_head_dim=min(8, widths[-1]),
        num_class_embeds=num_class_embeds,
    )


def _tiny_unet_cond(sample_size: int, channels: int, cross_dim: int, widths: tuple[int, ...]):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(widths) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(widths) - 1) + ("UpBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cross_dim,
        attention_head_dim=min(8, widths[-1]),
        norm_num_groups=min(4, widths[0]),
    )


def word_tokenizer(words: Iterable[str], max_length: int = 16):
    """A ``CLIPTokenizer`` whose BPE merges spell each of ``words`` as one token.

    Letters a-z (alone and word-final) are in the vocabulary too, so any lowercase text
    tokenizes; the listed words become single tokens through left-to-right merges.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in dict.fromkeys(w.lower() for w in words):
        if not word.isalnum() or len(word) < 2:
            continue
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
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
    if resolution % (2 ** len(widths)) and kind != "text-latent":
        raise ConfigError(f"resolution {resolution} must be divisible by {2 ** len(widths)} for widths {widths}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # diffusers initialises weights from the global RNG
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    components: dict[str, Any] = {"scheduler": scheduler}
    if kind in ("unet", "unet-class"):
        classes = num_classes if kind == "unet-class" else None
        components["unet"] = _tiny_unet2d(resolution, channels, classes, widths)
        pipeline_class = "DDPMPipeline"
    else:
        from transformers import CLIPTextConfig, CLIPTextModel

        tokenizer = word_tokenizer(words)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        components["text_encoder"] = CLIPTextModel(text_config)
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
        components["unet"] = _tiny_unet_cond(sample, unet_channels, 32, widths)
        pipeline_class = "StableDiffusionPipeline"
    index: dict[str, Any] = {"_class_name": pipeline_class, "_diffusers_version": _diffusers_version()}
    for name, component in components.items():
        component.save_pretrained(out / name)
        library = "transformers" if name in ("text_encoder", "tokenizer") else "diffusers"
        index[name] = [library, type(component).__name__]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


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
