"""Typed configuration of the pipeline stages: sections ``index``, ``weights``, ``reindex``
and ``evaluate`` of a config file (``serve`` is in ``config_serve``); validated like every
other section, by field name."""

from __future__ import annotations

import dataclasses

from attribution_core.config_io import check as _check
from attribution_core.config_io import check_custom_resources
from attribution_core.synthetic_vocabulary import BACKGROUNDS, STYLES, SUBJECTS


KERNELS = ("auto", "full", "block_diagonal", "layer_block", "objective")
FEATURE_DTYPES = ("float16", "float32")


DAMPING_RULES = ("objective", "fixed")
APPROXIMATE_BUILDS = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class ApproximateConfig:
    """The approximate search index a version carries: FAISS IVF-PQ codes of its stored rows,
    which a searcher under ``serve.search: auto | approximate`` holds in place of the rows
    (1/16 of their bytes by default) and rescores exactly (README, "Exact or approximate")."""

    build: str = "auto"
    """'auto': build one for versions of at least ``min_rows`` rows; 'always'; 'never'."""
    min_rows: int = 100_000
    """Rows from which 'auto' builds one: from about there the exact scan's memory (2 bytes per
    coordinate) and time outgrow the query's featurizing (``attribution bench search``
    measures both tiers; README, "Exact or approximate")."""
    code_bytes: int = 0
    """Bytes of each row's product code (two 4-bit codes of 4 coordinates per byte); 0 = one
    per 8 coordinates (1/16 of a float16 row). Must divide half the coordinates padded to a
    multiple of 8. Half as many bytes lost recall on the demo's features (0.93 at 20,000 rows)."""
    candidates: int = 1000
    """Rows proposed per query and rescored exactly (``serve.search_candidates`` overrides it)."""
    seed: int = 0
    """Seed of the training sample and of the k-means."""
    rows_per_task: int = 65_536
    """Rows each Ray Data task codes (one code file per task)."""

    def __post_init__(self) -> None:
        _check(self.build in APPROXIMATE_BUILDS, "index.approximate.build",
               f"choose one of {', '.join(APPROXIMATE_BUILDS)}, got {self.build!r}")
        for name in ("min_rows", "candidates", "rows_per_task"):
            _check(getattr(self, name) >= 1, f"index.approximate.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("code_bytes", "seed"):
            _check(getattr(self, name) >= 0, f"index.approximate.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """The index job: featurize a dataset on Ray Data into versioned Parquet shards + stats."""

    out: str = "artifacts/demo/index"
    """Index root (path or s3://): versions/, latest."""
    batch_size: int = 64
    """Examples per actor call; each call writes one feature shard."""
    actors: int = 0
    """Featurizing actors; 0 = as many as fit in the GPUs free when the job starts
    (``gpus_per_actor`` each) when the cluster has GPUs, else one per CPU of the cluster (on
    CPU, single-threaded actors in parallel outrun one multi-threaded actor: 1.9x vs 1.4x for
    two cores with the demo model). On CPUs, never more than leave one CPU to the read tasks;
    never more than the batches to featurize (an update of a few rows starts one)."""
    cpus_per_actor: float = 0.5
    """CPUs reserved per actor (fractional on small machines so read tasks still get a CPU)."""
    gpus_per_actor: float = 1.0
    """GPUs reserved per actor when the cluster has GPUs. Below 1 several actors share a GPU
    (e.g. 0.5: two per GPU). With ``actors: 0`` the job starts as many actors as fit in the
    GPUs free when it starts, so an endpoint holding a fraction of a GPU
    (``serve.gpus_per_replica``) keeps it and the index job takes the rest."""
    threads_per_actor: int = 0
    """torch threads in each actor; 0 = the cluster's CPUs split evenly over the actors."""
    placement: str = "DEFAULT"
    """Where Ray places the actors: 'DEFAULT' (Ray's: fill a node to half before the next) or
    'SPREAD' (over every node that fits one: a node lost costs the fewest actors)."""
    actor_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    """Custom Ray resources each actor asks for, to keep the actors on the nodes that offer
    them (e.g. {indexer: 0.01} with those nodes started with ``--resources='{"indexer": 1}'``).
    Empty: any node with the CPUs and GPUs."""
    dtype: str = "float16"
    """Stored feature dtype: 2 bytes per number by default."""
    caption_column: str | None = None
    """Caption column of the dataset. Normally left unset: the model's recipe names it
    (``train.caption_column``, kept in the model's training.json); set, it must agree with
    the recipe. Unset everywhere: the first of caption, text, prompt."""
    label_column: str | None = None
    """Label column for a class-conditional model; like ``caption_column``, taken from the
    model's recipe. Unset everywhere: the first of label, labels, class."""
    keep_columns: tuple[str, ...] = ()
    """Dataset columns stored with every indexed row and returned with every hit under
    ``metadata`` (e.g. [artist, license, source_url]: what credit is owed to). A change of
    their values re-featurizes those rows, like a changed image or caption."""
    max_quarantine_fraction: float = 0.5
    """A build that quarantines more than this share of the dataset's examples is not
    committed: it fails with the reasons, since such a version would answer nothing useful."""
    quarantine_check_rows: int = 1024
    """After this many examples of a build are featurized, the build stops at once (before
    the rest) when more than ``max_quarantine_fraction`` of them were quarantined: a wrong
    column or model is found in minutes, not after the whole dataset (0: check at the end only)."""
    min_image_side: int = 0
    """Images with a shorter side below this go to errors/ (0 = half the model resolution)."""
    max_aspect_ratio: float = 4.0
    """Images more elongated than this go to errors/ (centre-cropping would drop most of them)."""
    kernel: str = "objective"
    """'full' K = (C + lambda I)^-1 over all k_total features, 'block_diagonal' one block per
    group, 'layer_block' one block per tracked layer (the kernel then does not change with the
    grouping), 'auto' = full when k_total <= max_full_kernel_dim, else block_diagonal;
    'objective': group- or layer-blocked (or full, when it fits), chosen together with the
    damping by the rule of ``damping_rule`` (at ``damping`` alone under 'fixed')."""
    max_full_kernel_dim: int = 4096
    """Largest k_total for which a full (not block-diagonal) kernel is built or considered."""
    damping: float = 0.01
    """lambda as a share of the mean diagonal of C (per block for block-diagonal kernels):
    the kernel's damping under ``damping_rule: fixed``."""
    damping_rule: str = "objective"
    """'objective': the damping of ``damping_grid`` under which ``damping_queries`` images the
    model generates (seeds of their own, never evaluation queries) score their top-k training
    examples most sharply: the weight objective at uniform weights, -mean(top-k)/||scores||,
    lowest wins (no retraining; measured on the benchmark to pick the best or near-best LDS
    damping per basis). 'fixed': ``damping`` as it is."""
    damping_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    """Dampings (shares of the mean diagonal) that ``damping_rule: objective`` chooses from."""
    damping_queries: int = 16
    """Images the model generates to choose the kernel and damping by (``damping_rule: objective``)."""
    stats_partitions: int = 0
    """Parallel partial-Gram tasks; 0 = the cluster's CPU count."""
    approximate: ApproximateConfig = dataclasses.field(default_factory=ApproximateConfig)
    """The approximate search index built with each version (``index.approximate.*``)."""

    def __post_init__(self) -> None:
        _check(bool(self.out), "index.out", "must name an index location")
        for name in ("batch_size", "max_full_kernel_dim"):
            _check(getattr(self, name) >= 1, f"index.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("actors", "threads_per_actor", "min_image_side", "stats_partitions"):
            _check(getattr(self, name) >= 0, f"index.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(self.cpus_per_actor > 0, "index.cpus_per_actor", f"must be > 0, got {self.cpus_per_actor}")
        _check(self.placement in ("DEFAULT", "SPREAD"), "index.placement",
               f"choose DEFAULT or SPREAD, got {self.placement!r}")
        check_custom_resources(self.actor_resources, "index.actor_resources")
        _check(0 < self.gpus_per_actor <= 1 or float(self.gpus_per_actor).is_integer(), "index.gpus_per_actor",
               f"must be a fraction in (0, 1] or a whole number of GPUs, got {self.gpus_per_actor}")
        _check(self.dtype in FEATURE_DTYPES, "index.dtype", f"choose one of {', '.join(FEATURE_DTYPES)}, got {self.dtype!r}")
        _check(self.kernel in KERNELS, "index.kernel", f"choose one of {', '.join(KERNELS)}, got {self.kernel!r}")
        _check(self.max_aspect_ratio >= 1, "index.max_aspect_ratio", f"must be >= 1, got {self.max_aspect_ratio}")
        _check(self.damping > 0, "index.damping", f"must be > 0, got {self.damping}")
        _check(self.damping_rule in DAMPING_RULES, "index.damping_rule",
               f"choose one of {', '.join(DAMPING_RULES)}, got {self.damping_rule!r}")
        _check(bool(self.damping_grid) and all(d > 0 for d in self.damping_grid), "index.damping_grid",
               f"needs one or more dampings > 0, got {list(self.damping_grid)}")
        _check(self.damping_queries >= 1, "index.damping_queries", f"must be >= 1, got {self.damping_queries}")
        _check(self.quarantine_check_rows >= 0, "index.quarantine_check_rows",
               f"must be >= 0, got {self.quarantine_check_rows}")
        _check(0 <= self.max_quarantine_fraction <= 1, "index.max_quarantine_fraction",
               f"must be in [0, 1], got {self.max_quarantine_fraction}")


ASPECTS = ("general", "subject", "style", "background")


@dataclasses.dataclass(frozen=True)
class AspectPrompts:
    """How learning-query prompts of one aspect are written: ``template`` with ``{value}``
    filled from ``values`` (the attribute's vocabulary), in the grammar of the training
    captions with only this aspect named (e.g. "a {value} shape" for the synthetic set's
    "a {style} {subject|shape}[ on a {background} background]"); "a"/"an" follow the value."""

    template: str = "a {value}"
    """Prompt with a {value} slot, in the grammar of the training captions."""
    values: tuple[str, ...] = ()
    """The aspect's values (its vocabulary), each filled into ``template``."""

    def __post_init__(self) -> None:
        _check("{value}" in self.template, "weights.prompts.template", f"needs a {{value}} slot, got {self.template!r}")


def _default_prompts() -> dict[str, AspectPrompts]:
    return {"subject": AspectPrompts("a {value}", tuple(SUBJECTS)),
            "style": AspectPrompts("a {value} shape", tuple(STYLES)),
            "background": AspectPrompts("a shape on a {value} background", tuple(BACKGROUNDS))}


@dataclasses.dataclass(frozen=True)
class WeightsConfig:
    """Learning per-group weights (``attribution learn-weights``)."""

    name: str = "learned"
    """Artifact name: written to <index>/versions/<version>/weights/<name>.json."""
    aspects: tuple[str, ...] = ASPECTS
    """Aspects to learn weights for: any of general, subject, style, background."""
    queries_per_aspect: int = 48
    """Learning queries generated per aspect ('general' prompts are training captions)."""
    prompts: dict[str, AspectPrompts] = dataclasses.field(default_factory=_default_prompts)
    """Per aspect (subject, style, background): the prompts its learning queries are generated from."""
    seed: int = 1000
    """Seeds learning-query generation; keep it apart from any evaluation query seed."""
    guidance: float = 3.0
    """Classifier-free guidance scale when generating learning queries."""
    sample_steps: int = 30
    """Sampling steps per generated learning query."""
    top_k: int = 10
    """k of the objective's signal term (mean of the top-k scores)."""
    lambda_w: float = 0.01
    """Weight of the ||w||^2 regulariser."""
    use_kernel: bool = True
    """Score with the index's kernel K (TRAK / D-TRAK); False: K = I (TracIn)."""
    pool_size: int = 64
    """Candidates kept per query and mining weighting (uniform and each group alone)."""
    max_rounds: int = 3
    """Optimise / rescan / grow-pools rounds at most."""
    steps: int = 300
    """Optimiser steps of theta per round."""
    learning_rate: float = 0.05
    """Adam learning rate of theta (the weights' softmax logits)."""
    workers: int = 2
    """Ray Train workers (gloo on CPU); queries are split across them."""
    placement: str = "PACK"
    """Where Ray Train places its workers: 'PACK' (as few nodes as fit them: the all-reduce
    stays on one machine) or 'SPREAD' (one node each where possible: a node lost costs one
    worker's share)."""
    report_every: int = 50
    """Steps between reports (and checkpoints) of the objective."""
    scan_partitions: int = 0
    """Parallel scan tasks over the index shards; 0 = the cluster's CPU count."""
    check_queries: bool = True
    """Where the dataset has a column per learned aspect (subject, style, background), read
    each aspect's learning-query images with an attribute classifier trained on the real
    images and report the share that shows the prompted value (``shown``), so a query set
    the model cannot draw is visible before its weights are used."""
    check_epochs: int = 8
    """Training epochs of that classifier."""
    holdout_queries: int = 16
    """Learning queries per aspect made apart from the learning ones (seeds of their own, never
    evaluation queries); the weight objective on them chooses how far each aspect's weights
    move from uniform, ``(1 - a) uniform + a w`` for a in 0, 0.25, ..., 1 (``shrinkage`` in
    the artifact). 0: the learned weights as they are."""
    validation_queries: int = 32
    """Where the dataset has a column per learned aspect: images generated from this many
    training captions (seeds apart from learning and evaluation queries) on which each aspect's
    Recall@top_k is measured under its own weights, the general weights and uniform ones; the
    best answers the aspect (``answered_by`` in the artifact). 0: each aspect answers with its
    own weights, unchecked."""

    def __post_init__(self) -> None:
        bad = [a for a in self.aspects if a not in ASPECTS]
        _check(not bad and bool(self.aspects), "weights.aspects", f"choose from {', '.join(ASPECTS)}, got {list(self.aspects)}")
        for name in ("queries_per_aspect", "sample_steps", "top_k", "pool_size", "max_rounds", "steps", "workers",
                     "report_every", "check_epochs"):
            _check(getattr(self, name) >= 1, f"weights.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.placement in ("PACK", "SPREAD"), "weights.placement",
               f"choose PACK or SPREAD, got {self.placement!r}")
        _check(self.holdout_queries >= 0, "weights.holdout_queries",
               f"must be >= 0 (0: no shrinkage toward uniform), got {self.holdout_queries}")
        _check(self.validation_queries >= 0, "weights.validation_queries",
               f"must be >= 0 (0: no validation), got {self.validation_queries}")
        _check(self.pool_size >= self.top_k, "weights.pool_size", f"must be >= top_k ({self.top_k}), got {self.pool_size}")
        _check(self.lambda_w >= 0 and self.learning_rate > 0, "weights", "lambda_w must be >= 0 and learning_rate > 0")
        missing = [a for a in self.aspects if a != "general" and (a not in self.prompts or not self.prompts[a].values)]
        _check(not missing, "weights.prompts", f"aspects {missing} need a template and values")


RELEARN = ("always", "changed")


@dataclasses.dataclass(frozen=True)
class ReindexConfig:
    """The scheduled update (``attribution reindex``): incremental index, weights, publish."""

    relearn: str = "changed"
    """'always': learn weights for every new index version; 'changed': only when more than
    ``relearn_fraction`` of the rows were added, changed or removed since the version the
    serving weights were learned on (so many small nightly additions add up), or when no
    earlier weights fit the new version; otherwise the endpoint keeps using the weights of
    the nearest earlier version."""
    relearn_fraction: float = 0.05
    """Share of rows added, changed or removed since the weights' version above which
    'changed' relearns the weights."""
    lease_ttl_s: float = 3600.0
    """The run's lease on the index root expires this long after its last renewal (the run
    renews it every third of this); a run that died is taken over after it."""
    endpoint: str | None = None
    """Base URL of a running endpoint (e.g. http://attribution-serve:8000): after publishing,
    wait until it answers from the new version and report how long that took."""
    endpoint_timeout_s: float = 300.0
    """Seconds to wait for ``endpoint`` to answer from the new version."""

    def __post_init__(self) -> None:
        _check(self.relearn in RELEARN, "reindex.relearn", f"choose one of {', '.join(RELEARN)}, got {self.relearn!r}")
        _check(0 <= self.relearn_fraction <= 1, "reindex.relearn_fraction",
               f"must be in [0, 1], got {self.relearn_fraction}")
        _check(self.lease_ttl_s >= 10, "reindex.lease_ttl_s", f"must be >= 10 seconds, got {self.lease_ttl_s}")
        _check(self.endpoint is None or self.endpoint.startswith(("http://", "https://")), "reindex.endpoint",
               f"must be an http(s):// URL or null, got {self.endpoint!r}")
        _check(self.endpoint_timeout_s > 0, "reindex.endpoint_timeout_s", f"must be > 0, got {self.endpoint_timeout_s}")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Running on a Ray cluster of several nodes (``--ray-address``, ``RAY_ADDRESS``)."""

    shared_filesystem: bool = False
    """Local paths (``data.uri``, ``index.out``) name a filesystem mounted at the same path on
    every node (NFS, a shared volume). Without it a job on a cluster of several nodes refuses
    them, since each node would read and write its own disk: use s3:// URIs instead."""
    node_loss_retries: int = 3
    """Times a job resumes after a node of the cluster died under it (its raylet, workers and
    objects lost). The index job resumes its version (shards already written are kept, every
    example lands exactly once); 0 = fail on the first loss."""
    stall_timeout_s: float = 900.0
    """A stage whose work makes no progress this long stops with what it waits for (the
    resources it asked for, what the cluster has free) instead of waiting forever, e.g. when
    actors take every CPU and no read task can run. Warnings come every minute before that.
    0 = wait forever."""

    def __post_init__(self) -> None:
        _check(self.node_loss_retries >= 0, "cluster.node_loss_retries", f"must be >= 0, got {self.node_loss_retries}")
        _check(self.stall_timeout_s >= 0, "cluster.stall_timeout_s",
               f"must be >= 0 (0 = wait forever), got {self.stall_timeout_s}")
