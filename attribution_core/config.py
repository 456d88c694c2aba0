"""The whole config API in one module: ``ProjectConfig`` (a config file, one section per
stage), the featurizer's sections (``featurize``: timesteps, projection, groups) and
``demo`` defined here, and re-exported from where they live: the model and data sections
(``config_model``), the stage sections (``config_stages``: index, weights, serve, reindex,
evaluate) and the mapping conversions (``config_io``). YAML is only how it is written down.

Every stage rebuilds these frozen dataclasses from a plain mapping (``from_mapping``) and
turns them back into one (``to_mapping``) at a process boundary. Validation happens in
``__post_init__`` and names the offending field with its dotted path. Every field carries a
doc line: what it changes, in which unit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from attribution_core.config_io import check as _check
from attribution_core.config_io import from_mapping, load_yaml, to_mapping
from attribution_core.config_model import (CONDITIONINGS, DEVICES, PREDICTION_TYPES, TINY_KINDS, BaseModelConfig,
                                           DataConfig, ModelConfig, SyntheticDataConfig, TrainConfig)
from attribution_core.config_serve import ServeConfig
from attribution_core.config_evaluate import EvaluateConfig, FrontierConfig, PublishedConfig
from attribution_core.config_stages import (ApproximateConfig, ClusterConfig, IndexConfig, ReindexConfig,
                                           WeightsConfig)

__all__ = [  # re-exported: callers find the whole config API here
    "from_mapping", "load_yaml", "to_mapping",
    "CONDITIONINGS", "DEVICES", "PREDICTION_TYPES", "TINY_KINDS", "BaseModelConfig", "DataConfig", "ModelConfig",
    "SyntheticDataConfig", "TrainConfig",
    "ApproximateConfig", "ClusterConfig", "EvaluateConfig", "FrontierConfig", "IndexConfig", "PublishedConfig", "ReindexConfig",
    "ServeConfig", "WeightsConfig",
    "MEASUREMENTS", "NORMALIZATIONS", "TIMESTEP_STRATEGIES", "GROUP_PRESETS", "PRECISIONS",
    "TimestepConfig", "ProjectionConfig", "GroupConfig", "FeaturizeConfig", "DemoConfig", "ProjectConfig",
]

MEASUREMENTS = ("loss", "square", "das")
NORMALIZATIONS = ("none", "timestep")
TIMESTEP_STRATEGIES = ("uniform", "random", "fixed")
GROUP_PRESETS = ("layer", "block", "function", "custom")
PRECISIONS = ("float32", "bfloat16", "float16")


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
    """Which timesteps each example is measured at (count, strategy)."""
    noise_draws: int = 1
    """Noise samples per timestep: each example is measured on count x noise_draws rows."""
    projection: ProjectionConfig = dataclasses.field(default_factory=ProjectionConfig)
    """Per-layer random projection sizes (k_in x k_out features per tracked layer)."""
    groups: GroupConfig = dataclasses.field(default_factory=GroupConfig)
    """How the tracked layers are split into parameter groups (the units that get weights)."""
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


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What ``attribution demo`` does on the embedded default."""

    out: str = "artifacts/demo"
    """Folder that receives everything the demo writes."""
    queries: int = 2
    """Generated query images attributed against the index."""
    top_k: int = 3
    """Training examples printed per aspect for each demo query."""
    seed: int = 0
    """Seeds the demo's query generation."""
    lds: bool = True
    """Measure LDS too (retrains evaluate.subsets models); the exemplar check runs either way
    when evaluate.exemplars is set."""

    def __post_init__(self) -> None:
        for name in ("queries", "top_k"):
            value = getattr(self, name)
            _check(value >= 1, f"demo.{name}", f"must be >= 1, got {value}")


@dataclasses.dataclass(frozen=True)
class ProjectConfig:
    """A whole config file: one section per stage."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The attributed model: where it lives, and a tiny one built there for demos."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """The training set: the user's own, or a synthetic set drawn where none is."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Recipe of ``attribution train-model`` (and of the LDS models unless ``subset_train`` is set)."""
    subset_train: TrainConfig | None = None
    """The LDS recipe (the universe model and one model per subset). Unset: the attributed
    model's own recipe (its training.json); a model without one needs this section for LDS."""
    featurize: FeaturizeConfig = dataclasses.field(default_factory=FeaturizeConfig)
    """How per-example gradient features are computed (measurement, timesteps, projection, groups)."""
    index: IndexConfig = dataclasses.field(default_factory=IndexConfig)
    """The index job: shards, actors, the kernel and its damping."""
    weights: WeightsConfig = dataclasses.field(default_factory=WeightsConfig)
    """Learning per-group weights for each aspect."""
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)
    """What ``attribution demo`` does after building everything."""
    serve: ServeConfig = dataclasses.field(default_factory=ServeConfig)
    """The query endpoint: limits, replicas, batching, API key."""
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    """The evaluation: LDS on retrained subset models, aspect Recall@K, the report."""
    reindex: ReindexConfig = dataclasses.field(default_factory=ReindexConfig)
    """Scheduled updates: when weights are relearned, the lease, the endpoint to wait for."""
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    """A Ray cluster of several nodes: shared storage, node losses, stalled stages."""
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
