"""Typed configuration of the evaluation harness: section ``evaluate`` of a config file
(``attribution evaluate``, ARCHITECTURE §9), validated by field name like every other section."""

from __future__ import annotations

import dataclasses

from attribution_core.config_io import check as _check


BASES = ("tracin", "trak", "dtrak", "das")
"""Attribution bases the evaluation can compare: TracIn (loss gradients, K = I; TracIn-CP,
summed over ``evaluate.checkpoints``), TRAK (loss gradients, kernel), D-TRAK (square-norm
gradients, kernel), DAS-style (output-mean gradients, kernel, each training example's score
scaled by its denoising-error profile; a simplification of the published DAS)."""

PUBLISHED = ("dtrak", "das")
"""Reference pipelines ``evaluate.published`` can reproduce on the LDS universe."""

PUBLISHED_DAMPING = tuple(m * 10.0**e for e in range(-2, 7) for m in (1, 2, 5))
"""The damping grid of the D-TRAK and DAS code: {1, 2, 5} x 10^-2 ... 10^6."""


@dataclasses.dataclass(frozen=True)
class PublishedConfig:
    """Evaluation-only reference rows: D-TRAK and DAS as their code computes them (the whole
    per-example gradient, one dense seeded projection, the full kernel), scored on the same
    ground truth and queries as the bases, and the weighting paper's own setting (learned
    one-sided group weights on that projection)."""

    pipelines: tuple[str, ...] = PUBLISHED
    """Which reference pipelines: dtrak (squared output norm, raw Gram), das (output mean,
    per-timestep unit gradients, Gram scaled by its mean |entry|, residual scale)."""
    dims: tuple[int, ...] = (4096,)
    """Projection widths (D-TRAK's code uses 32,768, DAS's 4,096)."""
    damping_grid: tuple[float, ...] = PUBLISHED_DAMPING
    """Dampings tried, as the published code does; the published code picks the best by LDS on
    its test queries, here each half of the queries gets the one best on the other half."""
    residual_timesteps: int = 1000
    """Timesteps of DAS's residual profile r(x) (its code: all 1,000, one noise draw each)."""
    paper_setting: bool = True
    """Add the paper's setting: per-group weights learned with the weight objective on the
    projection of the whole gradient (per-group contributions by linearity), query side only."""
    seed: int = 42
    """Seed of the dense projection (the published code's)."""

    def __post_init__(self) -> None:
        bad = [p for p in self.pipelines if p not in PUBLISHED]
        _check(not bad and bool(self.pipelines), "evaluate.published.pipelines",
               f"choose from {', '.join(PUBLISHED)}, got {list(self.pipelines)}")
        _check(bool(self.dims) and all(d >= 8 for d in self.dims), "evaluate.published.dims",
               f"projection widths must be >= 8, got {list(self.dims)}")
        _check(bool(self.damping_grid) and all(d > 0 for d in self.damping_grid), "evaluate.published.damping_grid",
               f"dampings must be > 0, got {list(self.damping_grid)}")
        _check(self.residual_timesteps >= 1, "evaluate.published.residual_timesteps",
               f"must be >= 1, got {self.residual_timesteps}")


@dataclasses.dataclass(frozen=True)
class FrontierConfig:
    """The quality/cost frontier of the featurizer: LDS of each basis (uniform and served)
    against bytes per row and featurize seconds per row, one setting changed at a time from
    ``featurize``: projection width, timesteps, noise draws, and an ensemble of the
    ``evaluate.checkpoints`` checkpoints."""

    projection: tuple[int, ...] = (8, 16, 32)
    """k_in = k_out per tracked layer."""
    timesteps: tuple[int, ...] = (10, 20, 50)
    """Timesteps per example."""
    noise_draws: tuple[int, ...] = (1, 2)
    """Noise draws per timestep."""
    ensemble: bool = True
    """Add the checkpoint ensemble (needs evaluate.checkpoints >= 2)."""
    timing_examples: int = 64
    """Universe examples featurized in this process to time each setting (seconds per row)."""
    max_block_dim: int = 8192
    """Largest kernel block a setting's index may use: where a parameter group is wider (32x32
    projections), the kernel has one block per layer instead (its damping still chosen)."""

    def __post_init__(self) -> None:
        _check(self.max_block_dim >= 1, "evaluate.frontier.max_block_dim", f"must be >= 1, got {self.max_block_dim}")
        for name in ("projection", "timesteps", "noise_draws"):
            values = getattr(self, name)
            _check(all(v >= 1 for v in values), f"evaluate.frontier.{name}", f"values must be >= 1, got {list(values)}")
        _check(self.timing_examples >= 1, "evaluate.frontier.timing_examples",
               f"must be >= 1, got {self.timing_examples}")


EXEMPLAR_KINDS = ("subject", "style", "background", "general")
"""What an exemplar set tests: that aspect's answer, or the general one."""


@dataclasses.dataclass(frozen=True)
class ExemplarsConfig:
    """The exemplar check (attribution by customization): the model fine-tuned briefly (LoRA)
    on each small exemplar set under a prompt of its own; the images it then generates from
    that prompt were caused by the exemplars, so a right answer ranks them at the top of a
    candidate pool (the exemplars among ``distractors`` training rows)."""

    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    """Sets drawn from the data: ``kind: column`` (e.g. ``subject: subject``, ``style: artist``,
    ``general: label``); each set is the rows of one value of the column."""
    per_kind: int = 1
    """Sets drawn per entry of ``columns`` (one value of the column each)."""
    size: int = 8
    """Exemplars per drawn set."""
    folder: str | None = None
    """Sets of your own images: ``<folder>/<set>/<image>`` (local), each folder a set."""
    kinds: dict[str, str] = dataclasses.field(default_factory=dict)
    """Kind of each folder set (``set: kind``); a set not named here is 'general'."""
    token: str = "sks"
    """The new word the customization ties to the set (spelled from letters by the model's
    tokenizer; pick one the model's captions never use). A class-conditional model gets a new
    class of this name instead."""
    prompt: str = "a {token}"
    """The set's prompt (text models): the exemplars are fine-tuned with it and the queries
    generated from it."""
    queries: int = 8
    """Images generated per set by its customized model (seeds of their own)."""
    distractors: int = 1000
    """Training rows mixed with the exemplars as candidates (a seeded sample, the same for
    every set; 0 = every row)."""
    k: int = 10
    """K of Recall@K: a hit is an exemplar among a query's K best-scored candidates."""
    rank: int = 4
    """Rank of the customization's LoRA adapters."""
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """Denoiser module-name suffixes the customization adapts."""
    steps: int = 100
    """Fine-tune steps per set."""
    batch_size: int = 8
    """Exemplars per fine-tune step (drawn with replacement when the set is smaller)."""
    learning_rate: float = 0.002
    """Learning rate of the fine-tune (AdamW, short warm-up, cosine decay)."""
    bases: tuple[str, ...] = ()
    """Attribution bases also scored, with uniform weights and a kernel built from the candidates
    (featurized again under each customized model with the basis's measurement): which basis
    finds the exemplars, beside LDS's verdict. Empty: the served index's basis only."""

    def __post_init__(self) -> None:
        where = "evaluate.exemplars"
        bad = [b for b in self.bases if b not in BASES]
        _check(not bad, f"{where}.bases", f"choose from {', '.join(BASES)}, got {list(self.bases)}")
        for kind in (*self.columns, *self.kinds.values()):
            _check(kind in EXEMPLAR_KINDS, f"{where}.{'columns' if kind in self.columns else 'kinds'}",
                   f"unknown kind {kind!r}; choose from {', '.join(EXEMPLAR_KINDS)}")
        _check(bool(self.columns) or self.folder is not None, f"{where}.columns",
               "name data columns to draw sets from (kind: column) or a folder of sets (folder: path)")
        _check(not self.kinds or self.folder is not None, f"{where}.kinds", "names folder sets; set folder too")
        _check("{token}" in self.prompt, f"{where}.prompt", f"must contain {{token}}, got {self.prompt!r}")
        _check(bool(self.token.strip()) and self.token.isalnum(), f"{where}.token",
               f"must be one word of letters or digits, got {self.token!r}")
        for name in ("per_kind", "size", "queries", "k", "rank", "steps", "batch_size"):
            _check(getattr(self, name) >= 1, f"{where}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.distractors >= 0, f"{where}.distractors", f"must be >= 0 (0 = every row), got {self.distractors}")
        _check(self.learning_rate > 0, f"{where}.learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(bool(self.targets), f"{where}.targets", "needs at least one module suffix")

    @property
    def set_prompt(self) -> str:
        return self.prompt.format(token=self.token)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """The evaluation harness (``attribution evaluate``, ARCHITECTURE §9): LDS of the attribution
    bases with uniform and learned weights, aspect Recall@K, and the report."""

    out: str = "artifacts/demo/eval"
    """Local folder receiving metrics.json, report.html and the cached LDS work."""
    bases: tuple[str, ...] = ("tracin", "trak", "dtrak")
    """Attribution bases compared by LDS: tracin, trak, dtrak, das."""
    lds_examples: int = 0
    """Training examples in the LDS universe (a seeded sample of the dataset); 0 = every
    example except the held-out query images. Models are retrained on halves of it."""
    subsets: int = 32
    """S: random subsets, one model retrained (with the ``subset_train`` recipe) per subset."""
    subset_fraction: float = 0.5
    """Share of the LDS universe in each random subset."""
    generated_queries: int = 16
    """LDS queries generated by the LDS model (prompted with training captions)."""
    heldout_queries: int = 8
    """LDS queries that are real images kept out of the LDS universe."""
    output_timesteps: int = 20
    """The model output is the loss averaged over this many fixed timesteps ..."""
    output_noise_draws: int = 2
    """... and this many fixed noise draws per timestep."""
    weights_queries: int = 32
    """Learning queries per basis for its learned ('general') weights."""
    recall_queries: int = 48
    """Generated queries of known attributes for Recall@K (prompted with training captions)."""
    recall_k: int = 10
    """K of aspect Recall@K: a hit is a top-K training example that shares the aspect's value."""
    gallery: int = 4
    """Recall queries shown in the report with their top training images per aspect."""
    gallery_k: int = 5
    """Top training images shown per aspect for each gallery query."""
    bootstrap: int = 2000
    """Bootstrap resamples of the queries for the confidence intervals."""
    damping_grid: tuple[float, ...] = ()
    """LDS of the kernel bases (TRAK, D-TRAK) again with the kernel rebuilt at each of these
    ``index.damping`` values (uniform weights, and the weights learned at the index's own
    damping); empty: no sweep."""
    headroom: bool = True
    """Add LDS's evaluation-only headroom row: group weights fitted to the retrained outputs on
    half the subsets and queries, scored on the other halves (needs >= 4 of each)."""
    seed: int = 5000
    """Seeds evaluation queries, subsets and the universe; must differ from weights.seed."""
    gpus_per_task: float = -1.0
    """GPUs per retraining task; -1 = one when the cluster has GPUs, else none."""
    checkpoints: int = 1
    """Checkpoints of the LDS universe model kept (evenly spaced, the last the model): with
    2 or more, TracIn is TracIn-CP, its loss-gradient products summed over them."""
    noise_ceiling: bool = False
    """Retrain the subsets a second time with another training seed and report how well the
    two ground truths agree: how much of LDS's distance to 1 is retraining noise."""
    published: PublishedConfig | None = None
    """Reference rows of the published pipelines (evaluation only; none when unset)."""
    frontier: FrontierConfig | None = None
    """The featurizer's quality/cost frontier (evaluation only; none when unset)."""
    exemplars: ExemplarsConfig | None = None
    """The exemplar check: ground truth by customization, on the model itself (none when unset)."""

    def __post_init__(self) -> None:
        bad = [b for b in self.bases if b not in BASES]
        _check(not bad and bool(self.bases), "evaluate.bases", f"choose from {', '.join(BASES)}, got {list(self.bases)}")
        _check(self.subsets >= 2, "evaluate.subsets", f"LDS needs at least 2 subsets, got {self.subsets}")
        _check(0 < self.subset_fraction < 1, "evaluate.subset_fraction", f"must be in (0, 1), got {self.subset_fraction}")
        _check(self.lds_examples == 0 or self.lds_examples >= 4, "evaluate.lds_examples",
               f"must be 0 (all) or >= 4, got {self.lds_examples}")
        _check(self.generated_queries + self.heldout_queries >= 2, "evaluate.generated_queries",
               "LDS needs at least 2 queries (generated_queries + heldout_queries)")
        for name in ("generated_queries", "heldout_queries", "recall_queries", "gallery"):
            _check(getattr(self, name) >= 0, f"evaluate.{name}", f"must be >= 0, got {getattr(self, name)}")
        for name in ("output_timesteps", "output_noise_draws", "weights_queries", "recall_k", "gallery_k", "bootstrap"):
            _check(getattr(self, name) >= 1, f"evaluate.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(all(d > 0 for d in self.damping_grid), "evaluate.damping_grid",
               f"dampings must be > 0, got {list(self.damping_grid)}")
        _check(self.gpus_per_task == -1 or self.gpus_per_task >= 0, "evaluate.gpus_per_task",
               f"must be -1 (auto) or >= 0, got {self.gpus_per_task}")
        _check(self.checkpoints >= 1, "evaluate.checkpoints", f"must be >= 1, got {self.checkpoints}")
        _check(self.frontier is None or not self.frontier.ensemble or self.checkpoints >= 2,
               "evaluate.frontier.ensemble", "an ensemble of checkpoints needs evaluate.checkpoints >= 2")
