"""Typed configuration of the featurizer; YAML is only how it is written down.

Every stage rebuilds these frozen dataclasses from a plain mapping (``from_mapping``) and
turns them back into one (``to_mapping``) at a process boundary. Validation happens in
``__post_init__`` and names the offending field with its dotted path.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

# Re-exported so that callers find the whole config API in one module.
from attribution_core.config_io import check as _check
from attribution_core.config_io import from_mapping, load_yaml, to_mapping  # noqa: F401
from attribution_core.config_stages import EvaluateConfig, IndexConfig, ReindexConfig, ServeConfig, WeightsConfig

MEASUREMENTS = ("loss", "square", "das")
NORMALIZATIONS = ("none", "timestep")
TIMESTEP_STRATEGIES = ("uniform", "random", "fixed")
GROUP_PRESETS = ("layer", "block", "function", "custom")
PRECISIONS = ("float32", "bfloat16", "float16")
TINY_KINDS = ("unet", "unet-class", "text", "text-latent")


@dataclasses.dataclass(frozen=True)
class TimestepConfig:
    """Which diffusion timesteps each example is measured at."""

    count: int = 10
    """T: timesteps per example."""
    strategy: str = "uniform"
    """'uniform': T evenly spaced over the schedule; 'random': drawn per example from its
    seeded generator; 'fixed': exactly ``values``."""
    values: tuple[int, ...] = ()
    """Timesteps used by the 'fixed' strategy (``count`` must equal their number)."""

    def __post_init__(self) -> None:
        _check(self.count >= 1, "featurize.timesteps.count", f"must be >= 1, got {self.count}")
        _check(
            self.strategy in TIMESTEP_STRATEGIES,
            "featurize.timesteps.strategy",
            f"unknown strategy {self.strategy!r}; choose one of {', '.join(TIMESTEP_STRATEGIES)}",
        )
        if self.strategy == "fixed":
            _check(
                len(self.values) == self.count,
                "featurize.timesteps.values",
                f"the 'fixed' strategy needs exactly count={self.count} values, got {len(self.values)}",
            )
            _check(all(v >= 0 for v in self.values), "featurize.timesteps.values", "timesteps must be >= 0")
        else:
            _check(
                not self.values,
                "featurize.timesteps.values",
                f"values are only read by the 'fixed' strategy, not {self.strategy!r}; remove them",
            )


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
    """Kronecker-factored random projection of each tracked layer's weight gradient."""

    k_in: int = 8
    """Rows of P_in: the projected input side (fan-in, plus one for a bias)."""
    k_out: int = 8
    """Rows of P_out: the projected output side (fan-out)."""

    def __post_init__(self) -> None:
        _check(self.k_in >= 1, "featurize.projection.k_in", f"must be >= 1, got {self.k_in}")
        _check(self.k_out >= 1, "featurize.projection.k_out", f"must be >= 1, got {self.k_out}")

    @property
    def dim_per_layer(self) -> int:
        return self.k_in * self.k_out


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """Which layers are tracked and how they are grouped into parameter groups."""

    preset: str = "block"
    """'layer' (one group per module), 'block' (down_blocks.i / mid_block / up_blocks.i /
    other), 'function' (self-attention, cross-attention q/k/v, resnet convs, time
    embedding, ...), or 'custom' (the ``custom`` mapping)."""
    include: tuple[str, ...] = ("*",)
    """Glob patterns over module names (``*`` also matches dots): tracked if any matches."""
    exclude: tuple[str, ...] = ()
    """Glob patterns over module names removed from the tracked set."""
    custom: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """For preset 'custom': ordered (group name, patterns); the first match wins and modules
    matching no group go to 'other'."""
    lora_only: bool = True
    """On a LoRA fine-tune: track only the adapters' down/up projections (``X.lora_A.*``,
    ``X.lora_B.*``), grouped as their target ``X`` would be; false tracks the frozen base
    layers too. No effect on a model without adapters."""

    def __post_init__(self) -> None:
        _check(
            self.preset in GROUP_PRESETS,
            "featurize.groups.preset",
            f"unknown preset {self.preset!r}; choose one of {', '.join(GROUP_PRESETS)}",
        )
        _check(bool(self.include), "featurize.groups.include", "needs at least one pattern (use '*' for all)")
        if self.preset == "custom":
            _check(bool(self.custom), "featurize.groups.custom", "preset 'custom' needs at least one group")
        else:
            _check(
                not self.custom,
                "featurize.groups.custom",
                f"custom groups are only read with preset 'custom', not {self.preset!r}",
            )
        names = [name for name, _ in self.custom]
        _check(len(names) == len(set(names)), "featurize.groups.custom", f"duplicate group names in {names}")
        for name, patterns in self.custom:
            _check(bool(patterns), f"featurize.groups.custom.{name}", "needs at least one pattern")


@dataclasses.dataclass(frozen=True)
class FeaturizeConfig:
    """Everything that decides the value of a feature vector; recorded in every manifest."""

    measurement: str = "square"
    """'loss' (denoising MSE; TRAK / TracIn), 'square' (squared norm of the model output;
    D-TRAK) or 'das' (mean of the model output, with each training example's score scaled by
    its denoising-error profile; DAS, arXiv 2410.18639)."""
    timesteps: TimestepConfig = dataclasses.field(default_factory=TimestepConfig)
    noise_draws: int = 1
    """Noise samples per timestep: each example is measured on count x noise_draws rows."""
    projection: ProjectionConfig = dataclasses.field(default_factory=ProjectionConfig)
    groups: GroupConfig = dataclasses.field(default_factory=GroupConfig)
    seed: int = 0
    """Seeds timesteps, noise (with the example id) and projections (with the layer name)."""
    precision: str = "float32"
    """Autocast dtype on GPU; the projected sums are always accumulated in float32.
    On CPU the model always runs in float32."""
    max_rows_per_pass: int = 256
    """Largest number of (example x timestep x draw) rows in one forward/backward; a batch
    is split on example boundaries above it (results do not change, memory does)."""
    normalize: str = "none"
    """'none': an example's feature is the projected gradient of its mean measurement over
    its rows; 'timestep': each row's (timestep x noise draw) projected gradient is scaled to
    unit L2 norm over all tracked groups first, then the rows are averaged, so no timestep
    dominates by gradient size (Diffusion-ReTrac, arXiv 2401.09031; Concept-TRAK)."""

    def __post_init__(self) -> None:
        _check(
            self.measurement in MEASUREMENTS,
            "featurize.measurement",
            f"unknown measurement {self.measurement!r}; choose one of {', '.join(MEASUREMENTS)}",
        )
        _check(self.noise_draws >= 1, "featurize.noise_draws", f"must be >= 1, got {self.noise_draws}")
        _check(
            self.precision in PRECISIONS,
            "featurize.precision",
            f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}",
        )
        _check(self.seed >= 0, "featurize.seed", f"must be >= 0, got {self.seed}")
        _check(
            self.max_rows_per_pass >= 1,
            "featurize.max_rows_per_pass",
            f"must be >= 1, got {self.max_rows_per_pass}",
        )
        _check(
            self.normalize in NORMALIZATIONS,
            "featurize.normalize",
            f"unknown normalisation {self.normalize!r}; choose one of {', '.join(NORMALIZATIONS)}",
        )

    @property
    def rows_per_example(self) -> int:
        return self.timesteps.count * self.noise_draws


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
    text_in_time: bool = False
    """Add a pooled text embedding to the time embedding too (diffusers'
    ``addition_embed_type="text"``): every resnet block then sees the prompt, not only the
    attention layers; meant to help the model draw the prompted subject."""
    max_caption_tokens: int = 16
    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
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
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    seed: int = 0
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
            from attribution_core.data.captions import check_template

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
    seed: int = 0
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

    MOVED: typing.ClassVar[dict[str, str]] = {"synth_n": "data.synthetic.n", "synth_seed": "data.synthetic.seed",
                                              "synth_size": "data.synthetic.size", "holdout": "data.synthetic.holdout"}

    def __post_init__(self) -> None:
        _check(bool(self.uri), "data.uri", "must name the dataset (a path or s3://)")


# --------------------------------------------------------------------------- run-level sections

DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The diffusion model being attributed."""

    path: str = "artifacts/demo/model"
    """Diffusers pipeline directory (model_index.json, unet/, scheduler/, ...), or a LoRA
    directory (pytorch_lora_weights.safetensors + lora.json naming its base pipeline)."""
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


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What ``attribution demo`` does on the embedded default."""

    out: str = "artifacts/demo"
    """Folder that receives everything the demo writes."""
    queries: int = 2
    """Generated query images attributed against the index."""
    top_k: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("queries", "top_k"):
            value = getattr(self, name)
            _check(value >= 1, f"demo.{name}", f"must be >= 1, got {value}")


@dataclasses.dataclass(frozen=True)
class ProjectConfig:
    """A whole config file: one section per stage."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    subset_train: TrainConfig | None = None
    """The LDS recipe (the universe model and one model per subset). Unset: the attributed
    model's own recipe (its training.json); a model without one needs this section for LDS."""
    featurize: FeaturizeConfig = dataclasses.field(default_factory=FeaturizeConfig)
    index: IndexConfig = dataclasses.field(default_factory=IndexConfig)
    weights: WeightsConfig = dataclasses.field(default_factory=WeightsConfig)
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)
    serve: ServeConfig = dataclasses.field(default_factory=ServeConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    reindex: ReindexConfig = dataclasses.field(default_factory=ReindexConfig)
    base: BaseModelConfig | None = None
    """The base model of LoRA fine-tunes, trained here when missing (see configs/lora.yaml).
    Unset: a LoRA recipe's ``base`` must already hold a model."""

    def __post_init__(self) -> None:
        _check(self.evaluate.seed != self.weights.seed, "evaluate.seed",
               f"must differ from weights.seed ({self.weights.seed}): evaluation queries must not be learning queries")
        if self.base is not None:
            for name, recipe in (("train", self.train), ("subset_train", self.subset_train)):
                if recipe is not None and recipe.lora:
                    _check(Path(recipe.base) == Path(self.base.path), f"{name}.base",
                           f"is {recipe.base!r} but the base section trains {self.base.path!r}; name the same directory")

    @classmethod
    def load(cls, path: str | Path) -> ProjectConfig:
        return from_mapping(cls, load_yaml(path))
