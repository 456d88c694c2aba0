"""Typed configuration of the model and its data: the recipe that trains it (sections
``train``, ``subset_train`` and ``base.train``), the dataset (``data``), where the attributed
model lives (``model``) and the base model of LoRA fine-tunes (``base``)."""

from __future__ import annotations

import dataclasses
import typing

from attribution_core.caption_grammar import check_template
from attribution_core.config_io import check as _check

TINY_KINDS = ("unet", "unet-class", "text", "text-latent")
CONDITIONINGS = ("text", "class", "none")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Recipe of the small diffusion model trained by ``attribution train-model`` (and, with
    the ``subset_train`` section, by the evaluation on random data subsets)."""

    resolution: int = 16
    """Training image side; every image is centre-cropped and resized to it."""
    channels: int = 3
    """3 (RGB) or 1 (grayscale)."""
    widths: tuple[int, ...] = (32, 64)
    """UNet block widths; attention at every level but the first."""
    layers_per_block: int = 1
    """ResNet layers per UNet block."""
    conditioning: str = "text"
    """'text' (captions; CLIP text encoder trained jointly), 'class' (``label_column``),
    or 'none' (unconditional)."""
    caption_column: str | None = None
    """Caption column of the dataset (default: the first of caption, text, prompt). The
    model records the column it used; the index and every query read the same one."""
    label_column: str | None = None
    """Label column for 'class' conditioning (default: the first of label, labels, class);
    integer or string labels, recorded with the class names in the model."""
    text_width: int = 64
    """Hidden size of the CLIP text encoder (= the UNet's cross-attention width)."""
    text_layers: int = 1
    """Transformer layers of the CLIP text encoder."""
    text_in_time: bool = False
    """Add a pooled text embedding to the time embedding too (diffusers'
    ``addition_embed_type="text"``): every resnet block then sees the prompt, not only the
    attention layers; meant to help the model draw the prompted subject."""
    max_caption_tokens: int = 16
    """Tokenizer length: captions are padded or cut to this many tokens."""
    steps: int = 2000
    """Optimiser steps."""
    batch_size: int = 64
    """Examples per optimiser step."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate (cosine decay to 10 % of it after the warm-up)."""
    warmup_steps: int = 100
    """Steps of linear learning-rate warm-up."""
    ema_decay: float = 0.995
    """Decay of the exponential moving average of the weights that is saved as the model."""
    caption_dropout: float = 0.1
    """Share of captions replaced by the empty prompt, so classifier-free guidance works."""
    attribute_dropout: float = 0.0
    """Each attribute phrase of a caption is dropped with this probability (independently)
    while training, so prompts naming any subset of the attributes are captions the model
    learned (aspect prompts among them). 0 = captions as they are."""
    caption_template: str | None = None
    """The caption grammar over the dataset's attribute columns that ``attribute_dropout``
    drops phrases from, e.g. "a {style} {subject|shape}[ on a {background} background]"
    ({name|word}: word when name is dropped; [...]: left out when its attributes are). Unset:
    captions are comma-separated tags, each one a phrase."""
    min_snr_gamma: float = 5.0
    """Min-SNR loss weighting (Hang et al. 2023); 0 turns it off."""
    prediction_type: str = "epsilon"
    """What the denoiser predicts: 'epsilon' (the noise) or 'v_prediction'."""
    beta_schedule: str = "squaredcos_cap_v2"
    """The DDPM noise schedule of diffusers' schedulers (e.g. squaredcos_cap_v2, scaled_linear)."""
    num_train_timesteps: int = 1000
    """Diffusion timesteps of the noise schedule."""
    seed: int = 0
    """Seeds weight initialisation, batch order, noise and timesteps."""
    threads: int = 0
    """torch threads while training (0: leave as is)."""
    base: str | None = None
    """A pipeline directory to fine-tune with LoRA adapters instead of training from scratch
    (then the architecture settings above are the base's: resolution and channels must
    match it, widths and text settings are not read)."""
    lora_rank: int = 0
    """Rank of the LoRA adapters trained on ``base`` (0: no LoRA; needs ``base``)."""
    lora_alpha: float = 0.0
    """LoRA alpha: the update is scaled by alpha / rank (0: alpha = rank, a scale of 1)."""
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """Module-name suffixes of the denoiser that get adapters (diffusers' LoRA scripts'
    attention projections by default)."""

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    def __post_init__(self) -> None:
        where = "train"
        _check(self.lora_rank >= 0 and self.lora_alpha >= 0, f"{where}.lora_rank", "lora_rank and lora_alpha must be >= 0")
        _check((self.base is None) == (self.lora_rank == 0), f"{where}.base",
               "a LoRA fine-tune needs both base (the pipeline directory to fine-tune) and lora_rank >= 1; "
               "remove both to train from scratch")
        _check(not self.lora or bool(self.lora_targets), f"{where}.lora_targets", "needs at least one module suffix")
        _check(self.resolution >= 8 and self.resolution % (2 ** (len(self.widths) - 1)) == 0, f"{where}.resolution",
               f"must be >= 8 and divisible by {2 ** (len(self.widths) - 1)}, got {self.resolution}")
        _check(self.channels in (1, 3), f"{where}.channels", f"must be 1 or 3, got {self.channels}")
        _check(bool(self.widths) and all(w % 4 == 0 for w in self.widths), f"{where}.widths",
               f"needs widths that are multiples of 4, got {list(self.widths)}")
        _check(self.conditioning in CONDITIONINGS, f"{where}.conditioning",
               f"choose one of {', '.join(CONDITIONINGS)}, got {self.conditioning!r}")
        _check(self.text_width % 4 == 0, f"{where}.text_width", f"must be a multiple of 4, got {self.text_width}")
        for name in ("steps", "batch_size", "layers_per_block", "text_layers", "max_caption_tokens", "num_train_timesteps"):
            _check(getattr(self, name) >= 1, f"{where}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.learning_rate > 0, f"{where}.learning_rate", "must be > 0")
        _check(0 <= self.ema_decay < 1, f"{where}.ema_decay", "must be in [0, 1)")
        _check(0 <= self.caption_dropout < 1, f"{where}.caption_dropout", "must be in [0, 1)")
        _check(0 <= self.attribute_dropout < 1, f"{where}.attribute_dropout", "must be in [0, 1)")
        if self.caption_template is not None:
            check_template(self.caption_template, f"{where}.caption_template")
        _check(self.prediction_type in PREDICTION_TYPES, f"{where}.prediction_type",
               f"choose one of {', '.join(PREDICTION_TYPES)}")
        _check(self.threads >= 0 and self.warmup_steps >= 0 and self.min_snr_gamma >= 0, where,
               "threads, warmup_steps and min_snr_gamma must be >= 0")


@dataclasses.dataclass(frozen=True)
class SyntheticDataConfig:
    """A synthetic set, drawn at ``data.uri`` when nothing is there."""

    kind: str = "shapes"
    """'shapes': the subject/style/background set with captions; 'textures': class-labelled
    texture photographs (stripes, checks, dots, rings, waves, marble) with lighting and noise,
    for a class-conditional model (a benchmark unlike the shapes)."""
    n: int = 3072
    """Examples drawn."""
    seed: int = 0
    """Seeds the drawing; the same seed draws the same set."""
    size: int = 32
    """Image side in pixels."""
    holdout: tuple[tuple[tuple[str, str], ...], ...] = ()
    """Attribute combinations never drawn, each a mapping such as {subject: ring, style: striped}."""

    def __post_init__(self) -> None:
        _check(self.kind in ("shapes", "textures"), "data.synthetic.kind",
               f"choose shapes or textures, got {self.kind!r}")
        _check(self.kind == "shapes" or not self.holdout, "data.synthetic.holdout",
               "names attribute combinations of the shapes set; remove it for textures")
        _check(self.n >= 1, "data.synthetic.n", f"must be >= 1, got {self.n}")
        _check(self.size >= 8, "data.synthetic.size", f"must be >= 8, got {self.size}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The training dataset: the user's own (any supported layout), or a synthetic set drawn
    there when ``synthetic`` is given and nothing is there yet."""

    uri: str = "artifacts/demo/data"
    """Dataset location, a path or s3://: Parquet with image bytes, an image folder with
    metadata.jsonl, or an image folder with one sub-folder per class."""
    synthetic: SyntheticDataConfig | None = None
    """When set and ``uri`` holds no dataset, the synthetic set is written there first; when
    unset, ``uri`` must already hold the dataset."""
    image_column: str = "image"
    """Column of a Parquet dataset holding the encoded image (bytes, or Hugging Face's
    {bytes, path} struct)."""
    id_column: str | None = None
    """Column of stable example ids (strings or integers). Unset: ``example_id`` when the
    dataset has it, else a hash of the image bytes (image folders: the file name)."""

    MOVED: typing.ClassVar[dict[str, str]] = {"synth_n": "data.synthetic.n", "synth_seed": "data.synthetic.seed",
                                              "synth_size": "data.synthetic.size", "holdout": "data.synthetic.holdout"}

    def __post_init__(self) -> None:
        _check(bool(self.uri), "data.uri", "must name the dataset (a path or s3://)")
        _check(bool(self.image_column), "data.image_column", "must name the image column")
        _check(self.id_column is None or bool(self.id_column), "data.id_column", "must name a column, or be removed")


DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The diffusion model being attributed."""

    path: str = "artifacts/demo/model"
    """Diffusers pipeline directory (model_index.json, unet/, scheduler/, ...), or a LoRA
    directory as diffusers' training scripts write it (pytorch_lora_weights.safetensors with
    UNet and, optionally, text-encoder adapters)."""
    base: str | None = None
    """The base pipeline directory of a LoRA ``path`` (e.g. your Stable Diffusion 1.5
    folder). Not needed when the LoRA directory has the lora.json this project writes; when
    given, it wins over lora.json's base (whose recorded fingerprint must still match)."""
    build: str | None = None
    """If set and ``path`` holds no model, build a tiny model of this kind there
    ('unet', 'unet-class', 'text', 'text-latent'); for demos and tests."""
    resolution: int = 16
    """Image side of a built tiny model."""
    widths: tuple[int, ...] = (32, 64)
    """UNet block widths of a built tiny model (one per resolution level)."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu' or 'cuda'."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "model.path", "must name a model directory")
        _check(self.base is None or bool(self.base), "model.base", "must name the base pipeline directory, or be removed")
        _check(self.resolution >= 4, "model.resolution", f"must be >= 4, got {self.resolution}")
        _check(
            bool(self.widths) and all(w >= 4 and w % 4 == 0 for w in self.widths),
            "model.widths",
            f"needs one or more widths, each a multiple of 4, got {list(self.widths)}",
        )
        if self.build is not None:
            _check(self.build in TINY_KINDS, "model.build", f"choose one of {', '.join(TINY_KINDS)}, got {self.build!r}")
        _check(self.device in DEVICES, "model.device", f"choose one of {', '.join(DEVICES)}, got {self.device!r}")


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
    """The base model that the LoRA recipes (``train`` / ``subset_train`` with ``lora_rank``)
    fine-tune, trained once on its own dataset when ``path`` holds no model yet."""

    path: str = "artifacts/lora/base"
    """Its pipeline directory; the LoRA recipes' ``base`` must name it."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """The dataset it is trained on (drawn from ``data.synthetic`` when missing)."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Its recipe (from scratch: no ``base`` / ``lora_rank`` here)."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "base.path", "must name a model directory")
        _check(not self.train.lora, "base.train", "the base is trained from scratch: remove base and lora_rank there")
