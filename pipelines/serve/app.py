"""The application: FastAPI ingress + featurizer + index searchers, from one typed builder.

``build_app(ServeArgs(...))`` is what ``attribution serve`` runs and what
``deploy/serve_config.yaml`` names (``import_path: pipelines.serve.app:build_app``, with
``args`` validated into ``ServeArgs``). The HTTP ingress is ``pipelines.serve.ingress``.

Hot swap: the index version and weights travel in each deployment's ``user_config``.
Deploying the same application config again with only those changed (``serve deploy`` of
the edited ``deployments:`` section, or ``pipelines.serve.runner.deploy``) is a lightweight
update: Serve calls ``reconfigure`` on the running replicas instead of replacing them.
Changing ``args`` rebuilds the application (new replicas, rolling).
"""

from typing import Any

from pydantic import BaseModel, Field

from attribution_core.config import ProjectConfig, ServeConfig, to_mapping
from pipelines.serve.deployments import DRAIN_CHECK_S, IndexSearcher, QueryFeaturizer
from pipelines.serve.ingress import AttributionAPI
from pipelines.serve.messages import QueryModel, ServedVersion

APP_NAME = "attribution"
INGRESS = "AttributionAPI"
IMPORT_PATH = "pipelines.serve.app:build_app"


class ServeArgs(BaseModel):
    """Arguments of the application builder (``args:`` of a Serve config file)."""

    config: str = Field(description="Project config file (its serve: section sets limits, replicas, batching).")
    index: str | None = Field(None, description="Index root (path or s3://); default: the config's index.out.")
    version: str | None = Field(None, description="Index version to serve; default: the index's latest.")
    weights: str | None = Field(None, description="Weights artifact URI; default: <index>/versions/<v>/weights/"
                                                   "<serve.weights>.json, else the nearest earlier version's.")
    model: str | None = Field(None, description="Model directory; default: the config's model.path.")
    base: str | None = Field(None, description="Base pipeline directory of a LoRA model; default: the config's "
                                               "model.base.")


def user_config(cfg: ProjectConfig, args: ServeArgs) -> dict[str, Any]:
    """What each deployment may swap while serving: index, version, weights (+ batching, how
    often to follow the index's ``latest`` when no version is pinned, and how to search)."""
    return to_mapping(ServedVersion(
        index=args.index or cfg.index.out, version=args.version, weights=args.weights, weights_name=cfg.serve.weights,
        max_batch_size=cfg.serve.max_batch_size, batch_wait_ms=cfg.serve.batch_wait_ms, refresh_s=cfg.serve.refresh_s,
        search=cfg.serve.search, candidates=cfg.serve.search_candidates,
        rows_dir=cfg.serve.rows_dir))


def featurizer_deployment(scfg: ServeConfig) -> str:
    """The deployment that holds the model (and takes the version in its ``user_config``)."""
    return INGRESS if scfg.featurize_in == "ingress" else "QueryFeaturizer"


def _gpus_available() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(args: ServeArgs | dict[str, Any]):
    """The Serve application for ``args`` (``serve.run(build_app(...))``)."""
    from ray import serve


    if isinstance(args, dict):
        args = ServeArgs(**args)
    cfg = ProjectConfig.load(args.config)
    scfg = cfg.serve
    swap = user_config(cfg, args)
    gpu = _gpus_available()
    featurizer_opts = {"num_cpus": scfg.cpus_per_replica, "num_gpus": scfg.gpus_per_replica if gpu else 0}
    ingress_opts = {"resources": dict(scfg.ingress_resources)} if scfg.ingress_resources else {}
    searchers = [
        IndexSearcher.options(
            name=f"IndexSearcher{part}", num_replicas=scfg.searcher_replicas, user_config=swap,
            ray_actor_options={"num_cpus": scfg.cpus_per_replica,
                               **({"resources": dict(scfg.searcher_resources)} if scfg.searcher_resources else {})},
        ).bind(part, scfg.partitions, scfg.searcher_threads)
        for part in range(scfg.partitions)
    ]
    serve_settings = to_mapping(scfg)

    ingress = serve.deployment(AttributionAPI, name=INGRESS, max_ongoing_requests=256,
                               graceful_shutdown_wait_loop_s=DRAIN_CHECK_S)
    model = QueryModel(config_path=args.config, model_dir=args.model, threads=scfg.threads, base=args.base)
    if scfg.featurize_in == "ingress":  # the ingress's replicas hold the model
        return ingress.options(num_replicas=scfg.featurizer_replicas,
                               ray_actor_options={**featurizer_opts, **ingress_opts},
                               user_config=swap).bind(None, searchers, serve_settings, model)
    featurizer = QueryFeaturizer.options(
        num_replicas=scfg.featurizer_replicas, ray_actor_options=featurizer_opts, user_config=swap,
    ).bind(model)
    return ingress.options(ray_actor_options={"num_cpus": 0, **ingress_opts}).bind(featurizer, searchers,
                                                                                  serve_settings)
