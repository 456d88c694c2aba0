"""Typed configuration of the query endpoint: section ``serve`` of a config file, validated
like every other section, by field name."""

from __future__ import annotations

import dataclasses

from attribution_core.answers import UNIFORM
from attribution_core.config_io import check as _check, check_custom_resources
from attribution_core.config_stages import ASPECTS

QUERY_ASPECTS = (*ASPECTS, UNIFORM)
ASPECT_QUERIES = ("weighted", "contrastive", "both")
SEARCH_MODES = ("auto", "exact", "approximate")
FEATURIZE_IN = ("ingress", "replicas")


PROXY_LOCATIONS = ("EveryNode", "HeadOnly", "Disabled")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The query endpoint (``attribution serve``, ``deploy/serve_config.yaml``)."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy binds; 0.0.0.0 to accept connections from other machines."""
    port: int = 8000
    """Port of the HTTP proxy."""
    weights: str = "learned"
    """Weights artifact name under the served index version (<index>/versions/<v>/weights/<name>.json)."""
    default_aspects: tuple[str, ...] = ("general",)
    """Aspects answered when a request names none; 'general' falls back to 'uniform' when
    the index version has no learned weights."""
    default_k: int = 10
    """Training examples per aspect when a request gives no k."""
    max_k: int = 100
    """Largest k a request may ask for (larger is refused with 422)."""
    max_image_bytes: int = 8 * 2**20
    """Larger uploads are refused with 413."""
    max_image_pixels: int = 16 * 2**20
    """Images of more pixels (width x height) are refused with 413 before decoding them."""
    max_prompt_chars: int = 1000
    """Longer prompts are refused with 422 (a text-to-image prompt is a sentence or two)."""
    api_key_env: str | None = None
    """Name of an environment variable holding the API key; when set, requests must carry
    it in the X-API-Key header. The key itself never appears in a config file."""
    partitions: int = 1
    """Index searcher deployments, each holding 1/partitions of the rows (split the index
    when it does not fit one replica); top-k is merged exactly."""
    searcher_replicas: int = 1
    """Replicas per partition (throughput)."""
    featurize_in: str = "ingress"
    """Where queries are featurized: 'ingress' (the HTTP ingress's replicas hold the model:
    one hop less per request) or 'replicas' (a ``QueryFeaturizer`` deployment holds it, the
    ingress only routes: the model's replicas scale apart from HTTP handling)."""
    featurizer_replicas: int = 1
    """Replicas of the model (of the ingress with ``featurize_in: ingress``); each takes a
    GPU when CUDA is present."""
    threads: int = 1
    """torch threads per featurizer replica; 0 = the machine's CPU count. On CPU one thread
    was faster than two for a demo query (the small ops of one image do not split well and a
    second thread competes with the other replicas; benchmarks/README.md, "Thread settings")."""
    searcher_threads: int = 1
    """Threads per searcher replica. Exact: torch's, for the float16 scan, which is
    memory-bound: one thread per partition, partitions scanning in parallel, beats one
    partition on several threads. Approximate: each query's scan of the codes is split into
    this many slices, one thread each (benchmarks/README.md, "Thread settings")."""
    cpus_per_replica: float = 0.5
    """CPUs reserved per featurizer / searcher replica (fractional on small machines)."""
    gpus_per_replica: float = 1.0
    """GPUs reserved per replica that holds the model (the ingress, or ``QueryFeaturizer``
    under ``featurize_in: replicas``) when the cluster has GPUs. A query featurizer uses a
    fraction of a GPU: 0.25 lets the endpoint share a GPU with three others or with index
    actors (``index.gpus_per_actor``); searchers take no GPU."""
    ingress_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    """Custom Ray resources each ingress replica asks for, to place it on the nodes that offer
    them (e.g. {edge: 0.01} with those nodes started with ``--resources='{"edge": 1}'``: the
    machines that take outside traffic). Empty: anywhere."""
    searcher_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    """Custom Ray resources each searcher replica asks for (e.g. the nodes with the memory to
    hold a partition's rows). Empty: anywhere; Serve spreads a deployment's replicas."""
    proxy_location: str = "EveryNode"
    """Where Serve runs its HTTP proxies: 'EveryNode' (behind a load balancer over the nodes),
    'HeadOnly' (one entry point) or 'Disabled' (handles only)."""
    max_batch_size: int = 8
    """Concurrent queries featurized / searched together."""
    batch_wait_ms: float = 0.0
    """How long a replica waits to fill a batch once a query has arrived. Queries that
    arrive while a batch runs form the next batch anyway; waiting only adds latency when
    batching does not pay (on CPU, featurizing 2 images costs about 2x one)."""
    aspect_query: str = "weighted"
    """How subject / style / background are answered for a request with a prompt:
    'weighted' (the query's feature under the aspect's learned weights, the paper's method),
    'contrastive' (Concept-TRAK's feature of the prompt against the prompt without that
    aspect, uniform weights) or 'both' (that feature under the aspect's weights). Requests
    without a prompt are answered 'weighted'."""
    refresh_s: float = 30.0
    """Replicas serving the index's latest version (no version pinned) look at its
    ``latest`` pointer this often and hot-swap when ``attribution reindex`` (or
    ``attribution index``) moves it; 0 = only on redeploy."""
    search: str = "auto"
    """'exact': every query scans all stored rows, held in memory (float16). 'approximate':
    the version's approximate index proposes candidates, each rescored exactly from the rows,
    kept on local disk (returned scores are exact, recall is not guaranteed); a version built
    without one is refused. 'auto': approximate when the version has one (``index.approximate``
    builds one from 100,000 rows), else exact."""
    search_candidates: int = 0
    """Rows each approximate query rescores; 0 = the version's ``index.approximate.candidates``."""
    rows_dir: str | None = None
    """Local directory where approximate searchers keep the rows they rescore from (one file
    per partition, removed when the process ends); None = the system's temporary directory."""
    feature_cache: int = 1024
    """Query features each featurizer replica keeps by content (image bytes, prompt, label;
    about 4 bytes per coordinate each): a repeated query skips featurizing, most of its
    time. 0 = keep none."""

    def __post_init__(self) -> None:
        _check(1 <= self.port <= 65535, "serve.port", f"must be a TCP port, got {self.port}")
        bad = [a for a in self.default_aspects if a not in QUERY_ASPECTS]
        _check(not bad and bool(self.default_aspects), "serve.default_aspects",
               f"choose from {', '.join(QUERY_ASPECTS)}, got {list(self.default_aspects)}")
        _check(1 <= self.default_k <= self.max_k, "serve.default_k", f"must be in [1, max_k={self.max_k}], got {self.default_k}")
        for name in ("max_image_bytes", "max_image_pixels", "max_prompt_chars", "partitions", "searcher_replicas",
                     "featurizer_replicas",
                     "max_batch_size"):
            _check(getattr(self, name) >= 1, f"serve.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.threads >= 0 and self.searcher_threads >= 0, "serve.threads",
               f"threads and searcher_threads must be >= 0, got {self.threads}, {self.searcher_threads}")
        _check(self.cpus_per_replica > 0, "serve.cpus_per_replica", f"must be > 0, got {self.cpus_per_replica}")
        _check(self.proxy_location in PROXY_LOCATIONS, "serve.proxy_location",
               f"choose one of {', '.join(PROXY_LOCATIONS)}, got {self.proxy_location!r}")
        for name in ("ingress_resources", "searcher_resources"):
            check_custom_resources(getattr(self, name), f"serve.{name}")
        _check(0 < self.gpus_per_replica <= 1, "serve.gpus_per_replica",
               f"must be a fraction of a GPU in (0, 1], got {self.gpus_per_replica}")
        _check(self.batch_wait_ms >= 0, "serve.batch_wait_ms", f"must be >= 0, got {self.batch_wait_ms}")
        _check(self.aspect_query in ASPECT_QUERIES, "serve.aspect_query",
               f"choose one of {', '.join(ASPECT_QUERIES)}, got {self.aspect_query!r}")
        _check(self.refresh_s >= 0, "serve.refresh_s", f"must be >= 0 (0 = only on redeploy), got {self.refresh_s}")
        _check(self.featurize_in in FEATURIZE_IN, "serve.featurize_in",
               f"choose one of {', '.join(FEATURIZE_IN)}, got {self.featurize_in!r}")
        _check(self.search in SEARCH_MODES, "serve.search", f"choose one of {', '.join(SEARCH_MODES)}, got {self.search!r}")
        _check(self.feature_cache >= 0, "serve.feature_cache", f"must be >= 0 (0 = off), got {self.feature_cache}")
        _check(self.search_candidates >= 0, "serve.search_candidates",
               f"must be >= 0 (0 = the version's), got {self.search_candidates}")
